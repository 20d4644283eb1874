"""precompute: encodings equal to what the diffusers pipelines feed the transformer, and the
whole path GT clips -> negatives -> pairs -> precompute into a dataset the trainer opens,
validates and trains on, for every tiny Wan kind."""

from __future__ import annotations

import glob

import pytest
import torch
from PIL import Image

from gt_clips import commit_gt_run
from infra.config import GeneratorConfig, NegativesConfig, PairsConfig, PrecomputeConfig
from infra.stage import input_manifest, stage_dir
from infra.store import Store
from models import tiny as tiny_models, wan
from tasks.pairs import split_of


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-wan")
    return {kind: tiny_models.build_tiny(kind, root / kind) for kind in ("t2v", "i2v", "i2v-2.2")}


# ---------------------------------------------------------------------------------------
# The encodings are the pipelines' own
# ---------------------------------------------------------------------------------------


def test_i2v_condition_and_clip_tokens_equal_what_the_pipeline_feeds_the_transformer(tiny):
    spec = wan.WanSpec("i2v", tiny["i2v"], "float32")
    pipe = wan.load_generator(spec)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(torch.randint(0, 255, (32, 64, 3), dtype=torch.uint8).numpy())
    seen: list[dict] = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    embeds = torch.randn(1, wan.TEXT_LEN, tiny_models.TINY_TEXT_DIM)
    pipe(image=image, prompt_embeds=embeds, negative_prompt_embeds=embeds, height=32, width=64,
         num_frames=9, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    fed = seen[0]
    cond = wan.image_condition(pipe.vae, image, 32, 64, 9)
    assert cond.shape == (20, 3, 4, 8)
    assert torch.allclose(fed["hidden_states"][0, 16:], cond, atol=1e-6)
    clip = wan.encode_image(pipe.image_encoder, pipe.image_processor, image, "cpu")
    assert torch.allclose(fed["encoder_hidden_states_image"][0], clip, atol=1e-6)


def test_video_latents_are_normalized_as_the_pipeline_normalizes_its_condition(tiny):
    # Wan's VAE is causal: latent frame 0 depends on pixel frame 0 only, so a clip's first
    # latent frame must equal the pipeline's (z - mean) / std latent of that frame.
    vae = wan.load_vae(wan.WanSpec("i2v", tiny["i2v"], "float32"))
    frames = torch.randint(0, 255, (9, 32, 64, 3), dtype=torch.uint8)
    latent = wan.encode_video(vae, frames)
    cond = wan.image_condition(vae, Image.fromarray(frames[0].numpy()), 32, 64, 9)
    assert latent.shape == (16, 3, 4, 8)
    assert torch.allclose(latent[:, 0], cond[4:, 0], atol=1e-5)
    assert not torch.allclose(latent[:, 1], cond[4:, 1], atol=1e-3)  # zero frames there
    decoded = wan.decode_latent(vae, latent)
    assert decoded.shape == frames.shape and decoded.dtype == torch.uint8


def test_prompt_embeddings_are_padded_to_512_tokens_with_zeros(tiny):
    encoder, tokenizer = wan.load_text_encoder(wan.WanSpec("t2v", tiny["t2v"], "float32"))
    embeds = wan.encode_prompts(encoder, tokenizer, ["a cat", "a red dog runs on the beach"], "cpu")
    assert embeds.shape == (2, wan.TEXT_LEN, tiny_models.TINY_TEXT_DIM)
    used = [len(tokenizer(p).input_ids) for p in ("a cat", "a red dog runs on the beach")]
    for row, n in zip(embeds, used):
        assert row[:n].abs().sum(dim=1).gt(0).all() and not row[n:].any()


def test_encoders_that_cannot_feed_the_model_fail_before_any_work(tiny):
    from flows.precompute import model_config

    with pytest.raises(ValueError, match="does not fit kind 'i2v'.*in_channels=16, image_dim=None"):
        model_config.fn(PrecomputeConfig(model=tiny["t2v"], kind="i2v", dtype="float32"))
    assert model_config.fn(PrecomputeConfig(model=tiny["i2v"], kind="i2v"))["image_dim"] == 32


# ---------------------------------------------------------------------------------------
# End to end: GT clips -> ... -> a dataset the trainer reads
# ---------------------------------------------------------------------------------------

CASES = {  # kind: (negatives mode, pairs mode, precompute short edge)
    "t2v": ("local_corrupt", "local", None),
    "i2v": ("gt_pair", "gt_pair", 32),
    "i2v-2.2": ("gt_pair", "gt_pair", None),
}


@pytest.fixture(scope="module")
def chains(prefect_api, tiny, tmp_path_factory):
    """kind -> (store URL, committed precompute entry), each chain run once per module."""
    done: dict[str, tuple[str, dict]] = {}

    def get(kind: str) -> tuple[str, dict]:
        if kind not in done:
            url = f"file://{tmp_path_factory.mktemp(kind)}/store"
            done[kind] = (url, _chain(tiny, kind, url))
        return done[kind]

    return get


def _chain(tiny: dict, kind: str, url: str) -> dict:
    from flows.negatives import negatives
    from flows.pairs import pairs
    from flows.precompute import precompute

    neg_mode, pair_mode, short_edge = CASES[kind]
    gts = commit_gt_run(url, kind, n=4, short_edge=48)
    # local_corrupt reconstructs at the GT clip's own size and frames; gt_pair generates small.
    small = {} if neg_mode == "local_corrupt" else dict(short_edge=32, frames=9)
    gens = [GeneratorConfig(name=f"g{i}", model=tiny[kind], kind=kind, dtype="float32", steps=2,
                            guidance=4.0 + i, **small)
            for i in range(1 if neg_mode == "local_corrupt" else 2)]
    negatives(kind, NegativesConfig(mode=neg_mode, generators=gens), url)
    # A split seed that holds out exactly one of the four clips.
    seed = next(s for s in range(100)
                if [split_of(c["id"], 0.25, s) for c in gts].count("test") == 1)
    pairs(kind, PairsConfig(mode=pair_mode, test_fraction=0.25, split_seed=seed), url)
    cfg = PrecomputeConfig(model=tiny[kind], kind=kind, dtype="float32", short_edge=short_edge)
    return precompute(kind, cfg, url)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_gt_clips_become_a_dataset_the_trainer_validates(chains, tiny, kind):
    from infra.pairs_format import PairsDataset
    from models.wan import transformer_config

    url, entry = chains(kind)
    root = url.removeprefix("file://")
    st = Store(url)
    pair_rows, _ = input_manifest(st, kind, "pairs")
    test = [r for r in pair_rows if r["split"] == "test"]
    train = [r for r in pair_rows if r["split"] == "train"]
    assert len(test) == 1 and test[0]["win"] is None and test[0]["ref_image"]
    assert test[0]["gt_id"] not in {r["gt_id"] for r in train}
    per_clip = 1 if kind == "t2v" else 2
    assert len(train) == 3 * per_clip and entry["counts"]["ok"] == len(train)

    dataset = PairsDataset.open(st, stage_dir("precompute", entry["key"]))
    model = transformer_config(wan.WanSpec(kind, tiny[kind], "float32"))
    dataset.validate(model, need_mask=kind == "t2v", batch_size=1)
    header = dataset.header(0)
    height = 32 if CASES[kind][2] else 48  # the train resolution, or the GT's
    assert header["win"][1][2] == height // 8 or header["win"][1][3] == height // 8
    assert header["win"][1][1] == (17 - 1) // 4 + 1  # all 17 GT frames
    assert ("cond" in header) == (kind != "t2v") and ("image_embeds" in header) == (kind == "i2v")
    assert ("mask" in header) == (kind == "t2v")

    # Content addressing: each distinct video once (3 train GT clips + their negatives) and
    # each prompt once, though every GT clip is the winner of `per_clip` pairs.
    latents = glob.glob(f"{root}/cache/encoded/latent/*.safetensors")
    assert len(latents) == 3 + 3 * per_clip
    texts = glob.glob(f"{root}/cache/encoded/text/*.safetensors")
    assert len(texts) == 4 + 1  # 4 prompts + the generators' one negative prompt
    if kind == "i2v":
        assert len(glob.glob(f"{root}/cache/encoded/clip/*")) == 3
        assert len(glob.glob(f"{root}/cache/encoded/cond/*")) == 3


@pytest.mark.slow
def test_a_short_training_run_on_precomputed_local_pairs(chains, tiny):
    from infra.config import TrainConfig
    from tasks.train import Trainer
    from models.wan import lora_parameters

    url, entry = chains("t2v")
    cfg = TrainConfig(model=tiny["t2v"], kind="t2v", dtype="float32", steps=2,
                      data=stage_dir("precompute", entry["key"]),
                      loss={"kind": "region"}, lora={"rank": 4, "alpha": 8},
                      optimizer={"lr": 1e-3, "weight_decay": 0.0}, device="cpu")
    trainer = Trainer(cfg, Store(url), "runs/t2v/train")
    before = [p.detach().clone() for p in lora_parameters(trainer.transformer)]
    result = trainer.train()
    assert result["steps"] == 2
    after = lora_parameters(trainer.transformer)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


def test_region_mask_keeps_its_time_span_on_a_shorter_smaller_encode():
    """precompute.frames keeps the first GT frames: latent frame i is the same time span on both
    grids, so the mask is cut (not stretched) in time and resized in space."""
    from tasks.precompute import resample_mask

    mask = torch.zeros(1, 5, 8, 8)
    mask[:, 1, :4, :4] = 1  # one box, in latent frame 1 only
    small = resample_mask(mask, (16, 2, 4, 4))
    assert small.shape == (1, 2, 4, 4)
    assert small[0, 0].sum() == 0 and torch.equal(small[0, 1], torch.tensor(
        [[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="fewer frames"):
        resample_mask(mask, (16, 6, 8, 8))


def test_local_corrupt_refuses_a_reduced_size_or_frame_count():
    from infra.config import NegativesConfig

    with pytest.raises(ValueError, match="GT clip's own size and frame count"):
        NegativesConfig(mode="local_corrupt",
                        generators=[GeneratorConfig(name="g", frames=9)])
