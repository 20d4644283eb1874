"""Dual-IPO (arXiv 2502.02088): curate once, fine-tune the critic on the human seed pairs
(round 0, when ipo.srpo.seed_data is set), then R rounds, each one Prefect subflow:

    acquire -> filter -> normalize -> refine (r0) -> [sample -> critique -> refine -> pairs
                                                      (scored) -> precompute -> train -> evaluate] x R

The critic co-evolves with the policy (SRPO): round r's critique judges with the adapter the
latest refinement left, and round r's refine (every ipo.srpo.every rounds, not the last: no
later critique would use it) refines it on round r's own chains for round r+1. Without seed
data the critic judges as it is and is never refined (its implicit reward would be 0).

Round r samples from the base + round r-1's adapter (the base in round 1), trains from that
adapter (train.init_adapter; train.reference says against what), and evaluates the base and
every round's adapter so far on the held-out prompts with the same seeds (rounds as rows).

Every stage of a round is the ordinary stage flow with `round=r`: its run-index entry is
`<stage>.r<r>` (flows/dag.py round_entry), its flow run is named `<stage>/<run>/r<r>`, and it
reads its inputs from the same round. Keys are the stage template's: a round's sample keys hold
the round and the policy's identity, everything downstream digests its inputs' content, so a
killed run started again redoes nothing a round already committed, and one round's critique
re-run from the UI (`round`, `overrides`) reuses every other stage.

A round whose critic keeps none of the rows the train config needs (no verdict clears
ipo.pairs' thresholds: a random-weight critic abstains on every chain) does not train: the
round says so (a warning and `trained: false` with the reason), its policy stays the previous
round's, and evaluate still runs. Verdicts are never made up.
"""

from __future__ import annotations

from collections import Counter

from prefect import flow, get_run_logger

from flows.critique import NO_ADAPTER, critique
from flows.dag import CURATE
from flows.evaluate import evaluate
from flows.pairs import pairs
from flows.precompute import precompute
from flows.refine import refine
from flows.sample import sample
from flows.stage import quiet_subflows
from flows.train import train
from infra.config import ConfigError, RunConfig
from infra.stage import stage_dir
from infra.store import Store

ROUND_STAGES = ("sample", "critique", "precompute", "train", "evaluate")


def refine_due(config: RunConfig, round: int) -> bool:
    """Whether round `round` refines the critic (every ipo.srpo.every rounds; never the last)."""
    srpo = config.ipo.srpo
    return bool(srpo.seed_data) and srpo.every > 0 and round % srpo.every == 0 \
        and round < config.ipo.rounds


def round_pairs_config(config: RunConfig):
    """The run's pairs section in scored mode with the ipo.pairs thresholds (its split)."""
    return config.pairs.model_copy(update={"mode": "scored", "annotated": None,
                                           "scored": config.ipo.pairs})


def untrainable(config: RunConfig, store: Store, precomputed: dict, round: int) -> str | None:
    """Why round `round`'s pre-encoded rows cannot train with config.train (None: they can)."""
    rows = store.read_manifest(stage_dir("precompute", precomputed["key"]))[0].to_pylist()
    counts = Counter(r.get("kind") or "pair" for r in rows if r.get("status") == "ok")
    try:
        config.train.check_rows(dict(counts), f"of round {round} ({precomputed['manifest']})")
    except ConfigError as e:
        return str(e)
    return None


def _stage(fn, **kwargs) -> dict:
    with quiet_subflows():
        return fn(**kwargs)


@flow(name="ipo-round", flow_run_name="ipo-round/{run}/r{round}", log_prints=True)
def ipo_round(run: str, config: RunConfig, round: int, adapter: str | None = None,
              critic_adapter: str | None = None) -> dict:
    """One Dual-IPO round; returns the stages' entries, whether it trained, the policy adapter
    after it (the store key of its adapter, or the previous one when it did not train) and the
    critic's adapter after it (refined, or the one it judged with)."""
    log, store = get_run_logger(), config.store
    ipo, out = config.ipo, {}
    out["sample"] = _stage(sample, run=run, config=ipo.sample, store=store, round=round,
                           policy=config.train, adapter=adapter)
    out["critique"] = _stage(critique, run=run, config=ipo.critique, store=store, round=round,
                             critic_adapter=critic_adapter or NO_ADAPTER)
    if refine_due(config, round):
        out["refine"] = _stage(refine, run=run, config=ipo.srpo, store=store, round=round,
                               critic=ipo.critique.critic, adapter=critic_adapter)
        critic_adapter = out["refine"]["adapter"]
    out["pairs"] = _stage(pairs, run=run, config=round_pairs_config(config), store=store,
                          round=round)
    out["precompute"] = _stage(precompute, run=run, config=config.precompute, store=store,
                               round=round)
    why = untrainable(config, Store(store), out["precompute"], round)
    if why is None:
        tcfg = config.train.model_copy(update={"init_adapter": adapter, "data": None})
        out["train"] = _stage(train, run=run, config=tcfg, store=store, round=round)
        adapter = out["train"]["adapter"]
    else:
        log.warning("round %d does not train: %s. The policy stays %s.", round, why,
                    "round %d's" % (round - 1) if adapter else "the base")
    if config.evaluate is not None:
        out["evaluate"] = _stage(evaluate, run=run, config=config.evaluate, store=store,
                                 round=round)
    for name, entry in out.items():
        log.info("round %d %s: %s", round, name, entry["counts"])
    return {"round": round, "stages": out, "trained": why is None, "why_not_trained": why,
            "adapter": Store(store).key_of(adapter) if adapter else None,
            "critic_adapter": critic_adapter}


@flow(name="ipo", flow_run_name="ipo/{run}", log_prints=True)
def ipo(run: str = "toy", config: RunConfig = RunConfig(), curate: bool = True) -> dict:
    """Dual-IPO: the curation stages (unless `curate` is false: the run's committed normalize
    is used), then config.ipo.rounds rounds, each its own subflow."""
    from flows.pipeline import _run_stages
    from flows.preflight import preflight

    if config.ipo is None:
        raise ValueError("the run config has no `ipo` section: add one (configs/toy-ipo.yaml), "
                         "or run the Reg-DPO pipeline")
    preflight(config, (list(CURATE) if curate else []) + list(ROUND_STAGES))
    Store(config.store).update_run(run, config=config.model_dump(mode="json", exclude={"store"}))
    results: dict = {}
    if curate:
        results |= _run_stages(CURATE, run, config, None)
    adapter = critic_adapter = None
    if config.ipo.srpo.seed_data:
        results["r0"] = {"round": 0, "stages": {"refine": _stage(
            refine, run=run, config=config.ipo.srpo, store=config.store, round=0,
            critic=config.ipo.critique.critic)}}
        critic_adapter = results["r0"]["stages"]["refine"]["adapter"]
    for r in range(1, config.ipo.rounds + 1):
        results[f"r{r}"] = ipo_round(run=run, config=config, round=r, adapter=adapter,
                                     critic_adapter=critic_adapter)
        adapter = results[f"r{r}"]["adapter"]
        critic_adapter = results[f"r{r}"]["critic_adapter"]
    return results
