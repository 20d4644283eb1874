"""pairs flow: GT clips + their negatives (or external scores) -> preference pairs, split
train/test by GT clip. Cheap bookkeeping except for importing annotated videos."""

from __future__ import annotations

import hashlib
import re
import time

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.common import _transient, commit_stage, committed_entry, recorded_config
from infra.config import PairsConfig
from infra.stage import input_manifest, stage_key
from infra.store import Store, digest, open_url
from tasks import pairs as tp

STAGE = "pairs"
_NEGATIVES_MODE = {"gt_pair": "gt_pair", "local": "local_corrupt"}


@task(name="import-annotated", cache_policy=NO_CACHE, retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=_transient)
def import_annotated(store_url: str, rows: list[dict], root: str) -> list[dict]:
    """Copy the kept pairs' videos into the store (each video once)."""
    return tp.import_pairs(Store(store_url), rows, root)


def _negatives(st: Store, run: str, mode: str) -> tuple[list[dict], dict]:
    rows, success = input_manifest(st, run, "negatives")
    made = {r.get("mode") for r in rows} - {None}
    if made - {_NEGATIVES_MODE[mode]}:
        raise ValueError(f"pairs.mode {mode!r} pairs GT clips with {_NEGATIVES_MODE[mode]} "
                         f"negatives, but the run's negatives stage made {sorted(made)}; set "
                         f"negatives.mode: {_NEGATIVES_MODE[mode]} (or pairs.mode) and re-run")
    return rows, success


def _publish(run: str, cfg: PairsConfig, rows: list[dict], counts: dict | None) -> None:
    lines = [f"**pairs** for run `{run}` (mode `{cfg.mode}`, test fraction {cfg.test_fraction})",
             "", "| split, status | rows |", "|---|---|"]
    lines += [f"| {k} | {n} |" for k, n in tp.split_counts(rows).items()]
    if counts:  # the paper's A.1 tally of the annotated scores
        lines += ["", "| annotated pairs (train clips) | count |", "|---|---|"]
        lines += [f"| {k} | {n} |" for k, n in counts.items()]
    slug = re.sub(r"[^a-z0-9-]+", "-", f"{run}-pairs-counts".lower()).strip("-")
    create_markdown_artifact(key=slug, markdown="\n".join(lines))


@flow(name="pairs", log_prints=True)
def pairs(run: str = "toy", config: PairsConfig | None = None,
          store: str = "file://./artifacts") -> dict:
    """Build the run's preference pairs and its held-out test set."""
    started, st = time.time(), Store(store)
    cfg = config or recorded_config(st, run, STAGE, PairsConfig)
    rows_gt, success_gt = input_manifest(st, run, "normalize")
    clips = [r for r in rows_gt if r["status"] == "ok"]
    inputs, digests = {"normalize": success_gt["manifest"]}, [success_gt["manifest_sha256"]]
    if cfg.mode == "annotated":
        with open_url(cfg.annotated.scores) as f:
            digests.append(hashlib.sha256(f.read()).hexdigest())
        inputs["scores"] = cfg.annotated.scores
    else:
        negatives, success_neg = _negatives(st, run, cfg.mode)
        digests.append(success_neg["manifest_sha256"])
        inputs["negatives"] = success_neg["manifest"]
    config_dump = cfg.model_dump()
    key = stage_key(STAGE, config_dump, digest(digests))
    if entry := committed_entry(st, run, STAGE, key, config_dump):
        return entry
    split = {c["id"]: tp.split_of(c["id"], cfg.test_fraction, cfg.split_seed) for c in clips}
    counts = None
    if cfg.mode == "annotated":
        candidates, counts = tp.annotated_candidates(clips, tp.read_scores(cfg.annotated),
                                                     cfg.annotated, split)
        train = import_annotated(st.url, candidates, cfg.annotated.video_root)
    else:
        train = tp.negative_pairs(clips, negatives, split)
    rows = tp.held_out_rows(clips, split) + train
    _publish(run, cfg, rows, counts)
    return commit_stage(st.url, run, STAGE, key, rows, config_dump, inputs, started)
