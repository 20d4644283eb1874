"""The Dual-IPO critic: loading through the real path, the strict verdict parser, majority and
vote share on constructed chains, and seeded, reproducible chains from the tiny Qwen2-VL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from infra.config.critic import CRITIC_DIMENSIONS, CriticConfig
from models.critic import (PAIR_VERDICTS, POINT_VERDICTS, chain_seed, check_available,
                           judge_pair, judge_video, judgment_inputs, load_critic, pair_messages,
                           pair_tally, parse_verdict, response_ids, response_logprobs,
                           sample_chain, tally, video_frames, weight_identity)
from models.tiny import build_tiny_critic
from tests.gt_clips import make_clip


@pytest.fixture(scope="module")
def tiny_critic(tmp_path_factory) -> str:
    return build_tiny_critic(tmp_path_factory.mktemp("tiny_critic"))


def cfg(model: str, **over) -> CriticConfig:
    return CriticConfig(model=model, chains=2, max_new_tokens=12, frames=2, **over)


def frames(color: tuple[int, int, int], n: int = 2) -> list[Image.Image]:
    return [Image.new("RGB", (64, 48), tuple(c // (i + 1) for c in color)) for i in range(n)]


def chain(verdict: str, dims=CRITIC_DIMENSIONS) -> str:
    lines = [f"{d.capitalize()}: video A looks steadier than video B." for d in dims]
    return "\n".join([*lines, f"Verdict: {verdict}"])


# ---------------------------------------------------------------------------------------
# Loading: the tiny critic takes the real path; a missing model names the key and the fix
# ---------------------------------------------------------------------------------------


def test_tiny_critic_loads_through_the_real_loading_code(tiny_critic):
    critic = load_critic(cfg(tiny_critic))
    assert type(critic.model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(critic.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert check_available(tiny_critic) is None
    assert weight_identity(tiny_critic) == weight_identity(tiny_critic)
    inputs = judgment_inputs(critic, pair_messages("a cat", frames((200, 0, 0)),
                                                   frames((0, 0, 200)), CRITIC_DIMENSIONS))
    image_pad = critic.processor.image_token_id
    n_tokens = int((inputs["input_ids"] == image_pad).sum())
    assert inputs["image_grid_thw"].shape[0] == 4  # 2 videos x 2 frames, one image each
    assert n_tokens == int(inputs["image_grid_thw"].prod(-1).sum()) // 4  # merge 2x2


def test_a_repo_that_ships_a_video_processor_config_still_loads(tiny_critic, tmp_path):
    # Newer Qwen2(.5)-VL repos carry the video processor's config (torchvision's); frames need
    # only the image half, and its config must not break the load.
    import json
    import shutil

    repo = Path(shutil.copytree(tiny_critic, tmp_path / "repo"))
    video = {"video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2VLProcessor",
             "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    (repo / "video_preprocessor_config.json").write_text(json.dumps(video))
    image = json.loads((repo / "preprocessor_config.json").read_text())
    (repo / "processor_config.json").write_text(json.dumps(
        {"processor_class": "Qwen2VLProcessor", "image_processor": image, "video_processor": video}))
    critic = load_critic(cfg(str(repo)))
    assert type(critic.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"


def test_a_qwen2_5_vl_critic_judges_and_scores_through_the_same_code(tmp_path):
    critic = load_critic(cfg(build_tiny_critic(tmp_path / "q25", arch="qwen2_5_vl")))
    assert type(critic.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    judgment = judge_pair(critic, "a cat", frames((200, 0, 0)), frames((0, 0, 200)), seed=3)
    assert len(judgment["chains"]) == 4 and judgment["votes"]["abstain"] == 4
    inputs = judgment_inputs(critic, pair_messages("a cat", frames((1, 2, 3)), frames((3, 2, 1)),
                                                   CRITIC_DIMENSIONS))
    with torch.no_grad():
        logp = response_logprobs(critic.model, inputs, [response_ids(critic, chain("A"))],
                                 critic.tokenizer.pad_token_id)
    assert logp.shape == (1,) and torch.isfinite(logp).all() and logp.item() < 0


@pytest.mark.parametrize("model", ["/nonexistent/critic", "nobody-here/no-such-critic"])
def test_a_missing_critic_names_the_key_and_the_fix(model):
    why = check_available(model)
    assert why and "critic.model" in why and model in why
    assert "hf download" in why and "save_pretrained" in why
    with pytest.raises(ValueError, match="critic.model"):
        load_critic(CriticConfig(model=model))


def test_an_unset_critic_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="critic.model is not set"):
        load_critic(CriticConfig())


def test_a_non_qwen2vl_model_is_refused(tmp_path):
    from models.tiny import build_tiny_captioner

    with pytest.raises(ValueError, match="Qwen2-VL-class"):
        load_critic(CriticConfig(model=build_tiny_captioner(tmp_path / "blip")))


# ---------------------------------------------------------------------------------------
# The strict verdict parser
# ---------------------------------------------------------------------------------------


def test_parser_reads_well_formed_chains():
    assert parse_verdict(chain("A"), PAIR_VERDICTS, CRITIC_DIMENSIONS) == ("A", "")
    assert parse_verdict(chain("b."), PAIR_VERDICTS, CRITIC_DIMENSIONS) == ("B", "")
    assert parse_verdict(chain("Good"), POINT_VERDICTS, CRITIC_DIMENSIONS) == ("good", "")


@pytest.mark.parametrize("text, why", [
    ("", "empty chain"),
    ("\x00 ]]garbage ��", "no 'Verdict:' line"),
    (chain("A or B"), "is not one of A, B"),
    (chain("C"), "is not one of A, B"),
    (chain("A") + "\nVerdict: B", "2 'Verdict:' lines"),
    (chain("A") + "\nI changed my mind.", "not the last line"),
    (chain("A", CRITIC_DIMENSIONS[:3]), "no reasoning line for aesthetic quality"),
    (chain("A").replace("video A looks steadier than video B.", ""), "no reasoning line for"),
])
def test_parser_abstains_on_anything_else(text, why):
    verdict, reason = parse_verdict(text, PAIR_VERDICTS, CRITIC_DIMENSIONS)
    assert verdict is None and why in reason


# ---------------------------------------------------------------------------------------
# Majority and vote share on constructed chains
# ---------------------------------------------------------------------------------------


def test_tally_majority_share_ties_and_abstains():
    assert tally(["a", "a", "b", None]) == {"verdict": "a", "vote_share": 0.5,
                                            "votes": {"a": 2, "b": 1, "abstain": 1}}
    assert tally(["a", "b", None, None])["verdict"] is None  # tie: no majority
    assert tally(["a", "b"])["vote_share"] == 0.0
    assert tally([None, None]) == {"verdict": None, "vote_share": 0.0, "votes": {"abstain": 2}}
    assert tally(["good"] * 3 + ["bad"] * 2) == {"verdict": "good", "vote_share": 0.6,
                                                  "votes": {"bad": 2, "good": 3, "abstain": 0}}
    assert tally(["b", None, None, None]) == {"verdict": "b", "vote_share": 0.25,
                                              "votes": {"b": 1, "abstain": 3}}


def test_both_orders_cancel_a_position_bias():
    # A critic that always says "the first one" votes a in order ab and b in order ba: no verdict.
    biased = [{"order": o, "verdict": o[0]} for o in ("ab", "ba") for _ in range(3)]
    result = pair_tally(biased)
    assert result["verdict"] is None and result["votes"] == {"a": 3, "b": 3, "abstain": 0}
    assert result["by_order"]["ab"]["verdict"] == "a" and result["by_order"]["ba"]["verdict"] == "b"
    # A consistent critic prefers b whichever is shown first; one abstain lowers the share.
    chains = ([{"order": "ab", "verdict": "b"}] * 3 + [{"order": "ba", "verdict": "b"}] * 2
              + [{"order": "ba", "verdict": None}])
    result = pair_tally(chains)
    assert result["verdict"] == "b" and result["vote_share"] == pytest.approx(5 / 6)


def test_chain_seeds_are_distinct_and_stable():
    seeds = {chain_seed(7, o, i) for o in ("ab", "ba", "point") for i in range(16)}
    assert len(seeds) == 48 and chain_seed(7, "ab", 0) == chain_seed(7, "ab", 0)
    assert chain_seed(7, "ab", 0) != chain_seed(8, "ab", 0)


# ---------------------------------------------------------------------------------------
# The generate path on the tiny critic: runs, records seeds, reproducible from them
# ---------------------------------------------------------------------------------------


def test_pair_judgment_records_seeds_and_is_reproducible(tiny_critic):
    critic = load_critic(cfg(tiny_critic))
    a, b = frames((220, 30, 30)), frames((30, 30, 220))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    judgment = judge_pair(critic, "a red cat walks on the street", a, b, seed=5)
    assert torch.equal(torch.rand(1), before), "judging moved the caller's RNG"

    chains = judgment["chains"]
    assert [(c["order"], c["index"]) for c in chains] == [("ab", 0), ("ab", 1), ("ba", 0), ("ba", 1)]
    assert [c["seed"] for c in chains] == [chain_seed(5, c["order"], c["index"]) for c in chains]
    assert len({c["text"] for c in chains}) > 1  # sampled, not greedy
    # Random weights write noise: every chain abstains, with its reason; no verdict.
    assert all(c["verdict"] is None and c["abstain"] for c in chains)
    assert judgment["verdict"] is None and judgment["votes"]["abstain"] == 4

    # One chain, regenerated from its recorded seed alone, is the same text.
    third = chains[2]
    inputs = judgment_inputs(critic, pair_messages("a red cat walks on the street", b, a,
                                                   critic.cfg.dimensions))
    assert sample_chain(critic, inputs, third["seed"]) == third["text"]
    assert judge_pair(critic, "a red cat walks on the street", a, b, seed=5) == judgment


def test_point_judgment_on_frames_of_a_real_clip(tiny_critic, tmp_path: Path):
    clip = tmp_path / "clip.mp4"
    make_clip(clip, 96, 64, 1.0, seed=1)
    sampled = video_frames(clip, 3, short_edge=32)
    assert len(sampled) == 3 and sampled[0].size[1] == 32 and sampled[0] != sampled[-1]
    critic = load_critic(cfg(tiny_critic))
    judgment = judge_video(critic, "a clip", sampled, seed=0)
    assert judgment["kind"] == "point" and len(judgment["chains"]) == 2
    assert judgment == judge_video(critic, "a clip", sampled, seed=0)
