"""models/wan.py: tiny builds load through the real loaders, missing weights fail at once,
and the LoRA policy / reference pair shares one copy of the weights."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
)
from PIL import Image

from models.wan import (
    DEFAULT_TARGETS,
    TEXT_LEN,
    WAN21_I2V_14B_720P,
    WAN21_T2V_14B,
    WAN22_I2V_A14B,
    WanSpec,
    add_lora,
    empty_transformer,
    load_image_encoder,
    load_pipeline,
    load_scheduler,
    load_text_encoder,
    load_transformer,
    load_vae,
    lora_parameters,
    reference_mode,
    save_lora,
    training_scheduler,
)
from models.tiny import build_tiny

KINDS = ("t2v", "i2v", "i2v-2.2")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("wan")
    return {kind: build_tiny(kind, root / kind) for kind in KINDS}


def _inputs(transformer, seed: int = 0) -> dict:
    """Random transformer inputs: 2 latent frames of 8x8 (16 tokens each after 2x2 patches)."""
    cfg, dtype = transformer.config, transformer.dtype
    g = torch.Generator().manual_seed(seed)
    image = None
    if cfg.image_dim is not None:  # 17 CLIP tokens of the tiny image encoder
        image = torch.randn(1, 17, cfg.image_dim, generator=g).to(dtype)
    return dict(
        hidden_states=torch.randn(1, cfg.in_channels, 2, 8, 8, generator=g).to(dtype),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, TEXT_LEN, cfg.text_dim, generator=g).to(dtype),
        encoder_hidden_states_image=image,
        return_dict=False,
    )


def _predict(transformer, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs)[0]


def _perturb_lora(transformer, seed: int = 1) -> None:
    """Random A and B: a trained-looking adapter (B starts at zero, i.e. a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(transformer):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ---------------------------------------------------------------------------------------
# Tiny builds through the real loaders
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_pipeline_loads_and_generates_frames(tiny: dict[str, str], kind: str) -> None:
    pipe = load_pipeline(WanSpec(kind, tiny[kind], dtype="float32"))
    assert isinstance(pipe, WanPipeline if kind == "t2v" else WanImageToVideoPipeline)
    assert (pipe.transformer.config.image_dim is not None) == (kind == "i2v")
    if kind != "t2v":
        assert (pipe.image_encoder is not None) == (kind == "i2v")  # Wan2.2: no CLIP
        assert (pipe.transformer_2 is not None) == (kind == "i2v-2.2")  # Wan2.2: two experts

    call = dict(prompt="a cat walks on the beach", height=48, width=64, num_frames=5,
                num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    if kind != "t2v":
        call["image"] = Image.new("RGB", (64, 48), (200, 40, 10))
    frames = pipe(**call).frames

    assert frames.shape == (1, 5, 48, 64, 3)  # (batch, 4k+1 frames, H, W, RGB)
    assert np.isfinite(frames).all()


def test_build_tiny_is_seeded_and_leaves_global_rng_alone(tmp_path: Path) -> None:
    rng = torch.random.get_rng_state()
    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b, c = (Path(build_tiny("t2v", tmp_path / name, seed=s)) for name, s in
               (("a", 0), ("b", 0), ("c", 1)))

    assert torch.equal(torch.random.get_rng_state(), rng)
    assert (a / weights).read_bytes() == (b / weights).read_bytes()
    assert (a / weights).read_bytes() != (c / weights).read_bytes()


def test_each_loader_loads_only_its_component(tiny: dict[str, str], tmp_path: Path) -> None:
    shutil.copytree(Path(tiny["i2v"]) / "transformer", tmp_path / "transformer")
    spec = WanSpec("i2v", str(tmp_path), dtype="float32")

    assert load_transformer(spec).config.in_channels == 36
    for loader, component in ((load_vae, "vae"), (load_text_encoder, "tokenizer"),
                              (load_image_encoder, "image_processor"),
                              (load_pipeline, "model_index.json")):
        with pytest.raises(ValueError, match=re.escape(f"'{component}' of model '{tmp_path}'")):
            loader(spec)


def test_image_encoder_is_wan21_i2v_only(tiny: dict[str, str]) -> None:
    encoder, _ = load_image_encoder(WanSpec("i2v", tiny["i2v"]))
    assert encoder.dtype == torch.float32
    for kind in ("t2v", "i2v-2.2"):
        with pytest.raises(ValueError, match="no CLIP image encoder"):
            load_image_encoder(WanSpec(kind, tiny[kind]))


def test_schedulers(tiny: dict[str, str]) -> None:
    spec = WanSpec("t2v", tiny["t2v"])
    inference = load_scheduler(spec)
    assert isinstance(inference, UniPCMultistepScheduler) and inference.config.use_flow_sigmas

    u = torch.linspace(1.0, 1e-3, 1000)  # unshifted sigma = t / 1000
    for shift, expected in ((None, inference.config.flow_shift), (5.0, 5.0)):
        train = training_scheduler(spec, shift)
        assert isinstance(train, FlowMatchEulerDiscreteScheduler)
        assert train.config.shift == expected
        assert torch.allclose(train.sigmas, expected * u / (1 + (expected - 1) * u), atol=1e-6)


def test_transformer_of_another_kind_is_refused(tiny: dict[str, str]) -> None:
    for kind, model in (("i2v", "t2v"), ("t2v", "i2v"), ("i2v", "i2v-2.2"), ("i2v-2.2", "i2v")):
        with pytest.raises(ValueError, match=f"does not fit kind '{kind}'"):
            load_transformer(WanSpec(kind, tiny[model]))


def test_spec_rejects_unknown_kind_and_dtype() -> None:
    with pytest.raises(ValueError, match="kind 'v2v'"):
        WanSpec("v2v", WAN21_T2V_14B)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype 'bf16'"):
        WanSpec("t2v", WAN21_T2V_14B, dtype="bf16")


# ---------------------------------------------------------------------------------------
# Missing weights: a clear error at once
# ---------------------------------------------------------------------------------------

_LOADERS = ("load_transformer", "load_vae", "load_text_encoder", "load_image_encoder",
            "load_scheduler", "training_scheduler", "load_pipeline")


def test_missing_local_folder_fails_at_once(tmp_path: Path) -> None:
    import models.wan as wan

    spec = WanSpec("i2v", str(tmp_path / "no-such-model"))
    for name in _LOADERS:
        with pytest.raises(ValueError) as err:
            getattr(wan, name)(spec)
        message = str(err.value)
        assert spec.model in message and "diffusers layout" in message, (name, message)


def test_hub_id_offline_without_cache_fails_at_once(tmp_path: Path) -> None:
    # HF_HUB_OFFLINE is read when huggingface_hub is imported: a fresh process, an empty cache.
    script = textwrap.dedent("""
        import json, sys
        import models.wan as wan
        for name, kind, model in json.loads(sys.argv[1]):
            try:
                getattr(wan, name)(wan.WanSpec(kind, model))
                message = None
            except ValueError as e:
                message = str(e)
            print(json.dumps([name, model, message]))
    """)
    cases = [[name, "i2v", WAN21_I2V_14B_720P] for name in _LOADERS]
    cases += [["load_pipeline", "t2v", WAN21_T2V_14B], ["load_pipeline", "i2v-2.2", WAN22_I2V_A14B]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(results) == len(cases)
    # Failing "at once" = no download retries: the whole subprocess is bounded by its timeout.
    for name, model, message in results:
        assert message is not None, f"{name}({model}) did not fail"
        assert model in message and f"hf download {model}" in message and "HF_HOME" in message
    components = {name: message.split("'")[1] for name, _, message in results}
    assert components["load_transformer"] == "transformer"
    assert components["load_image_encoder"] == "image_processor"
    assert components["load_vae"] == "vae"


# ---------------------------------------------------------------------------------------
# LoRA: policy = base + adapter; reference = the same module with the adapter disabled
# ---------------------------------------------------------------------------------------


def test_add_lora_defaults_train_only_the_adapter(tiny: dict[str, str]) -> None:
    transformer = load_transformer(WanSpec("i2v", tiny["i2v"]))  # bfloat16, like the real run
    add_lora(transformer)

    config = transformer.peft_config["default"]
    assert (config.r, config.lora_alpha) == (16, 32)
    params = dict(transformer.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    assert trainable and trainable == {name for name in params if "lora_" in name}
    assert all(p.dtype == torch.float32 for p in lora_parameters(transformer))
    adapted = {name.split(".lora_")[0] for name in trainable}
    for block in range(transformer.config.num_layers):  # every target, in every block
        for target in DEFAULT_TARGETS:
            attn = "attn2" if target.startswith("add_") else "attn1"
            module = target if target.startswith("ffn") else f"{attn}.{target}"
            assert f"blocks.{block}.{module}" in adapted, module

    transformer(**_inputs(transformer))[0].float().square().mean().backward()
    assert all(p.grad is not None for p in lora_parameters(transformer))
    assert all(p.grad is None for name, p in params.items() if name not in trainable)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_empty_transformer_is_load_transformer_without_weights(tiny: dict[str, str],
                                                              dtype: str) -> None:
    """What sharded loading builds on (infra.sharded_load): the loaded model's names, shapes and
    dtypes (float32 kept where diffusers keeps it), its rope buffers, and, after the same seed,
    the same adapter, on the CPU."""
    spec = WanSpec("i2v", tiny["i2v"], dtype=dtype)
    torch.manual_seed(5)
    loaded = load_transformer(spec)
    add_lora(loaded, rank=4, alpha=8)
    torch.manual_seed(5)
    empty = empty_transformer(spec)
    add_lora(empty, rank=4, alpha=8)

    def layout(model: torch.nn.Module) -> dict[str, tuple]:
        return {n: (p.shape, p.dtype) for n, p in model.named_parameters()}

    assert layout(empty) == layout(loaded)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32, spec.torch_dtype}
    assert all(p.is_meta for n, p in empty.named_parameters() if "lora_" not in n)
    assert not empty.training
    assert all(torch.equal(a, b) for a, b in zip(empty.buffers(), loaded.buffers(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(lora_parameters(empty), lora_parameters(loaded),
                                                 strict=True))
    assert lora_parameters(loaded)[0].abs().sum() > 0  # A drawn, not left at zero


def test_reference_mode_is_the_base_model_without_a_copy(tiny: dict[str, str]) -> None:
    transformer = load_transformer(WanSpec("t2v", tiny["t2v"], dtype="float32"))
    inputs = _inputs(transformer)
    base = _predict(transformer, inputs)
    base_params = {name: (p.data_ptr(), p.numel()) for name, p in transformer.named_parameters()}

    add_lora(transformer, rank=4, alpha=8)
    assert torch.equal(_predict(transformer, inputs), base)  # B = 0: the policy starts at the base
    _perturb_lora(transformer)
    policy = _predict(transformer, inputs)
    assert not torch.allclose(policy, base)

    with reference_mode(transformer):
        assert torch.equal(_predict(transformer, inputs), base)
        params = dict(transformer.named_parameters())
    # The base weights are the same tensors as before LoRA (peft wraps each target Linear as
    # `.base_layer`): the reference costs no memory beyond the adapter.
    assert {n.replace(".base_layer", ""): (p.data_ptr(), p.numel())
            for n, p in params.items() if "lora_" not in n} == base_params
    assert torch.equal(_predict(transformer, inputs), policy)

    with pytest.raises(RuntimeError), reference_mode(transformer):
        raise RuntimeError("a failing reference forward")
    assert torch.equal(_predict(transformer, inputs), policy)
    assert all(p.requires_grad for p in lora_parameters(transformer))


def test_save_lora_loads_into_a_fresh_pipeline(tiny: dict[str, str], tmp_path: Path) -> None:
    spec = WanSpec("i2v", tiny["i2v"], dtype="float32")  # i2v: the image K/V adapters too
    transformer = load_transformer(spec)
    add_lora(transformer)
    _perturb_lora(transformer)
    inputs = _inputs(transformer)
    trained = _predict(transformer, inputs)

    path = save_lora(transformer, tmp_path / "adapter")
    assert path.is_file() and path.suffix == ".safetensors"
    pipe = load_pipeline(spec)
    base = _predict(pipe.transformer, inputs)
    pipe.load_lora_weights(str(path.parent))

    assert torch.equal(_predict(pipe.transformer, inputs), trained)  # alpha/rank kept: same scale
    assert not torch.allclose(trained, base)
