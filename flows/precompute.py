"""precompute flow: the train pairs -> regdpo.pairs.v1 files (paper A.2 pre-encoding).

Two phases keep one frozen encoder family in memory at a time: the prompts through UMT5
(then freed), then the videos and reference frames through the VAE (and CLIP for Wan2.1
I2V), shared inputs encoded once (tasks.precompute). The committed manifest (rows with a
`latents` URI) is what tasks.train.PairsDataset opens.
"""

from __future__ import annotations

import time

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.common import ITEM_FUNCS, _transient, commit_stage, committed_entry, recorded_config, run_items
from infra.config import PrecomputeConfig
from infra.stage import input_manifest, item_dir, item_key, stage_key
from infra.store import Store

STAGE = "precompute"
PAIR_FIELDS = ("pair_id", "gt_id", "prompt", "ref_image", "win", "lose", "mask", "generator",
               "bucket", "width", "height", "fps", "frames")


def _work(store: Store, ikey: str, payload: dict) -> dict:
    from tasks.precompute import precompute_pair

    cfg = PrecomputeConfig.model_validate(payload["config"])
    out = precompute_pair(store, payload["row"], cfg, payload["text_key"], payload["model_config"],
                          f"{item_dir(STAGE, ikey)}/pair.safetensors")
    return {"id": payload["row"]["pair_id"]} | out


ITEM_FUNCS[STAGE] = _work


@task(name="encode-prompts", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=_transient)
def encode_prompts(store_url: str, cfg: PrecomputeConfig, prompts: list[str]) -> dict[str, str]:
    """prompt -> store key of its UMT5 embedding; the text encoder is freed on return."""
    from models.wan import WanSpec
    from tasks.precompute import encode_prompts as encode

    return encode(Store(store_url), WanSpec(cfg.kind, cfg.model, cfg.dtype), prompts, cfg.device)


@task(name="check-model", cache_policy=NO_CACHE)
def model_config(cfg: PrecomputeConfig) -> dict:
    """The transformer's config, after checking the encoders can feed it (no weights read)."""
    from models.wan import WanSpec
    from tasks.precompute import check_encoders
    from tasks.train import transformer_config

    spec = WanSpec(cfg.kind, cfg.model, cfg.dtype)
    config = transformer_config(spec)
    check_encoders(spec, config)
    return {k: config.get(k) for k in ("in_channels", "out_channels", "text_dim", "image_dim",
                                       "patch_size")}


@task(name="release-models", cache_policy=NO_CACHE)
def release_models() -> None:
    from tasks.precompute import FROZEN

    FROZEN.release()


@flow(name="precompute", log_prints=True)
def precompute(run: str = "toy", config: PrecomputeConfig | None = None,
               store: str = "file://./artifacts") -> dict:
    """Pre-encode the run's train pairs for the trainer."""
    started, st = time.time(), Store(store)
    cfg = config or recorded_config(st, run, STAGE, PrecomputeConfig)
    if cfg.model is None or cfg.kind is None:
        raise ValueError("precompute.model and precompute.kind are not set and there is no "
                         "train section to take them from: name the model that will train")
    rows_in, success_in = input_manifest(st, run, "pairs")
    train = [{k: r.get(k) for k in PAIR_FIELDS} for r in rows_in
             if r["status"] == "ok" and r.get("split") == "train"]
    config_dump = cfg.model_dump()
    settings = cfg.model_dump(exclude={"workers", "device"})
    # The encoders' weights themselves, not just the model's name (see tasks.precompute.identity).
    from tasks.precompute import identity

    encoders = ("vae", "text_encoder") + (("image_encoder",) if cfg.kind == "i2v" else ())
    settings["weights"] = {c: identity(cfg.model, cfg.kind, cfg.dtype, c) for c in encoders}
    key = stage_key(STAGE, settings, success_in["manifest_sha256"])
    if entry := committed_entry(st, run, STAGE, key, config_dump):
        return entry
    transformer = model_config(cfg)
    keys = encode_prompts(st.url, cfg, [r["prompt"] for r in train])
    work = [(item_key(STAGE, {k: r[k] for k in PAIR_FIELDS}, settings), r["pair_id"],
             {"id": r["pair_id"], "row": r, "config": config_dump, "text_key": keys[r["prompt"]],
              "model_config": transformer}) for r in train]
    try:
        outputs = run_items(STAGE, st, work, cfg.workers)
    finally:
        release_models()
    rows = [out | {"pair_id": r["pair_id"], "gt_id": r["gt_id"], "generator": r["generator"]}
            for r, out in zip(train, outputs)]
    return commit_stage(st.url, run, STAGE, key, rows, config_dump, {"pairs": success_in["manifest"]},
                        started)
