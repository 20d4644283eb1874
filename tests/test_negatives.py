"""negatives: LocalDPO's pinned reconstruction, the masks, and the stage flow on tiny Wan builds
(GT spec of the outputs, several generators sharing prompt embeddings, failed items retried
alone, the real-model configs failing fast offline)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gt_clips import commit_gt_run
from infra.config import GeneratorConfig, LocalCorruptConfig, NegativesConfig, load_config
from infra.stage import input_manifest, stage_dir
from infra.store import Store
from infra.video import probe
from models.tiny import build_tiny
from tasks.negatives import load_generator, reconstruct_masked, sample_mask

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIGS = os.path.join(REPO, "configs")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-wan")
    return {kind: build_tiny(kind, root / kind) for kind in ("t2v", "i2v", "i2v-2.2")}


def generator(tiny: dict, kind: str, name: str = "tiny", **over) -> GeneratorConfig:
    settings = dict(dtype="float32", steps=2, short_edge=32, frames=5) | over
    return GeneratorConfig(name=name, model=tiny[kind], kind=kind, **settings)


# ---------------------------------------------------------------------------------------
# local_corrupt: masks and the pinned reconstruction
# ---------------------------------------------------------------------------------------


def test_masks_stay_in_their_ranges_and_spare_the_i2v_reference_frame():
    cfg = LocalCorruptConfig(masks=(1, 2), size=(0.25, 0.5), span=(0.5, 1.0))
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        mask = sample_mask((6, 8, 16), cfg, g, keep_first=True)
        assert mask.shape == (1, 6, 8, 16) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert mask[0, 0].sum() == 0, "latent frame 0 carries the I2V reference frame"
        assert 0 < mask.mean() < 1
        assert mask[0].any(dim=(1, 2)).sum() <= 5
    t2v = [sample_mask((6, 8, 16), cfg, g, keep_first=False)[0, 0].any() for _ in range(50)]
    assert any(t2v), "without a reference frame, frame 0 may be corrupted too"


@pytest.mark.parametrize("kind", ["t2v", "i2v", "i2v-2.2"])
def test_reconstruction_keeps_the_gt_latent_outside_the_mask_exactly(tiny, kind):
    from models.wan import encode_image, image_condition
    from PIL import Image

    gen = generator(tiny, kind, steps=4)
    pipe = load_generator(gen, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(16, 3, 4, 8, generator=g)
    mask = sample_mask((3, 4, 8), LocalCorruptConfig(), g, keep_first=kind != "t2v")
    embeds, negative = torch.randn(1, 512, 32, generator=g), torch.zeros(1, 512, 32)
    cond = image_embeds = None
    if kind != "t2v":
        image = Image.new("RGB", (64, 32), (180, 40, 90))
        cond = image_condition(pipe.vae, image, 32, 64, 9)
        if kind == "i2v":
            image_embeds = encode_image(pipe.image_encoder, pipe.image_processor, image, "cpu")[None]
    out = reconstruct_masked(pipe, z0, mask, embeds, negative, gen, 0.75, g, cond, image_embeds)
    inside = mask.expand_as(z0).bool()
    assert torch.equal(out[~inside], z0[~inside]), "unmasked latent must be the GT latent, bit for bit"
    assert (out[inside] - z0[inside]).abs().mean() > 1e-3, "the masked region must be regenerated"
    assert torch.isfinite(out).all()


def test_strength_too_low_for_the_steps_is_a_clear_error(tiny):
    gen = generator(tiny, "t2v", steps=2)
    pipe = load_generator(gen, torch.device("cpu"))
    z0, mask = torch.zeros(16, 2, 4, 8), torch.ones(1, 2, 4, 8)
    with pytest.raises(ValueError, match="re-noises nothing"):
        reconstruct_masked(pipe, z0, mask, torch.zeros(1, 512, 32), torch.zeros(1, 512, 32), gen,
                           0.2, torch.Generator())


# ---------------------------------------------------------------------------------------
# The stage flow
# ---------------------------------------------------------------------------------------


def _rows(url: str, run: str) -> tuple[list[dict], dict]:
    return input_manifest(Store(url), run, "negatives")


@pytest.mark.slow
def test_gt_pair_negatives_meet_the_gt_spec_and_share_prompt_embeddings(prefect_api, tiny, tmp_path):
    """Two I2V generators, GT clips at the paper's 81 frames: each adds one negative per clip,
    renormalized to that clip's exact spec; each prompt is embedded once for both."""
    from flows.negatives import negatives

    url = f"file://{tmp_path}/store"
    clips = {c["id"]: c for c in commit_gt_run(url, "gt81", n=3, frames=81)}
    cfg = NegativesConfig(generators=[generator(tiny, "i2v", "a"),
                                      generator(tiny, "i2v", "b", guidance=3.0)])
    entry = negatives("gt81", cfg, url)
    assert entry["counts"] == {"ok": 6, "rejected": 0, "failed": 0}
    rows, _ = _rows(url, "gt81")
    assert sorted(r["generator"] for r in rows) == ["a"] * 3 + ["b"] * 3
    st = Store(url)
    for row in rows:
        gt = clips[row["gt_id"]]
        with st.local_copy(st.key_of(row["video"])) as path:
            info = probe(path, count_frames=True)
        assert (info.width, info.height, info.nb_frames, info.fps, info.pix_fmt) == \
            (gt["width"], gt["height"], 81, 16.0, "yuv420p")
        assert row["bucket"] == gt["bucket"] and row["mode"] == "gt_pair"
        assert row["gen_frames"] == 5 and row["prompt"] == gt["prompt"]
    assert len({r["seed"] for r in rows}) == 6, "seeds are recorded per item"
    texts = glob.glob(f"{tmp_path}/store/cache/encoded/text/*.safetensors")
    assert len(texts) == 3 + 1, "3 prompts + the negative prompt, shared by both generators"


