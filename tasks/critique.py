"""critique: the Dual-IPO critic judges a round's videos (arXiv 2502.02088; models/critic.py).

One item per GT clip's prompt: every two of its N videos judged pairwise (K chains in each
order, models.critic.judge_pair) and every video judged pointwise (K chains, judge_video). The
item's row holds every judgment as plain data — each chain's order, seed, text, verdict and
abstain reason, the votes, the majority and its vote share — in its `judgments` column (JSON),
so the pairs stage decides its thresholds from the manifest and never runs the VLM again.
A judgment's seed is a digest of (critique.seed, its videos' keys): re-running gives the same
chains, and a new video never moves another judgment's seed.
"""

from __future__ import annotations

import json
import tempfile
from itertools import combinations
from typing import Any

from infra.config import CritiqueConfig
from infra.store import Store, digest
from models.critic import (Critic, fetch_adapter, judge_pair, judge_video, load_critic,
                           video_frames)
from models.runtime import FROZEN


def judgment_seed(seed: int, *videos: str) -> int:
    """The seed of the judgment of `videos` (store keys), independent of every other one."""
    return int(digest([seed, *videos], 15), 16)


def critique_prompt(critic: Any, cfg: CritiqueConfig, prompt: str, videos: list[dict],
                    frames: dict[str, list]) -> list[dict]:
    """Every judgment of one prompt's videos ({id, video}), frames given per video id."""
    judgments = []
    if cfg.pairwise:
        for a, b in combinations(videos, 2):
            j = judge_pair(critic, prompt, frames[a["id"]], frames[b["id"]],
                           judgment_seed(cfg.seed, a["video"], b["video"]))
            judgments.append({"a": a["id"], "b": b["id"]} | j)
    if cfg.pointwise:
        for v in videos:
            j = judge_video(critic, prompt, frames[v["id"]], judgment_seed(cfg.seed, v["video"]))
            judgments.append({"video_id": v["id"]} | j)
    return judgments


def critique_item(store: Store, out_dir: str, payload: dict) -> dict:
    """The critique stage's item: all judgments of one prompt's videos, in its row."""
    cfg = CritiqueConfig.model_validate(payload["critique"])
    critic_cfg = cfg.critic
    videos = payload["videos"]
    frames = {}
    for v in videos:
        with store.local_copy(store.key_of(v["video"])) as local:
            frames[v["id"]] = video_frames(local, critic_cfg.frames, critic_cfg.frame_short_edge)
    with use_critic(store, cfg, payload.get("critic_adapter")) as critic:
        judgments = critique_prompt(critic, cfg, payload["prompt"], videos, frames)
    decided = sum(j["verdict"] is not None for j in judgments)
    chains = [c for j in judgments for c in j["chains"]]
    return {"id": payload["id"], "source": payload["source"], "gt_id": payload["gt_id"],
            "prompt": payload["prompt"], "round": payload["round"],
            "videos": json.dumps(videos), "judgments": json.dumps(judgments),
            "n_judgments": len(judgments), "n_decided": decided, "n_chains": len(chains),
            "n_abstain": sum(c["verdict"] is None for c in chains),
            "critic_adapter": payload.get("critic_adapter"), "status": "ok", "reason": ""}


def human_item(store: Store, out_dir: str, payload: dict) -> dict:
    """One held-out human-labelled pair judged by the critic (both orders, K chains each):
    `agrees` when its majority is the human's choice (no majority, e.g. all abstaining, is a
    miss). The pair's videos are local files (infra/critic_seed.py)."""
    cfg = CritiqueConfig.model_validate(payload["critique"])
    critic_cfg, pair = cfg.critic, payload["pair"]
    frames = [video_frames(pair[k], critic_cfg.frames, critic_cfg.frame_short_edge)
              for k in ("video_a", "video_b")]
    with use_critic(store, cfg, payload.get("critic_adapter")) as critic:
        judgment = judge_pair(critic, pair["prompt"], frames[0], frames[1],
                              judgment_seed(cfg.seed, payload["sha_a"], payload["sha_b"]))
    return {"id": f"human.{pair['id']}", "source": pair["video_a"], "kind": "human",
            "prompt": pair["prompt"], "preferred": pair["preferred"],
            "verdict": judgment["verdict"], "vote_share": judgment["vote_share"],
            "agrees": judgment["verdict"] == pair["preferred"],
            "judgments": json.dumps([judgment]), "status": "ok", "reason": ""}


def load_judge(store: Store, cfg: CritiqueConfig, adapter: str | None) -> Critic:
    """The critic with the refine stage's adapter at store key `adapter` (None: the VLM as is)."""
    if adapter is None:
        return load_critic(cfg.critic)
    with tempfile.TemporaryDirectory(prefix="regdpo-critic-") as tmp:
        return load_critic(cfg.critic, adapter=fetch_adapter(store, adapter, tmp))  # read now


def use_critic(store: Store, cfg: CritiqueConfig, adapter: str | None):
    """The process's one loaded critic for (model, dtype, device, adapter), loaded once."""
    c = cfg.critic
    key = ("critic", c.model, c.dtype, c.device, adapter)
    return FROZEN.use(key, lambda: load_judge(store, cfg, adapter))


def release_critic() -> None:
    FROZEN.release()
