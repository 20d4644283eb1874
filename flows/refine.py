"""refine flow (Dual-IPO's SRPO): the critic's LoRA adapter, refined once per round.

Round 0 fine-tunes a fresh adapter on the human seed pairs (ipo.srpo.seed_data); round r goes on
from the critic that judged round r (its adapter) with PCE-filtered DPO on pseudo-labels from
round r's critique. The output is the stage's manifest (one row per example: its PCE and
whether it was kept, or round 0's seed examples) and the adapter under
`stages/refine/<key>/critic_adapter/`, recorded with its size and sha256. The next round's
critique loads it; its sha256 is in that critique's keys, so a re-refined critic re-judges
and an unchanged one is reused.

Keys: round 0's hold the seed file's rows and its videos' bytes and the fine-tune's settings;
round r's hold the critique it reads (its content digest), the start adapter's sha256 and the
SRPO settings. The critic's weights are in both.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.dag import STAGES, round_entry
from flows.stage import StageRun, flow_run_id, flow_run_name
from infra.config import CriticConfig, SrpoConfig
from infra.stage import stage_dir
from infra.store import Store

STAGE = STAGES["refine"]
ROUND0 = ("seed_data", "seed_steps", "seed_lr", "batch", "seed", "rank", "alpha", "targets",
          "weight_decay")  # what round 0's fine-tune depends on
CRITIC_INPUTS = {"model", "dtype", "frames", "frame_short_edge", "dimensions"}
ROUND_R = ("steps", "batch", "max_pairs", "seed", "beta", "pce_threshold", "lr", "weight_decay")


def adapter_sha256(store: Store, key: str | None) -> str | None:
    """The identity of a critic adapter (store key of its dir): its weights' sha256."""
    if key is None:
        return None
    return hashlib.sha256(store.read_bytes(f"{key}/adapter_model.safetensors")).hexdigest()


def recorded_adapter(store: Store, run: str, round: int) -> str | None:
    """The critic adapter the run's latest refinement before `round` left (refine.r<k>, k <
    round), or None: what a UI re-run of that round's critique or refine judges with."""
    stages = (store.read_run(run) or {}).get("stages") or {}
    for k in range(round - 1, -1, -1):
        if entry := stages.get(round_entry("refine", k)):
            row = store.read_manifest(stage_dir("refine", entry["key"]))[0].to_pylist()
            return next(r["adapter"] for r in row if r["id"] == "adapter")
    return None


def seed_identity(path: str) -> dict:
    """Round 0's data: the seed file's rows and the bytes of every video they name."""
    from dataclasses import asdict

    from infra.critic_seed import read_seed_pairs

    pairs = []
    for pair in read_seed_pairs(path):
        for video in (pair.video_a, pair.video_b):
            if "://" in video:
                raise ValueError(f"ipo.srpo.seed_data {path!r} pair {pair.id!r}: the critic reads "
                                 f"local videos, not {video!r}; copy them next to the seed file")
        pairs.append(asdict(pair) | {
            "video_a": hashlib.sha256(Path(pair.video_a).read_bytes()).hexdigest(),
            "video_b": hashlib.sha256(Path(pair.video_b).read_bytes()).hexdigest()})
    return {"pairs": pairs}


@task(name="refine-critic", cache_policy=NO_CACHE)
def refine_task(store_url: str, out: str, payload: dict) -> dict:
    from tasks.critic_refine import refine_critic

    log = get_run_logger()
    return refine_critic(Store(store_url), out, payload, log.info)


