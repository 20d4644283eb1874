"""negatives flow: for every GT clip, one negative per generator (gt_pair) or one locally
corrupted copy (local_corrupt), renormalized to the clip's GT spec.

Generators run one after another, each loaded once and released before the next: the
prompts are embedded first (text encoder loaded only for that), then the generator's items
run `workers` at a time. A clip's row is committed as soon as its video is in the store, so a
killed or partly failed run, started again, redoes only the clips without a row.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.dag import STAGES
from flows.stage import StageRun, flow_run_id, transient
from infra.config import GeneratorConfig, NegativesConfig
from infra.stage import item_dir, load_row
from infra.store import Store, digest

STAGE = STAGES["negatives"]
# The fields of a normalize row that describe a GT clip.
GT_FIELDS = ("id", "video", "ref_image", "prompt", "bucket", "width", "height", "fps", "frames")


@task(name="encode-prompts", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=transient)
def encode_prompts(store_url: str, gen: GeneratorConfig, prompts: list[str],
                   device: str | None) -> dict[str, str]:
    """prompt -> store key of its UMT5 embedding (each prompt encoded once per text encoder)."""
    from models.runtime import encode_prompts as encode
    from models.wan import WanSpec

    return encode(Store(store_url), WanSpec(gen.kind, gen.model, gen.dtype), prompts, device)


@task(name="release-models", cache_policy=NO_CACHE)
def release_models() -> None:
    """Drop the frozen generator before the next one loads (or the stage ends)."""
    from models.runtime import FROZEN

    FROZEN.release()


def generator_weights(gen: GeneratorConfig) -> dict[str, str]:
    """The weights themselves, not just the model's name: a rebuilt folder or a new hub
    revision in the cache makes new negatives."""
    from models.runtime import weight_identity

    return {c: weight_identity(gen.model, gen.kind, gen.dtype, c) for c in ("transformer", "vae")}


def _units(s: StageRun, clips: list[dict], gen: GeneratorConfig, gt: dict) -> list[dict]:
    """One unit per clip: its item key (clip content, this generator's settings, the GT spec)."""
    from tasks.negatives import item_seed

    cfg: NegativesConfig = s.cfg
    settings = {"mode": cfg.mode, "generator": gen.model_dump(), "seed": cfg.seed, "gt": gt,
                "local": cfg.local.model_dump() if cfg.mode == "local_corrupt" else None,
                "weights": generator_weights(gen)}
    units = []
    for clip in clips:
        ikey = s.item_key({k: clip[k] for k in ("video", "ref_image", "prompt")}, settings)
        units.append({"ikey": ikey, "dir": item_dir(STAGE.name, ikey), "clip": clip,
                      "seed": item_seed(cfg.seed, clip["id"], gen.name)})
    return units


def _batches(units: list[dict], size: int) -> list[list[dict]]:
    """Clips of one generation size, `size` at a time (a pipeline call takes one size)."""
    groups: dict[tuple, list[dict]] = {}
    for unit in units:
        groups.setdefault((unit["clip"]["width"], unit["clip"]["height"]), []).append(unit)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def _generator_rows(s: StageRun, gen: GeneratorConfig, clips: list[dict], gt: dict) -> list[dict]:
    cfg: NegativesConfig = s.cfg
    units = _units(s, clips, gen, gt)
    pending = [u for u in units if load_row(s.store, STAGE.name, u["ikey"]) is None]
    failed: dict[str, str] = {}
    if pending:
        keys = encode_prompts(s.store.url, gen, [u["clip"]["prompt"] for u in pending]
                              + [gen.negative_prompt], cfg.device)
        payload = {"mode": cfg.mode, "generator": gen.model_dump(), "local": cfg.local.model_dump(),
                   "gt": gt, "device": cfg.device, "negative_key": keys[gen.negative_prompt],
                   "flow_run": flow_run_id()}
        work = []
        for batch in _batches(pending, gen.batch_size):
            clips_payload = [u | {"prompt_key": keys[u["clip"]["prompt"]]} for u in batch]
            more = f"+{len(batch) - 1}" if len(batch) > 1 else ""
            label = f"{gen.name}:{batch[0]['clip']['id']}{more}"
            work.append((digest([u["ikey"] for u in batch], 32), label,
                         payload | {"id": label, "source": batch[0]["clip"]["video"],
                                    "clips": clips_payload}))
        try:
            results = s.map(work, cfg.workers)
        finally:
            release_models()
        for (_, _, p), result in zip(work, results):
            for u in p["clips"]:
                failed[u["ikey"]] = result.get("reason") or ""
    rows = []
    for u in units:
        row = load_row(s.store, STAGE.name, u["ikey"])
        rows.append(row or {"id": f"{u['clip']['id']}.{gen.name}", "gt_id": u["clip"]["id"],
                            "source": u["clip"]["video"], "generator": gen.name,
                            "mode": cfg.mode, "seed": u["seed"], "status": "failed",
                            "reason": failed.get(u["ikey"]) or "no row"})
    return rows


@flow(name="negatives", flow_run_name="negatives/{run}", log_prints=True)
def negatives(run: str = "toy", config: NegativesConfig | None = None,
              store: str = "file://./artifacts",
              overrides: list[str] | None = None) -> dict:
    """Make the negatives of the run's GT clips (gt_pair or local_corrupt).

    Args:
        run: the run's name (runs/<run>/ in the store); its other stages' outputs are read
            from the run index.
        config: this stage's section; empty = the section the run last used (recorded in
            the run index), not the real-model defaults.
        store: artifact store URL (file://... or s3://bucket/prefix; credentials come from
            the environment).
        overrides: `--set`-style changes applied on top, e.g. ["negatives.workers=4"];
            validated before any work.
    """
    s = StageRun(STAGE, run, config, store, overrides)
    clips = [{k: r[k] for k in GT_FIELDS} for r in s.rows("normalize")]
    gt = {k: s.input("normalize")[1]["config"][k] for k in ("fps", "frames", "crf", "preset")}
    settings = s.cfg.model_dump(exclude={"workers", "device"}) | {
        "gt": gt, "weights": {g.name: generator_weights(g) for g in s.cfg.generators}}
    if entry := s.reuse(settings):
        return entry
    return s.commit([row for gen in s.cfg.generators for row in _generator_rows(s, gen, clips, gt)])
