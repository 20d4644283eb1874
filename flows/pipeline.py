"""The DAG as flows. `curate` runs the data stages; `pipeline` runs them all, in the order of
flows/dag.py, each stage reading what its `reads` name from the run index:

    acquire -> filter -> normalize -> negatives -> pairs -> precompute -> train -> evaluate
    pairs reads normalize and negatives; evaluate reads pairs (the test split) and train

Each stage is also its own flow and deployment: re-running one for a run reuses the committed
output of the others, and an unchanged stage is a lookup, not work.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.acquire import acquire
from flows.dag import CURATE, OPTIONAL, ORDER, STAGES
from flows.evaluate import evaluate
from flows.filter import filter_videos
from flows.negatives import negatives
from flows.normalize import normalize, prepare_request
from flows.pairs import pairs
from flows.preflight import preflight
from flows.precompute import precompute
from flows.stage import quiet_subflows
from flows.train import train
from infra.config import RunConfig
from infra.store import Store

FLOWS = {"acquire": acquire, "filter": filter_videos, "normalize": normalize,
         "negatives": negatives, "pairs": pairs, "precompute": precompute, "train": train,
         "evaluate": evaluate}
assert tuple(FLOWS) == ORDER, "flows/dag.py and the flows disagree on the stages"


def check_stages(stages: tuple[str, ...], config: RunConfig, only: list[str] | None) -> None:
    """Refuse an unknown stage or one whose section is missing, before anything runs."""
    unknown = [s for s in only or [] if s not in stages]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {', '.join(stages)}")
    for name in OPTIONAL:
        if only and name in only and getattr(config, name) is None:
            raise ValueError(f"--only {name}: the run config has no `{name}` section")


def selected(stages: tuple[str, ...], config: RunConfig, only: list[str] | None) -> list[str]:
    """The stages that will run: those named (all by default) whose section the config has."""
    return [s for s in stages if (not only or s in only) and getattr(config, s) is not None]


def _run_stages(stages: tuple[str, ...], run: str, config: RunConfig, only: list[str] | None,
                launch: dict | None = None) -> dict:
    check_stages(stages, config, only)
    preflight(config, selected(stages, config, only))
    # The store is wherever run.json is: recording its URL would pin a copied store to the old one.
    Store(config.store).update_run(run, config=config.model_dump(mode="json", exclude={"store"}))
    log, results = get_run_logger(), {}
    for name in stages:
        if only and name not in only:
            continue
        section = getattr(config, name)
        if section is None:
            log.info("%s: skipped (the run config has no `%s` section)", name, name)
            continue
        extra = (launch or {}) if name == "train" else {}
        if name == "filter" and "normalize" in selected(stages, config, only):
            # One decode per new clip for both stages (an execution detail: same outputs).
            extra = {"prepare": prepare_request(config.normalize)}
        with quiet_subflows():
            results[name] = FLOWS[name](run=run, config=section, store=config.store, **extra)
        log.info("%s (reads %s): %s", name, ", ".join(STAGES[name].reads) or "sources",
                 results[name]["counts"])
    return results


@flow(name="curate", flow_run_name="curate/{run}", log_prints=True)
def curate(run: str = "toy", config: RunConfig = RunConfig(), only: list[str] | None = None) -> dict:
    """Real videos to GT clips: acquire -> filter -> normalize."""
    return _run_stages(CURATE, run, config, only)


@flow(name="pipeline", flow_run_name="pipeline/{run}", log_prints=True)
def pipeline(run: str = "toy", config: RunConfig = RunConfig(), only: list[str] | None = None,
             nproc: int = 1, nnodes: int = 1, node_rank: int = 0, rdzv: str | None = None) -> dict:
    """Every stage in order (or only those named) for `run`; `nproc` processes train on each
    of `nnodes` machines (flows.train: `node_rank`, the c10d rendezvous `rdzv`)."""
    if nnodes > 1 and only != ["train"]:
        raise ValueError("multi-node runs the train stage alone: give only=['train'] (the data "
                         "stages run once, on one machine or a cluster runner)")
    launch = {"nproc": nproc} | ({"nnodes": nnodes, "node_rank": node_rank, "rdzv": rdzv}
                                 if nnodes > 1 else {})
    return _run_stages(ORDER, run, config, only, launch)