@flow(name="refine", flow_run_name=flow_run_name("refine"), log_prints=True)
def refine(run: str = "toy", config: SrpoConfig | None = None,
           store: str = "file://./artifacts", overrides: list[str] | None = None,
           round: int = 0, critic: CriticConfig | dict | None = None,
           adapter: str | None = None) -> dict:
    """Refine the Dual-IPO critic: round 0 on the human seed pairs, round r on its own votes.

    Args:
        run: the run's name (runs/<run>/ in the store); round r reads its critique.r<r>.
        config: this stage's section (ipo.srpo); empty = the section the round last used.
        store: artifact store URL (file://... or s3://bucket/prefix).
        overrides: `--set`-style changes, e.g. ["refine.steps=100"].
        round: 0 (the seed fine-tune) or the round (1..R) whose chains refine the critic.
        critic: the critic section (ipo.critique.critic); empty = the run's.
        adapter: store key of the critic adapter to go on from; empty = the run's latest
            refinement before this round (round 0 starts a new one).
    """
    s = StageRun(STAGE, run, config, store, overrides, round=round)
    cfg: SrpoConfig = s.cfg
    if critic is None:
        critic = (((s.store.read_run(run) or {}).get("config") or {}).get("ipo") or {}) \
            .get("critique", {}).get("critic")
    if not critic:
        raise ValueError(f"refine for run {run!r}: no critic; pass `critic` (an ipo.critique."
                         "critic section) or record the run's config with an ipo section")
    critic_cfg = CriticConfig.model_validate(critic)
    from models.critic import weight_identity

    payload = {"round": round, "srpo": cfg.model_dump(), "critic": critic_cfg.model_dump()}
    # What the critic's log-probs depend on (not how it samples: round r's chains are in the
    # critique it reads, and round 0 samples nothing).
    settings = {"critic": critic_cfg.model_dump(include=CRITIC_INPUTS) | {
        "weights": weight_identity(critic_cfg.model)}}
    if round == 0:
        if not cfg.seed_data:
            raise ValueError("refine round 0 fine-tunes the critic on ipo.srpo.seed_data, which "
                             "is not set: give a regdpo.critic-seed.v1 file (infra/critic_seed.py)")
        settings |= {k: getattr(cfg, k) for k in ROUND0 if k != "seed_data"} | {
            "seed_data": seed_identity(cfg.seed_data)}
        payload |= {"adapter": None, "seed": cfg.seed_data}
    else:
        if adapter is None:
            adapter = recorded_adapter(s.store, run, round)
        if adapter is None:
            raise ValueError(f"refine round {round} of run {run!r}: the critic has no adapter to "
                             "refine (SRPO's implicit reward is 0 for every chain without one); "
                             "set ipo.srpo.seed_data so round 0 gives it one")
        from tasks.critic_refine import pseudo_labels

        labels = pseudo_labels(s.rows("critique"))
        settings |= {k: getattr(cfg, k) for k in ROUND_R} | {
            "adapter_sha256": adapter_sha256(s.store, adapter)}
        payload |= {"adapter": adapter, "labels": labels}
    if entry := s.reuse(settings):
        return entry | _adapter_row(s.store, s.out)
    result = refine_task(s.store.url, s.out, payload)
    log = get_run_logger()
    if not result["trained"]:
        log.warning("refine round %d: the critic is not refined (%s); it stays as it was",
                    round, result["why"])
    key = result["adapter"]
    if result["trained"]:  # the adapter is the stage's result: its receipts are checked on reuse
        from models.critic import ADAPTER_FILES

        for name in ADAPTER_FILES:
            s.store.record_stored(f"{key}/{name}")
    # What the adapter learnt from: the seed file (round 0) or the critique manifest it read.
    source = payload.get("seed") or s.input("critique")[1]["manifest"]
    row = {"id": "adapter", "source": source, "status": "ok",
           "reason": "", "adapter": key, "adapter_sha256": adapter_sha256(s.store, key),
           "trained": result["trained"], "why": result["why"],
           "metrics": json.dumps(result["metrics"]), "flow_run": flow_run_id(),
           "artifacts": s.store.take_receipts(lambda k: k.startswith(f"{s.out}/critic_adapter/"))}
    entry = s.commit([row, *result["rows"]])
    return entry | _adapter_row(s.store, s.out)


def _adapter_row(store: Store, out: str) -> dict:
    row = next(r for r in store.read_manifest(out)[0].to_pylist() if r["id"] == "adapter")
    return {k: row[k] for k in ("adapter", "adapter_sha256", "trained", "why")}
