"""sample flow (Dual-IPO): N videos per GT clip's prompt from the round's policy.

The policy is `train.model` (the model the rounds train) plus, from round 2 on, the previous
round's adapter. Its identity (the transformer's weights and the adapter's sha256) and the
round index are in every item key, so round 2's videos can never be round 1's. A video's row
is committed as soon as it is in the store: a killed run, started again, redoes only the
videos without a row.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.dag import STAGES
from flows.stage import StageRun, flow_run_name
from infra.config import SampleConfig, TrainConfig

STAGE = STAGES["sample"]
GT_FIELDS = ("id", "video", "ref_image", "prompt", "bucket", "width", "height", "fps", "frames")


def policy_identity(store, model: str, kind: str, dtype: str, adapter: str | None) -> dict:
    """The generator: the base's weights and the start adapter's bytes, not just their names."""
    from infra.checkpoint import read_adapter
    from models.runtime import weight_identity

    sha = read_adapter(store, adapter)[1] if adapter else None
    return {"model": model, "kind": kind, "dtype": dtype, "adapter": adapter,
            "adapter_sha256": sha,
            "weights": {c: weight_identity(model, kind, dtype, c)
                        for c in ("transformer", "vae", "text_encoder")}}


@task(name="release-policy", cache_policy=NO_CACHE)
def release_policy() -> None:
    from tasks.sample import release_policy as release

    release()


@flow(name="sample", flow_run_name=flow_run_name("sample"), log_prints=True)
def sample(run: str = "toy", config: SampleConfig | None = None,
           store: str = "file://./artifacts", overrides: list[str] | None = None,
           round: int = 1, policy: TrainConfig | dict | None = None,
           adapter: str | None = None) -> dict:
    """Sample a Dual-IPO round's videos.

    Args:
        run: the run's name (runs/<run>/ in the store); the GT clips come from its normalize.
        config: this stage's section (ipo.sample); empty = the section the round last used.
        store: artifact store URL (file://... or s3://bucket/prefix).
        overrides: `--set`-style changes, e.g. ["sample.samples_per_prompt=2"].
        round: the round (1..R); its entry in the run index is `sample.r<round>`.
        policy: the train section whose model samples (model, kind, dtype); empty = the run's.
        adapter: store key of the previous round's adapter (None in round 1: the base).
    """
    from tasks.sample import sample_seed

    s = StageRun(STAGE, run, config, store, overrides, round=round)
    if policy is None:
        policy = (s.store.read_run(run) or {}).get("config", {}).get("train")
    if not policy:
        raise ValueError(f"sample for run {run!r}: no policy model; pass `policy` (a train "
                         "section) or record the run's config with a train section")
    tcfg = TrainConfig.model_validate(policy)
    cfg: SampleConfig = s.cfg
    clips = sorted(({k: r[k] for k in GT_FIELDS} for r in s.rows("normalize")),
                   key=lambda c: c["id"])
    gt = {k: s.input("normalize")[1]["config"][k] for k in ("fps", "frames", "crf", "preset")}
    generator = policy_identity(s.store, tcfg.model, tcfg.kind, tcfg.dtype, adapter)
    settings = cfg.model_dump(exclude={"workers", "device"}) | {
        "round": round, "gt": gt, "generator": generator}
    if entry := s.reuse(settings):
        return entry
    item_settings = {k: v for k, v in settings.items() if k != "samples_per_prompt"}
    work = []
    for clip in clips:
        for index in range(cfg.samples_per_prompt):
            seed = sample_seed(cfg.seed, round, clip["id"], index)
            label = f"{clip['id']}.r{round}.{index}"
            work.append(s.work({"clip": {k: clip[k] for k in ("video", "ref_image", "prompt")},
                                "index": index}, item_settings, label,
                               {"id": label, "source": clip["video"], "clip": clip,
                                "index": index, "seed": seed, "round": round, "gt": gt,
                                "sample": cfg.model_dump(), "policy": generator}))
    try:
        rows = s.map(work, cfg.workers)
    finally:
        release_policy()
    return s.commit(rows)