@pytest.mark.slow
def test_a_failed_item_becomes_a_row_and_only_it_is_retried(prefect_api, tiny, tmp_path):
    from flows.negatives import negatives

    url = f"file://{tmp_path}/store"
    clips = commit_gt_run(url, "fail", n=3)
    st = Store(url)
    ref = st.key_of(clips[1]["ref_image"])
    good = st.read_bytes(ref)
    st.write_bytes(ref, b"not a png")  # a bad reference frame: the pipeline cannot start
    cfg = NegativesConfig(generators=[generator(tiny, "i2v")])
    assert negatives("fail", cfg, url)["counts"] == {"ok": 2, "rejected": 0, "failed": 1}
    rows, _ = _rows(url, "fail")
    bad = [r for r in rows if r["status"] == "failed"]
    assert [r["gt_id"] for r in bad] == [clips[1]["id"]]
    assert "UnidentifiedImageError" in bad[0]["reason"] or "cannot identify" in bad[0]["reason"]

    st.write_bytes(ref, good)
    entry = negatives("fail", cfg, url)
    assert entry["counts"] == {"ok": 3, "rejected": 0, "failed": 0}
    success = st.read_success(stage_dir("negatives", entry["key"]))
    assert (success["computed"], success["reused"]) == (1, 2)


@pytest.mark.slow
def test_t2v_batches_fall_back_to_single_clips_when_one_fails(prefect_api, tiny, tmp_path):
    """batch_size 2 groups the two 16:9 clips into one pipeline call; a clip whose prompt
    embedding is unreadable sinks that call, so each clip is retried alone: one fails, the
    other is committed."""
    from flows.negatives import negatives
    from models.wan import WanSpec
    from models.runtime import prompt_key

    url = f"file://{tmp_path}/store"
    clips = commit_gt_run(url, "batch", n=4)  # sizes 16:9, 9:16, 1:1, 16:9
    gen = generator(tiny, "t2v", batch_size=2)
    st = Store(url)
    st.write_bytes(prompt_key(WanSpec("t2v", gen.model, gen.dtype), clips[3]["prompt"]), b"junk")
    entry = negatives("batch", NegativesConfig(generators=[gen]), url)
    assert entry["counts"] == {"ok": 3, "rejected": 0, "failed": 1}
    rows = {r["gt_id"]: r for r in _rows(url, "batch")[0]}
    assert rows[clips[3]["id"]]["status"] == "failed"
    assert clips[3]["id"] in rows[clips[3]["id"]]["reason"]
    assert rows[clips[0]["id"]]["status"] == "ok", "the batch mate is committed on its own"


