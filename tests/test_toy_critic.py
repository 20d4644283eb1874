"""The toy Dual-IPO critic and its seed data: build_tiny_critic(answers=True) writes chains the
strict parser counts as votes (uninformed ones), and `regdpo toy-data`'s critic-seed/ files
are valid regdpo.critic-seed.v1 pairs of a clean clip against a visibly degraded copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from infra.config.critic import CriticConfig
from infra.critic_seed import read_seed_pairs
from models.critic import judge_pair, judge_video, load_critic, video_frames


@pytest.fixture(scope="module")
def seed_dir(toy_dir: Path) -> Path:
    return toy_dir / "critic-seed"  # make_critic_seed, through make_toy_data


@pytest.fixture(scope="module")
def answering_critic(toy_dir: Path) -> str:
    # build_tiny_critic(answers=True), through make_toy_models; the conftest fixture also
    # checks that building it leaves the caller's RNG alone.
    return str(toy_dir / "models" / "tiny-critic")


def test_the_answering_critic_writes_chains_that_parse(answering_critic, seed_dir):
    critic = load_critic(CriticConfig(model=answering_critic, chains=3, max_new_tokens=64,
                                      frames=2, frame_short_edge=28))
    pair = read_seed_pairs(seed_dir / "seed.csv")[0]
    a, b = (video_frames(v, 2, 28) for v in (pair.video_a, pair.video_b))
    chains, pair_verdicts = [], []
    for seed in range(2):
        judgment = judge_pair(critic, pair.prompt, a, b, seed=seed)
        assert len(judgment["chains"]) == 6
        pair_verdicts += [c["verdict"] for c in judgment["chains"]]
        chains += judgment["chains"] + judge_video(critic, pair.prompt, a, seed=seed)["chains"]
    abstains = [c for c in chains if c["verdict"] is None]
    # Measured with seed 0: 0 of these 18 chains abstain (1 of 27 on other frames and prompts).
    assert len(abstains) <= len(chains) // 6, [c["abstain"] for c in abstains]
    assert {"a", "b"} <= set(pair_verdicts), "the verdict should be a coin flip between chains"
    point = [c["verdict"] for c in chains if c["order"] == "point"]
    assert set(point) - {None} <= {"good", "bad"} and set(point) != {None}
    assert len({c["text"] for c in chains}) > 2  # sampled phrasings, not one chain repeated


def test_the_seed_files_are_balanced_pairs_of_a_clean_and_a_degraded_clip(seed_dir):
    seed, heldout = (read_seed_pairs(seed_dir / name) for name in ("seed.csv", "heldout.csv"))
    assert (len(seed), len(heldout)) == (6, 4)
    assert not {p.id for p in seed} & {p.id for p in heldout}
    for pairs in (seed, heldout):
        prefs = [p.preferred for p in pairs]
        assert prefs.count("a") == prefs.count("b")
        for p in pairs:
            clean, bad = (p.video_a, p.video_b) if p.preferred == "a" else (p.video_b, p.video_a)
            assert clean.endswith("-clean.mp4") and not bad.endswith("-clean.mp4")
            assert Path(clean).parent == seed_dir / "videos"
            assert p.rationale and p.notes
            frames = [np.stack([np.asarray(f, dtype=float) for f in video_frames(v, 4, 90)])
                      for v in (clean, bad)]
            assert frames[0].shape == frames[1].shape == (4, 90, 160, 3)
            # Measured: 7 (stutter) to 122 (negative); the same clip twice: 0.
            assert np.abs(frames[0] - frames[1]).mean() > 5, f"{bad} is hardly degraded"
    # Relative paths: the folder can move.
    assert "videos/" in (seed_dir / "seed.csv").read_text().splitlines()[1]
