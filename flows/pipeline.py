"""The DAG. `curate` runs the data stages acquire -> filter -> normalize; `pipeline` runs them all:

    acquire -> filter -> normalize -> negatives -> pairs -> precompute -> train -> evaluate

Each stage is also its own flow and deployment; it reads its input from the run index
(runs/<run>/run.json), so re-running one stage for a run reuses the committed output of the
others, and an unchanged stage is a lookup, not work.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.acquire import acquire
from flows.evaluate import evaluate
from flows.filter import filter_videos
from flows.negatives import negatives
from flows.normalize import normalize
from flows.pairs import pairs
from flows.precompute import precompute
from flows.train import train
from infra.config import RunConfig
from infra.store import Store

CURATE = {"acquire": acquire, "filter": filter_videos, "normalize": normalize}
STAGES = CURATE | {"negatives": negatives, "pairs": pairs, "precompute": precompute,
                   "train": train, "evaluate": evaluate}
# Sections a run may leave out (None): the run then stops before that stage.
OPTIONAL = ("train", "evaluate")


def _run_stages(stages: dict, run: str, config: RunConfig, only: list[str] | None,
                nproc: int = 1) -> dict:
    unknown = set(only or []) - set(stages)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {list(stages)}")
    for name in OPTIONAL:
        if only and name in only and getattr(config, name) is None:
            raise ValueError(f"--only {name}: the run config has no `{name}` section")
    Store(config.store).update_run(run, config=config.model_dump(mode="json"))
    log, results = get_run_logger(), {}
    for name, stage_flow in stages.items():
        if only and name not in only:
            continue
        section = getattr(config, name)
        if section is None:
            log.info("%s: skipped (the run config has no `%s` section)", name, name)
            continue
        extra = {"nproc": nproc} if name == "train" else {}
        results[name] = stage_flow(run=run, config=section, store=config.store, **extra)
        log.info("%s: %s", name, results[name]["counts"])
    return results


@flow(name="curate", log_prints=True)
def curate(run: str = "toy", config: RunConfig = RunConfig(), only: list[str] | None = None) -> dict:
    """Real videos to GT clips: acquire -> filter -> normalize."""
    return _run_stages(CURATE, run, config, only)


@flow(name="pipeline", log_prints=True)
def pipeline(run: str = "toy", config: RunConfig = RunConfig(), only: list[str] | None = None,
             nproc: int = 1) -> dict:
    """Every stage in order (or only those named) for `run`; `nproc` processes train."""
    return _run_stages(STAGES, run, config, only, nproc)
