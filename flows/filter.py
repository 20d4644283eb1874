"""filter flow: one decode per acquired video feeds every quality signal; thresholds decide."""

from __future__ import annotations

from dataclasses import fields

from prefect import flow

from flows.dag import STAGES
from flows.stage import StageRun
from infra.config import FilterConfig
from infra.stage import item_dir, item_key, row_key
from infra.video import VideoInfo
from tasks.filter import decide, explain

STAGE = STAGES["filter"]
PASSTHROUGH = ("id", "source", "caption", "sha256", "video", "bucket")
INFO = frozenset(f.name for f in fields(VideoInfo))  # acquire's probe of the clip, in its row


def _judge(source: dict, scored: dict, cfg: FilterConfig) -> dict:
    row = {k: source.get(k) for k in PASSTHROUGH} | {k: v for k, v in scored.items() if k not in PASSTHROUGH}
    if scored.get("status") != "scored":
        return row
    reasons = decide(scored, cfg)
    return row | {"status": "rejected" if reasons else "ok", "reasons": reasons,
                  "reason": explain(reasons[0], scored, cfg) if reasons else ""}


def _prepared_item(source: dict, cfg: FilterConfig, prepare: dict | None) -> dict:
    """The payload fields that let a clip's item encode it for normalize (none without a
    request): that stage's item dir for the clip, its config, and this stage's thresholds."""
    if not prepare:
        return {}
    ikey = item_key("normalize", {k: source[k] for k in prepare["identity"]},
                    prepare["settings"], prepare["code"])
    return {"thresholds": cfg.model_dump(),
            "prepare": {"dir": item_dir("normalize", ikey), "row": row_key("normalize", ikey),
                        "config": prepare["config"]}}


@flow(name="filter", flow_run_name="filter/{run}", log_prints=True)
def filter_videos(run: str = "toy", config: FilterConfig | None = None, store: str = "file://./artifacts",
                  overrides: list[str] | None = None, prepare: dict | None = None) -> dict:
    """Score every acquired video and reject static, cut, flashing, texty and slideshow clips.

    Args:
        run: the run's name (runs/<run>/ in the store); its other stages' outputs are read
            from the run index.
        config: this stage's section; empty = the section the run last used (recorded in
            the run index), not the real-model defaults.
        store: artifact store URL (file://... or s3://bucket/prefix; credentials come from
            the environment).
        overrides: `--set`-style changes applied on top, e.g. ["filter.workers=4"];
            validated before any work.
        prepare: set by the pipeline when normalize runs next (flows.normalize.prepare_request):
            the decode that scores a clip also encodes it to the GT spec as normalize's item,
            kept only if the clip passes. It changes no output of this stage.
    """
    s = StageRun(STAGE, run, config, store, overrides)
    accepted = s.rows("acquire")
    if entry := s.reuse(s.cfg.model_dump(exclude={"workers"})):
        return entry
    signals = s.cfg.signals.model_dump()
    work = [s.work({"sha256": r["sha256"]}, signals, r["id"],
                   {"id": r["id"], "source": r["source"], "video": r["video"], "signals": signals,
                    "info": {k: r[k] for k in INFO} if INFO <= r.keys() else None}
                   | _prepared_item(r, s.cfg, prepare))
            for r in accepted]
    scored = s.map(work, s.cfg.workers)
    return s.commit([_judge(src, out, s.cfg) for src, out in zip(accepted, scored)])