@pytest.mark.slow
def test_local_corrupt_stores_the_mask_at_latent_and_pixel_resolution(prefect_api, tiny, tmp_path):
    from flows.negatives import negatives
    from tasks.negatives import read_mask

    url = f"file://{tmp_path}/store"
    clips = {c["id"]: c for c in commit_gt_run(url, "local", n=2)}
    cfg = NegativesConfig(mode="local_corrupt",
                          generators=[generator(tiny, "i2v-2.2", frames=None, short_edge=None)])
    assert negatives("local", cfg, url)["counts"]["ok"] == 2
    st = Store(url)
    for row in _rows(url, "local")[0]:
        gt = clips[row["gt_id"]]
        mask = read_mask(st, row["mask"])
        # At the GT clip's own latent grid (local_corrupt works at the GT size and frames).
        assert mask.shape == (1, (gt["frames"] - 1) // 4 + 1, gt["height"] // 8, gt["width"] // 8)
        assert mask[0, 0].sum() == 0 and mask.sum() > 0
        with st.local_copy(st.key_of(row["mask_video"])) as path:
            info = probe(path, count_frames=True)
        assert (info.width, info.height, info.nb_frames) == (gt["width"], gt["height"], gt["frames"])


# ---------------------------------------------------------------------------------------
# Real-model configs, offline and without weights
# ---------------------------------------------------------------------------------------


REAL = {"wan21-i2v-14b-720p.yaml": "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
        "wan21-t2v-14b.yaml": "Wan-AI/Wan2.1-T2V-14B-Diffusers"}


def test_real_configs_hold_the_papers_settings():
    for name, model in REAL.items():
        cfg = load_config(os.path.join(CONFIGS, name))
        assert cfg.negatives.generators[0].model == model == cfg.precompute.model == cfg.train.model
        assert cfg.train.loss.beta == 500 and cfg.train.optimizer.lr == 5e-6
        assert (cfg.train.lora.rank, cfg.train.lora.alpha) == (16, 32)
        assert (cfg.normalize.fps, cfg.normalize.frames, cfg.normalize.short_edge) == (16, 81, 720)


def test_real_configs_fail_at_once_offline_naming_the_model_and_the_fix(tmp_path):
    # HF_HUB_OFFLINE is read when huggingface_hub is imported: a fresh process, an empty cache.
    script = textwrap.dedent("""
        import sys, torch
        from infra.config import load_config
        from flows.precompute import model_config
        from tasks.negatives import load_generator
        for path in sys.argv[1:]:
            cfg = load_config(path)
            for stage, load in [
                ("negatives", lambda: load_generator(cfg.negatives.generators[0], torch.device("cpu"))),
                ("precompute", lambda: model_config.fn(cfg.precompute)),
            ]:
                try:
                    load()
                    print("RESULT", stage, "LOADED")
                except ValueError as e:
                    print("RESULT", stage, " ".join(str(e).split()))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": REPO}
    env.pop("HF_HUB_CACHE", None)
    paths = [os.path.join(CONFIGS, name) for name in REAL]
    done = subprocess.run([sys.executable, "-c", script, *paths], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 4, done.stdout
    for line, model in zip(lines, [m for m in REAL.values() for _ in range(2)]):
        assert model in line and f"hf download {model}" in line and "HF_HOME" in line, line
