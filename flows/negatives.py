"""negatives flow: for every GT clip, one negative per generator (gt_pair) or one locally
corrupted copy (local_corrupt), renormalized to the clip's GT spec.

Generators run one after another, each loaded once and released before the next: the
prompts are embedded first (text encoder loaded only for that), then the generator's items
run `workers` at a time. A clip's row is committed as soon as its video is in the store, so a
killed or partly failed run, started again, redoes only the clips without a row.
"""

from __future__ import annotations

import time

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.common import (
    ITEM_FUNCS,
    _flow_run_id,
    _transient,
    commit_stage,
    committed_entry,
    recorded_config,
    run_items,
)
from infra.config import GeneratorConfig, NegativesConfig
from infra.stage import input_manifest, item_dir, item_key, load_row, save_row, stage_key
from infra.store import Store, digest

STAGE = "negatives"


def _work(store: Store, ikey: str, payload: dict) -> dict:
    from tasks.negatives import make_negatives

    run_id = _flow_run_id()
    return make_negatives(store, payload, lambda k, row: save_row(
        store, STAGE, k, row | {"flow_run": run_id}))


ITEM_FUNCS[STAGE] = _work


@task(name="encode-prompts", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=_transient)
def encode_prompts(store_url: str, gen: GeneratorConfig, prompts: list[str],
                   device: str | None) -> dict[str, str]:
    """prompt -> store key of its UMT5 embedding (each prompt encoded once per text encoder)."""
    from models.wan import WanSpec
    from tasks.precompute import encode_prompts as encode

    return encode(Store(store_url), WanSpec(gen.kind, gen.model, gen.dtype), prompts, device)


@task(name="release-models", cache_policy=NO_CACHE)
def release_models() -> None:
    """Drop the frozen generator before the next one loads (or the stage ends)."""
    from tasks.precompute import FROZEN

    FROZEN.release()


def _units(clips: list[dict], gen: GeneratorConfig, cfg: NegativesConfig, gt: dict) -> list[dict]:
    """One unit per clip: its item key (clip content, this generator's settings, the GT spec)."""
    from tasks.negatives import item_seed
    from tasks.precompute import identity

    # The weights themselves, not just the model's name: a rebuilt folder or a new hub revision
    # in the cache makes new negatives.
    weights = {c: identity(gen.model, gen.kind, gen.dtype, c) for c in ("transformer", "vae")}
    settings = {"mode": cfg.mode, "generator": gen.model_dump(), "seed": cfg.seed, "gt": gt,
                "local": cfg.local.model_dump() if cfg.mode == "local_corrupt" else None,
                "weights": weights}
    units = []
    for clip in clips:
        ikey = item_key(STAGE, {k: clip[k] for k in ("video", "ref_image", "prompt")}, settings)
        units.append({"ikey": ikey, "dir": item_dir(STAGE, ikey), "clip": clip,
                      "seed": item_seed(cfg.seed, clip["id"], gen.name)})
    return units


def _batches(units: list[dict], size: int) -> list[list[dict]]:
    """Clips of one generation size, `size` at a time (a pipeline call takes one size)."""
    groups: dict[tuple, list[dict]] = {}
    for unit in units:
        groups.setdefault((unit["clip"]["width"], unit["clip"]["height"]), []).append(unit)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def _generator_rows(st: Store, cfg: NegativesConfig, gen: GeneratorConfig, clips: list[dict],
                    gt: dict) -> list[dict]:
    units = _units(clips, gen, cfg, gt)
    pending = [u for u in units if load_row(st, STAGE, u["ikey"]) is None]
    failed: dict[str, str] = {}
    if pending:
        keys = encode_prompts(st.url, gen, [u["clip"]["prompt"] for u in pending]
                              + [gen.negative_prompt], cfg.device)
        payload = {"mode": cfg.mode, "generator": gen.model_dump(), "local": cfg.local.model_dump(),
                   "gt": gt, "device": cfg.device, "negative_key": keys[gen.negative_prompt]}
        work = []
        for batch in _batches(pending, gen.batch_size):
            clips_payload = [u | {"prompt_key": keys[u["clip"]["prompt"]]} for u in batch]
            more = f"+{len(batch) - 1}" if len(batch) > 1 else ""
            label = f"{gen.name}:{batch[0]['clip']['id']}{more}"
            work.append((digest([u["ikey"] for u in batch], 32), label,
                         payload | {"id": label, "clips": clips_payload}))
        try:
            results = run_items(STAGE, st, work, cfg.workers)
        finally:
            release_models()
        for (_, _, p), result in zip(work, results):
            for u in p["clips"]:
                failed[u["ikey"]] = result.get("reason") or ""
    rows = []
    for u in units:
        row = load_row(st, STAGE, u["ikey"])
        rows.append(row or {"id": f"{u['clip']['id']}.{gen.name}", "gt_id": u["clip"]["id"],
                            "generator": gen.name, "mode": cfg.mode, "seed": u["seed"],
                            "status": "failed", "reason": failed.get(u["ikey"]) or "no row"})
    return rows


@flow(name="negatives", log_prints=True)
def negatives(run: str = "toy", config: NegativesConfig | None = None,
              store: str = "file://./artifacts") -> dict:
    """Make the negatives of the run's GT clips (gt_pair or local_corrupt)."""
    started, st = time.time(), Store(store)
    cfg = config or recorded_config(st, run, STAGE, NegativesConfig)
    rows_in, success_in = input_manifest(st, run, "normalize")
    from tasks.negatives import GT_FIELDS

    clips = [{k: r[k] for k in GT_FIELDS} for r in rows_in if r["status"] == "ok"]
    gt = {k: success_in["config"][k] for k in ("fps", "frames", "crf", "preset")}
    config_dump = cfg.model_dump()
    settings = cfg.model_dump(exclude={"workers", "device"})
    key = stage_key(STAGE, settings | {"gt": gt}, success_in["manifest_sha256"])
    if entry := committed_entry(st, run, STAGE, key, config_dump):
        return entry
    rows = [row for gen in cfg.generators for row in _generator_rows(st, cfg, gen, clips, gt)]
    return commit_stage(st.url, run, STAGE, key, rows, config_dump,
                        {"normalize": success_in["manifest"]}, started)
