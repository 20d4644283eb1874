"""precompute flow: the train pairs -> regdpo.pairs.v1 files (paper A.2 pre-encoding).

Two phases keep one frozen encoder family in memory at a time: the prompts through UMT5
(then freed), then the videos and reference frames through the VAE (and CLIP for Wan2.1
I2V), shared inputs encoded once (tasks.precompute). The committed manifest (rows with a
`latents` key) is what infra.pairs_format.PairsDataset opens.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.dag import STAGES
from flows.stage import StageRun, flow_run_name, transient
from infra.config import PrecomputeConfig
from infra.store import Store

STAGE = STAGES["precompute"]
PAIR_FIELDS = ("pair_id", "gt_id", "prompt", "ref_image", "win", "lose", "mask", "generator",
               "bucket", "width", "height", "fps", "frames")
# Dual-IPO's single videos (rows of kind pointwise or real, infra.pairs_format) add these; a
# pair's fields, and so its item key, stay what they were.
VIDEO_FIELDS = ("kind", "video", "desirable")


def item_fields(row: dict) -> dict:
    """The fields of a pairs-stage row that precompute reads (and keys its item on)."""
    single = row.get("kind") in ("pointwise", "real")
    return {k: row.get(k) for k in PAIR_FIELDS + (VIDEO_FIELDS if single else ())}


@task(name="encode-prompts", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=transient)
def encode_prompts(store_url: str, cfg: PrecomputeConfig, prompts: list[str]) -> dict[str, str]:
    """prompt -> store key of its UMT5 embedding; the text encoder is freed on return."""
    from models.runtime import encode_prompts as encode
    from models.wan import WanSpec

    return encode(Store(store_url), WanSpec(cfg.kind, cfg.model, cfg.dtype), prompts, cfg.device)


@task(name="check-model", cache_policy=NO_CACHE)
def model_config(cfg: PrecomputeConfig) -> dict:
    """The transformer's config, after checking the encoders can feed it (no weights read)."""
    from models.wan import WanSpec, transformer_config
    from tasks.precompute import check_encoders

    spec = WanSpec(cfg.kind, cfg.model, cfg.dtype)
    config = transformer_config(spec)
    check_encoders(spec, config)
    return {k: config.get(k) for k in ("in_channels", "out_channels", "text_dim", "image_dim",
                                       "patch_size")}


@task(name="release-models", cache_policy=NO_CACHE)
def release_models() -> None:
    from models.runtime import FROZEN

    FROZEN.release()


def encoder_weights(cfg: PrecomputeConfig) -> dict[str, str]:
    """The encoders' weights themselves, not just the model's name."""
    from models.runtime import weight_identity

    encoders = ("vae", "text_encoder") + (("image_encoder",) if cfg.kind == "i2v" else ())
    return {c: weight_identity(cfg.model, cfg.kind, cfg.dtype, c) for c in encoders}


@flow(name="precompute", flow_run_name=flow_run_name("precompute"), log_prints=True)
def precompute(run: str = "toy", config: PrecomputeConfig | None = None,
               store: str = "file://./artifacts",
               overrides: list[str] | None = None, round: int | None = None) -> dict:
    """Pre-encode the run's train pairs for the trainer.

    Args:
        run: the run's name (runs/<run>/ in the store); its other stages' outputs are read
            from the run index.
        config: this stage's section; empty = the section the run last used (recorded in
            the run index), not the real-model defaults.
        store: artifact store URL (file://... or s3://bucket/prefix; credentials come from
            the environment).
        overrides: `--set`-style changes applied on top, e.g. ["precompute.workers=4"];
            validated before any work.
        round: a Dual-IPO round: reads pairs.r<round>, records precompute.r<round>.
    """
    s = StageRun(STAGE, run, config, store, overrides, round=round)
    cfg = s.cfg
    if cfg.model is None or cfg.kind is None:
        raise ValueError("precompute.model and precompute.kind are not set and there is no "
                         "train section to take them from: name the model that will train")
    train = [item_fields(r) for r in s.rows("pairs") if r.get("split") == "train"]
    settings = cfg.model_dump(exclude={"workers", "device"}) | {"weights": encoder_weights(cfg)}
    if entry := s.reuse(settings):
        return entry
    transformer = model_config(cfg)
    keys = encode_prompts(s.store.url, cfg, [r["prompt"] for r in train])
    config_dump = cfg.model_dump()
    work = [s.work(r, settings, r["pair_id"],
                   {"id": r["pair_id"], "source": r.get("video") or r["win"], "row": r,
                    "config": config_dump,
                    "text_key": keys[r["prompt"]], "model_config": transformer}) for r in train]
    try:
        outputs = s.map(work, cfg.workers)
    finally:
        release_models()
    return s.commit([out | {"pair_id": r["pair_id"], "gt_id": r["gt_id"], "generator": r["generator"]}
                     for r, out in zip(train, outputs)])
