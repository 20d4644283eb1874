"""Dual-IPO rounds with an I2V policy (issue 14: "T2V first; I2V through the same code"): the
same flows as tests/test_ipo.py's rounds test, with a tiny Wan2.1 I2V model as train.model.
What I2V adds is checked: every sampled video is generated from its GT clip's reference frame,
the pre-encoded rows carry that frame's conditioning, and the adapter trains the image K/V."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.gt_clips import commit_gt_run
from tests.test_ipo import _constructed_judgments, _ipo_config


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    from models.tiny import build_tiny, build_tiny_critic

    root = tmp_path_factory.mktemp("ipo-i2v-models")
    return {"wan": build_tiny("i2v", root / "wan"), "critic": build_tiny_critic(root / "critic")}


def _i2v_config(models: dict, url: str):
    """tests/test_ipo.py's rounds config (same tiny sizes) with the I2V model as the policy."""
    from infra.config import RunConfig

    data = _ipo_config(models, url).model_dump(mode="json")
    data["train"]["kind"] = data["precompute"]["kind"] = "i2v"
    return RunConfig.model_validate(data)


def _regenerate(st, pipe, row: dict, cfg, ref_image: str) -> bytes:
    """The bytes of `row`'s video made again by `pipe` from its recorded seed and prompt,
    conditioned on `ref_image`, renormalized to its GT clip's spec as the sample stage does."""
    from infra.config import NormalizeConfig
    from infra.gtspec import renormalize
    from infra.video import reference_image
    from tasks.sample import sample_video

    size = (row["gen_width"], row["gen_height"], row["gen_frames"])
    frames = sample_video(pipe, "i2v", row["prompt"], reference_image(st, ref_image), row["seed"],
                          size, cfg.ipo.sample)
    clip = {k: row[k] for k in ("bucket", "width", "height", "fps", "frames")}
    gt = NormalizeConfig(frames=17, short_edge=32, preset="ultrafast")  # commit_gt_run's spec
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "v.mp4")
        renormalize(frames, clip, gt, path)
        return Path(path).read_bytes()


@pytest.mark.slow
def test_i2v_rounds_condition_on_the_reference_frame_and_train_from_the_previous_adapter(
        prefect_api, models: dict, tmp_path: Path, monkeypatch):
    """Two I2V rounds with verdicts (tests/test_ipo.py's constructed judge): each sampled video
    is the policy's output for its GT clip's reference frame (another clip's frame gives other
    bytes), round 2 samples from round 1's adapter, precompute encodes the reference frame's
    first-frame condition and CLIP tokens, and both rounds train an i2v adapter."""
    from safetensors.torch import load as load_safetensors

    import tasks.critique
    from flows.ipo import ipo
    from infra.stage import input_manifest
    from infra.store import Store
    from infra.video import reference_image
    from models import wan
    from tasks.sample import load_policy

    monkeypatch.setattr(tasks.critique, "critique_prompt", _constructed_judgments)
    calls = []  # (seed, the reference frame's pixels, the policy's active adapters)
    generate = wan.generate_video

    def spy(pipe, prompt, seed, size, **kwargs):
        image = kwargs.get("image")
        calls.append((seed, None if image is None else np.asarray(image),
                      tuple(pipe.get_active_adapters())))
        return generate(pipe, prompt, seed, size, **kwargs)

    monkeypatch.setattr(wan, "generate_video", spy)
    url = f"file://{tmp_path / 'store'}"
    st = Store(url)
    gt = {r["id"]: r for r in commit_gt_run(url, "v", n=3, frames=17, short_edge=32)}
    cfg = _i2v_config(models, url)

    results = ipo(run="v", config=cfg, curate=False)
    index = st.read_run("v")["stages"]
    assert results["r1"]["trained"] and results["r2"]["trained"]
    a1, a2 = results["r1"]["adapter"], results["r2"]["adapter"]
    sha1 = hashlib.sha256(st.read_bytes(a1)).hexdigest()

    # Sample: every video from its GT clip's reference frame; round 2 from round 1's adapter.
    rows = {r: input_manifest(st, "v", "sample", f"sample.r{r}")[0] for r in (1, 2)}
    assert [len(rows[r]) for r in (1, 2)] == [6, 6]
    assert all(r["ref_image"] == gt[r["gt_id"]]["ref_image"] for r in rows[1] + rows[2])
    assert {r["adapter_sha256"] for r in rows[1]} == {None}
    assert {r["adapter_sha256"] for r in rows[2]} == {sha1}
    sampled = {seed: (image, adapters) for seed, image, adapters in calls
               if seed in {r["seed"] for r in rows[1] + rows[2]}}
    assert len(sampled) == 12
    for r in rows[1] + rows[2]:
        image, adapters = sampled[r["seed"]]
        assert np.array_equal(image, np.asarray(reference_image(st, r["ref_image"])))
        assert adapters == (() if r["round"] == 1 else ("policy",))
    # ... and the stored video is that conditioning's output: made again from its seed it is
    # byte for byte the same; from another clip's reference frame it is not.
    row = rows[2][0]
    other = next(c["ref_image"] for c in gt.values() if c["id"] != row["gt_id"])
    stored = st.read_bytes(row["video"])
    pipe = load_policy(st, {"kind": "i2v", "model": models["wan"], "dtype": "float32",
                            "adapter": a1}, torch.device("cpu"))
    assert _regenerate(st, pipe, row, cfg, row["ref_image"]) == stored
    assert _regenerate(st, pipe, row, cfg, other) != stored

    # Precompute: every train row carries its reference frame's I2V conditioning.
    pre, _ = input_manifest(st, "v", "precompute", "precompute.r2")
    ok = [r for r in pre if r["status"] == "ok"]
    assert {r.get("kind") or "pair" for r in ok} == {"pair", "pointwise", "real"}
    spec = wan.WanSpec("i2v", models["wan"], "float32")
    encoder, processor = wan.load_image_encoder(spec)
    vae = wan.load_vae(spec)
    for r in ok:
        tensors = load_safetensors(st.read_bytes(st.key_of(r["latents"])))
        latent = tensors["win" if "win" in tensors else "latent"]
        image = reference_image(st, gt[r["gt_id"]]["ref_image"])
        cond = wan.image_condition(vae, image, r["encode_height"], r["encode_width"],
                                   r["encode_frames"])
        assert cond.shape == (4 + 16, *latent.shape[1:])  # mask + first-frame latent
        torch.testing.assert_close(tensors["cond"], cond)
        torch.testing.assert_close(tensors["image_embeds"],
                                   wan.encode_image(encoder, processor, image, "cpu"))

    # Train: the i2v kind, round 2 from round 1's adapter, the image K/V projections trained.
    assert index["train.r1"]["config"]["kind"] == index["train.r2"]["config"]["kind"] == "i2v"
    assert index["train.r2"]["config"]["init_adapter"] == a1
    assert st.read_bytes(a2) != st.read_bytes(a1)
    # The CLIP tokens reach the loss: the LoRA of the image K/V projections moved off zero.
    for a in (a1, a2):
        weights = load_safetensors(st.read_bytes(a))
        for proj in ("add_k_proj", "add_v_proj"):
            lora_b = [w for k, w in weights.items() if f"{proj}.lora_B" in k]
            assert lora_b and any(w.abs().max() > 0 for w in lora_b)
    videos, _ = input_manifest(st, "v", "evaluate", "evaluate.r2")
    assert {r["model"] for r in videos} == {"base", "r1", "r2"}
