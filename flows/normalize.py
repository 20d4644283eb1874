"""normalize flow: every filtered clip to the GT spec (bucket crop, 720p, 16 fps, 81 frames)."""

from __future__ import annotations

from prefect import flow

from flows.dag import STAGES
from flows.stage import StageRun
from infra.config import NormalizeConfig

STAGE = STAGES["normalize"]


IDENTITY = ("sha256", "caption")  # of a clip: its content and its caption


def _captioner(cfg: NormalizeConfig) -> dict:
    """The captioning weights, when a clip may need them: in the key, like every model's."""
    if not cfg.caption.model:
        return {}
    from models.captioner import weight_identity

    return {"captioner": weight_identity(cfg.caption.model)}


def settings_of(cfg: NormalizeConfig) -> dict:
    """What shapes a GT clip (the item and stage keys): the section minus workers, plus the
    captioner's weights."""
    return cfg.model_dump(exclude={"workers"}) | _captioner(cfg)


def prepare_request(cfg: NormalizeConfig) -> dict:
    """For the filter flow, when this stage runs next (flows/pipeline.py): how to name this
    stage's item for a clip, so that filter's decode of the clip also encodes it there."""
    return {"config": cfg.model_dump(), "settings": settings_of(cfg), "code": STAGE.code_version,
            "identity": list(IDENTITY)}


@flow(name="normalize", flow_run_name="normalize/{run}", log_prints=True)
def normalize(run: str = "toy", config: NormalizeConfig | None = None, store: str = "file://./artifacts",
              overrides: list[str] | None = None) -> dict:
    """Normalize filtered clips into GT clips with a reference frame and a prompt.

    Args:
        run: the run's name (runs/<run>/ in the store); its other stages' outputs are read
            from the run index.
        config: this stage's section; empty = the section the run last used (recorded in
            the run index), not the real-model defaults.
        store: artifact store URL (file://... or s3://bucket/prefix; credentials come from
            the environment).
        overrides: `--set`-style changes applied on top, e.g. ["normalize.workers=4"];
            validated before any work.
    """
    s = StageRun(STAGE, run, config, store, overrides)
    accepted = s.rows("filter")
    settings = settings_of(s.cfg)
    if entry := s.reuse(settings):
        return entry
    config_dump = s.cfg.model_dump()
    work = [s.work({k: r[k] for k in IDENTITY}, settings, r["id"],
                   {"id": r["id"], "source": r["source"], "config": config_dump,
                    "row": {k: r[k] for k in ("id", "source", "caption", "video")}})
            for r in accepted]
    outputs = s.map(work, s.cfg.workers)
    # The item row is keyed by content: identity columns come from this run's input row.
    return s.commit([out | {"id": src["id"], "source": src["source"], "sha256": src["sha256"]}
                     for src, out in zip(accepted, outputs)])
