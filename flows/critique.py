"""critique flow (Dual-IPO): the critic judges a round's videos, one item per prompt.

The critic's identity (its weights, and its SRPO adapter once it has one) is in every item key;
the judgments (every chain, verdict, vote and seed) are in the manifest, so the pairs stage's
thresholds are re-decided without the VLM. Re-running one round's critique from the UI
(`round`, with overrides such as `critique.critic.chains=7`) reads the round's committed sample
and leaves every other stage as it is.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.dag import STAGES
from flows.stage import StageRun, flow_run_name
from infra.config import CritiqueConfig

STAGE = STAGES["critique"]


@task(name="release-critic", cache_policy=NO_CACHE)
def release_critic() -> None:
    from tasks.critique import release_critic as release

    release()


NO_ADAPTER = "none"  # critic_adapter: the VLM as is, whatever the run refined before


def critic_identity(cfg: CritiqueConfig, store, adapter: str | None) -> dict:
    """The critic's weights (not just its name) and its refined adapter's sha256 (None: none)."""
    from flows.refine import adapter_sha256
    from models.critic import weight_identity

    return {"weights": weight_identity(cfg.critic.model),
            "adapter_sha256": adapter_sha256(store, adapter)}


@flow(name="critique", flow_run_name=flow_run_name("critique"), log_prints=True)
def critique(run: str = "toy", config: CritiqueConfig | None = None,
             store: str = "file://./artifacts", overrides: list[str] | None = None,
             round: int = 1, critic_adapter: str | None = None) -> dict:
    """Judge a Dual-IPO round's videos with the critic.

    Args:
        run: the run's name (runs/<run>/ in the store); the videos come from its sample.r<round>.
        config: this stage's section (ipo.critique); empty = the section the round last used.
        store: artifact store URL (file://... or s3://bucket/prefix).
        overrides: `--set`-style changes, e.g. ["critique.critic.chains=7"].
        round: the round (1..R); its entry in the run index is `critique.r<round>`.
        critic_adapter: store key of the critic's refined adapter (the refine stage's
            `critic_adapter` dir); empty = the run's latest refinement before this round (none:
            the VLM as is); "none" = the VLM as is.
    """
    from flows.refine import recorded_adapter

    s = StageRun(STAGE, run, config, store, overrides, round=round)
    cfg: CritiqueConfig = s.cfg
    if critic_adapter is None:
        critic_adapter = recorded_adapter(s.store, run, round)
    elif critic_adapter == NO_ADAPTER:
        critic_adapter = None
    else:
        critic_adapter = s.store.key_of(critic_adapter)
    groups: dict[str, list[dict]] = {}
    for r in sorted(s.rows("sample"), key=lambda r: (r["gt_id"], r["index"])):
        groups.setdefault(r["gt_id"], []).append(r)
    critic = critic_identity(cfg, s.store, critic_adapter)
    settings = cfg.model_dump(exclude={"workers": True, "human_labels": True,
                                       "critic": {"device"}}) | {"critic_identity": critic}
    human = human_work(s, cfg, settings, round, critic_adapter)
    if entry := s.reuse(settings, [ikey for ikey, _, _ in human]):
        return entry
    work = []
    for gt_id, rows in groups.items():
        videos = [{"id": r["id"], "video": r["video"], "seed": r["seed"]} for r in rows]
        work.append(s.work({"prompt": rows[0]["prompt"], "videos": [v["video"] for v in videos]},
                           settings, f"{gt_id}.r{round}",
                           {"id": f"{gt_id}.r{round}", "source": rows[0]["gt_video"],
                            "gt_id": gt_id, "prompt": rows[0]["prompt"], "round": round,
                            "videos": videos, "critique": cfg.model_dump(),
                            "critic_adapter": critic_adapter}))
    try:
        rows = s.map(work, cfg.workers)
        rows += s.map(human, cfg.workers, fn="tasks.critique:human_item")
    finally:
        release_critic()
    if human:
        agree = [r.get("agrees") for r in rows if r.get("kind") == "human"]
        get_run_logger().info("critique round %s: the critic agrees with %d of %d held-out human "
                              "labels", round, sum(bool(a) for a in agree), len(agree))
    return s.commit(rows)


def human_work(s: StageRun, cfg: CritiqueConfig, settings: dict, round: int,
               critic_adapter: str | None) -> list:
    """One item per held-out human-labelled pair (critique.human_labels), keyed on the pair's
    label and its videos' bytes: with an unchanged critic, later rounds reuse them."""
    if not cfg.human_labels:
        return []
    import hashlib
    from dataclasses import asdict

    from infra.critic_seed import read_seed_pairs

    work = []
    for pair in read_seed_pairs(cfg.human_labels):
        if "://" in pair.video_a or "://" in pair.video_b:
            raise ValueError(f"critique.human_labels {cfg.human_labels!r} pair {pair.id!r}: the "
                             "critic reads local videos; copy them next to the labels file")
        sha_a, sha_b = (hashlib.sha256(Path(v).read_bytes()).hexdigest()
                        for v in (pair.video_a, pair.video_b))
        identity = {"prompt": pair.prompt, "videos": [sha_a, sha_b], "preferred": pair.preferred}
        work.append(s.work(identity, settings, f"human.{pair.id}",
                           {"id": f"human.{pair.id}", "source": pair.video_a,
                            "pair": asdict(pair), "sha_a": sha_a, "sha_b": sha_b,
                            "critique": cfg.model_dump(), "critic_adapter": critic_adapter}))
    return work
