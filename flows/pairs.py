"""pairs flow: GT clips + their negatives (or external scores) -> preference pairs, split
train/test by GT clip. Cheap bookkeeping except for importing annotated videos."""

from __future__ import annotations

import hashlib

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.dag import STAGES, mode_version
from flows.stage import StageRun, artifact_key, flow_run_name, transient
from infra.config import PairsConfig
from infra.store import Store, open_url
from tasks import pairs as tp

STAGE = STAGES["pairs"]
_NEGATIVES_MODE = {"gt_pair": "gt_pair", "local": "local_corrupt"}


@task(name="import-annotated", cache_policy=NO_CACHE, retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=transient)
def import_annotated(store_url: str, rows: list[dict], root: str) -> list[dict]:
    """Copy the kept pairs' videos into the store (each video once)."""
    return tp.import_pairs(Store(store_url), rows, root)


def _negatives(s: StageRun, mode: str) -> list[dict]:
    rows = s.rows("negatives", status=None)
    made = {r.get("mode") for r in rows} - {None}
    if made - {_NEGATIVES_MODE[mode]}:
        raise ValueError(f"pairs.mode {mode!r} pairs GT clips with {_NEGATIVES_MODE[mode]} "
                         f"negatives, but the run's negatives stage made {sorted(made)}; set "
                         f"negatives.mode: {_NEGATIVES_MODE[mode]} (or pairs.mode) and re-run")
    return rows


def _publish(run: str, cfg: PairsConfig, rows: list[dict], counts: dict | None) -> None:
    lines = [f"**pairs** for run `{run}` (mode `{cfg.mode}`, test fraction {cfg.test_fraction})",
             "", "| split, status | rows |", "|---|---|"]
    lines += [f"| {k} | {n} |" for k, n in tp.split_counts(rows).items()]
    if counts:  # the paper's A.1 tally of the annotated scores
        lines += ["", "| annotated pairs (train clips) | count |", "|---|---|"]
        lines += [f"| {k} | {n} |" for k, n in counts.items()]
    create_markdown_artifact(key=artifact_key(run, "pairs-counts"), markdown="\n".join(lines))


@flow(name="pairs", flow_run_name=flow_run_name("pairs"), log_prints=True)
def pairs(run: str = "toy", config: PairsConfig | None = None,
          store: str = "file://./artifacts",
          overrides: list[str] | None = None, round: int | None = None) -> dict:
    """Build the run's preference pairs and its held-out test set.

    Args:
        run: the run's name (runs/<run>/ in the store); its other stages' outputs are read
            from the run index.
        config: this stage's section; empty = the section the run last used (recorded in
            the run index), not the real-model defaults.
        store: artifact store URL (file://... or s3://bucket/prefix; credentials come from
            the environment).
        overrides: `--set`-style changes applied on top, e.g. ["pairs.workers=4"];
            validated before any work.
        round: a Dual-IPO round (mode scored: its critique.r<round>; the entry pairs.r<round>).
    """
    from infra.code import code_digest

    s = StageRun(STAGE, run, config, store, overrides, round=round)
    cfg = s.cfg
    clips = s.rows("normalize")
    extra, inputs = [], {}
    if cfg.mode == "scored":
        critiques = s.rows("critique")
        extra += [code_digest("tasks.pairs:scored_rows", "tasks.pairs:held_out_rows"),
                  mode_version("pairs", "critique")]
    elif cfg.mode == "annotated":
        with open_url(cfg.annotated.scores) as f:
            extra.append(hashlib.sha256(f.read()).hexdigest())
        inputs["scores"] = cfg.annotated.scores
    else:
        negatives = _negatives(s, cfg.mode)
    if entry := s.reuse(cfg.settings(), extra):
        return entry
    split = tp.split_clips([c["id"] for c in clips], cfg.test_fraction, cfg.split_seed)
    counts = None
    if cfg.mode == "annotated":
        candidates, counts = tp.annotated_candidates(clips, tp.read_scores(cfg.annotated),
                                                     cfg.annotated, split)
        train = import_annotated(s.store.url, candidates, cfg.annotated.video_root)
    elif cfg.mode == "scored":
        train = tp.scored_rows(clips, critiques, split, cfg.scored)
    else:
        train = tp.negative_pairs(clips, negatives, split)
    rows = tp.held_out_rows(clips, split) + train
    _publish(run, cfg, rows, counts)
    return s.commit(rows, inputs)
