"""infra/parallel.py's choices that need no second process: which context parallelism a config
gets on which device (and the errors when the library's cannot run), and FSDP2's mixed
precision on GPU (bf16 weights, fp32 reductions, LoRA master weights in fp32). The layouts'
numbers against the plain path are tests/test_distributed.py's."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel
from torch.distributed.device_mesh import init_device_mesh

from infra.config import ParallelConfig, TrainConfig
from infra.distributed import Layout, apply_diffusers_cp
from infra.parallel import (apply_fsdp, context_parallel, cp_implementation,
                            fsdp_mixed_precision)
from models.tiny import tiny_transformer_config
from models.wan import add_lora, lora_parameters

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _transformer(dtype: torch.dtype = torch.float32) -> WanTransformer3DModel:
    torch.manual_seed(0)
    model = WanTransformer3DModel(**tiny_transformer_config("t2v")).to(dtype)
    add_lora(model, rank=4, alpha=8)
    return model


# ---------------------------------------------------------------------------------------
# Context parallelism: the config's forms and the implementation each device gets
# ---------------------------------------------------------------------------------------


def test_context_parallel_reads_the_old_int_as_ulysses_and_the_new_section() -> None:
    old = ParallelConfig(context_parallel=4).context_parallel
    assert (old.ulysses, old.ring, old.degree, old.implementation) == (4, 1, 4, "auto")
    new = ParallelConfig(context_parallel={"ulysses": 2, "ring": 2}).context_parallel
    assert new.degree == 4
    assert ParallelConfig().context_parallel.degree == 1
    # What the YAML configs in configs/ say parses into the same section.
    cfg = TrainConfig.model_validate({"parallel": {"context_parallel": 4}})
    assert cfg.parallel.context_parallel == old
    for bad in (True, 0, {"ulysses": 2, "rings": 2}, {"implementation": "ours"}):
        with pytest.raises(ValueError, match="context_parallel"):
            ParallelConfig(context_parallel=bad)


@pytest.mark.parametrize("choice, device, want", [
    ("auto", CUDA, "diffusers"), ("auto", CPU, "gather"), ("gather", CUDA, "gather"),
    ("diffusers", CPU, "diffusers")])
def test_cp_implementation_auto_is_the_library_on_cuda_and_ours_elsewhere(choice, device,
                                                                          want) -> None:
    cfg = ParallelConfig(context_parallel={"ulysses": 2, "implementation": choice})
    assert cp_implementation(cfg, device) == want


def test_library_cp_without_an_accelerator_names_the_cause_and_the_fix() -> None:
    """The check stands before diffusers' own `rank % torch.accelerator.device_count()`."""
    layout = Layout(device=CPU, world=2, cp=2)
    with pytest.raises(ValueError, match=r"device_count\(\), which is 0.*'gather'"):
        apply_diffusers_cp(_transformer(), layout, ulysses=2, ring=1)


def test_library_ulysses_degree_must_divide_the_heads() -> None:
    layout = Layout(device=CPU, world=4, cp=4)  # the tiny model has 2 heads
    with mock.patch("torch.accelerator.device_count", return_value=1):
        with pytest.raises(ValueError, match="ulysses=4 must divide the model's 2 attention"):
            apply_diffusers_cp(_transformer(), layout, ulysses=4, ring=1)


def test_library_ring_needs_a_kernel_with_the_log_sum_exp() -> None:
    """torch SDPA ("native") returns no log-sum-exp: on CPU (or in fp32) ring is refused before
    the first step, not at diffusers' ValueError inside the first forward."""
    cfg = ParallelConfig(context_parallel={"ring": 2, "implementation": "diffusers"})
    with pytest.raises(ValueError, match="log-sum-exp.*attention: flash"):
        context_parallel(_transformer(), cfg, Layout(device=CPU, world=2, cp=2), "native")


# ---------------------------------------------------------------------------------------
# bf16 the FSDP2 way
# ---------------------------------------------------------------------------------------


def test_fsdp_mixed_precision_is_bf16_weights_fp32_reduce_on_cuda_only() -> None:
    gpu = fsdp_mixed_precision(ParallelConfig(bf16=True), CUDA)
    assert (gpu.param_dtype, gpu.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert gpu.cast_forward_inputs is False  # timestep and rotary table stay float32
    for cfg, device in ((ParallelConfig(bf16=True), CPU), (ParallelConfig(bf16=False), CUDA)):
        plain = fsdp_mixed_precision(cfg, device)
        assert plain.param_dtype is None and plain.reduce_dtype is None


@pytest.fixture
def one_rank(tmp_path: Path) -> Layout:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0,
                            world_size=1)
    try:
        yield Layout(device=CPU, world=1, world_mesh=init_device_mesh("cpu", (1,)))
    finally:
        dist.destroy_process_group()


def test_bf16_policy_keeps_lora_master_weights_fp32_and_their_grads_fp32(one_rank) -> None:
    """The GPU policy applied on a one-rank gloo group, under autocast as the trainer runs it
    on CUDA (here CPU's bf16 autocast): the base computes in bf16, the LoRA weights and their
    gradients stay float32, the modules diffusers keeps in fp32 stay so, and the prediction
    stays near the float32 one."""
    model, reference = _transformer(), _transformer()
    x = torch.randn(1, 16, 2, 4, 4)
    text = torch.randn(1, 8, 32)
    t = torch.tensor([999.0])
    want = reference(hidden_states=x, timestep=t, encoder_hidden_states=text,
                     return_dict=False)[0]
    apply_fsdp(model, one_rank, fsdp_mixed_precision(ParallelConfig(bf16=True), CUDA))
    seen = []  # the dtypes weights have while their block computes (FSDP's unsharded copies)
    model.blocks[0].attn1.to_q.base_layer.register_forward_pre_hook(
        lambda module, args: seen.append(module.weight.dtype))
    # A module diffusers keeps in fp32 (`_keep_in_fp32_modules`) is not cast by the policy.
    model.blocks[0].norm2.register_forward_pre_hook(
        lambda module, args: seen.append(module.weight.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(hidden_states=x, timestep=t, encoder_hidden_states=text,
                    return_dict=False)[0]
    got.float().square().mean().backward()
    lora = lora_parameters(model)
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)
    assert seen == [torch.bfloat16, torch.float32]
    assert model.blocks[0].scale_shift_table.dtype == torch.float32
    assert got.dtype == torch.bfloat16
    assert float((got.detach().float() - want).norm() / want.norm()) < 0.05

