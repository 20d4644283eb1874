"""Parallelism and memory switches, applied to the transformer from outside (torchtitan's
`parallelize_*` habit): model code never knows about them.

Each switch must give the same loss and gradients as the plain path (tests/test_train.py for
the one-process switches, tests/test_distributed.py for the multi-rank ones):
- pair_batch             win and lose through ONE forward as a batch of 2B (paper A.2 item 3,
                         "full parallel processing of pairs"), else two forwards of B;
- gradient_checkpointing diffusers' per-block activation recomputation (non-reentrant, so the
                         frozen base with trainable LoRA still gets its gradients);
                         `checkpoint_every` k recomputes only every k-th block (selective AC);
- offload_activations    the blocks not recomputed keep their saved tensors in host memory
                         (infra.activations; CUDA only in effect); with memory_budget_gb the
                         trainer plans both per block (infra.memory_plan);
- bf16                   autocast to bfloat16, on CUDA only (CPU autocast is slow and changes
                         the numbers the CPU tests compare); under FSDP on CUDA also FSDP2's
                         MixedPrecisionPolicy (bf16 gathered weights, fp32 reductions);
- attention              the kernel behind every attention, through diffusers' attention
                         backends: flash-attn when installed and on CUDA, else torch SDPA;
- fsdp                   FSDP2 `fully_shard` per transformer block, then the root, over all
                         ranks: the frozen base weights are sharded and all-gathered per block;
- context_parallel       the video tokens split across ulysses × ring ranks: diffusers'
                         Ulysses/ring attention on CUDA, our gathered K/V elsewhere
                         (infra.distributed, `context_parallel` below);
- pair_parallel          the win side of each pair on one rank, the lose side on its partner,
                         exchanging only the per-sample errors;
and, across what is left of the world, data parallelism: each rank group trains on its own
slice of the micro-batch (infra.distributed.Layout). With lora.dropout > 0 the multi-rank layouts
draw other (equally distributed) dropout masks than one process: equal in law, not bit for bit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from typing import Callable, ContextManager

import torch
from torch import Tensor
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from infra.activations import apply_block_plan
from infra.config import ParallelConfig
from infra.distributed import Layout, apply_diffusers_cp, apply_gathered_kv, exchange_errors
from models.wan import lora_parameters


def parallelize(transformer: torch.nn.Module, cfg: ParallelConfig,
                layout: Layout | None = None) -> torch.nn.Module:
    """Apply the switches to the (LoRA-wrapped) transformer on its device, in place; returns it.
    Order as in torchtitan: activation checkpointing, then the parallel layouts, FSDP last. The
    attention kernel comes first: context parallelism wraps the processors it configures."""
    backend = set_attention(transformer, cfg.attention)
    if cfg.gradient_checkpointing or cfg.offload_activations:
        every = cfg.checkpoint_every if cfg.gradient_checkpointing else 0
        checkpoint_blocks(transformer, every, offload=cfg.offload_activations)
    if layout is not None and layout.cp > 1:
        context_parallel(transformer, cfg, layout, backend)
    if cfg.fsdp and layout is not None and layout.world > 1:
        apply_fsdp(transformer, layout, fsdp_mixed_precision(cfg, layout.device))
    return transformer


def cp_implementation(cfg: ParallelConfig, device: torch.device) -> str:
    """"diffusers" or "gather": the context-parallel implementation `cfg` asks for on `device`."""
    choice = cfg.context_parallel.implementation
    if choice == "auto":
        return "diffusers" if device.type == "cuda" else "gather"
    return choice


def context_parallel(transformer: torch.nn.Module, cfg: ParallelConfig, layout: Layout,
                     backend: str) -> str:
    """Split the video tokens over the layout's cp ranks; returns the implementation used.
    `backend` is the attention backend `set_attention` chose."""
    cp = cfg.context_parallel
    impl = cp_implementation(cfg, layout.device)
    if impl == "gather":  # ulysses × ring is only a degree here: the K/V are gathered whole
        apply_gathered_kv(transformer, layout.group("cp"))
        return impl
    if cp.ring > 1 and backend == "native":
        # Ring attention merges the K/V chunks' partial softmaxes by their log-sum-exp, which
        # torch's SDPA entry point does not return; its cuDNN kernel does (bf16/fp16 inputs).
        if not (cfg.bf16 and layout.device.type == "cuda"):
            raise ValueError(
                "train.parallel.context_parallel.ring > 1 with the diffusers implementation "
                "needs an attention kernel that returns the log-sum-exp: set "
                "train.parallel.attention: flash, or keep bf16 on CUDA (cuDNN SDPA), or use "
                "ulysses / implementation 'gather'")
        transformer.set_attention_backend("_native_cudnn")
    apply_diffusers_cp(transformer, layout, cp.ulysses, cp.ring)
    return impl


def attention_backend(choice: str, device: torch.device) -> str:
    """diffusers' attention backend name for `choice` on `device`."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if choice == "flash":
        if not has_flash:
            raise ValueError("train.parallel.attention 'flash' needs the flash-attn package: "
                             "`pip install '.[gpu]'` on a CUDA machine, or use 'sdpa' / 'auto'")
        if device.type != "cuda":
            raise ValueError(f"train.parallel.attention 'flash' runs on CUDA only, the model is "
                             f"on {device}; use 'sdpa' or 'auto'")
        return "flash"
    if choice == "auto" and has_flash and device.type == "cuda":
        return "flash"
    return "native"  # torch SDPA, which picks its own fused kernel


def set_attention(transformer: torch.nn.Module, choice: str) -> str:
    """Route every attention of the transformer through the chosen kernel; returns its name."""
    # The device of its first real parameter: a model built on the meta device for sharded
    # loading (infra.sharded_load) has only its LoRA weights on the run's device at this point;
    # one wholly on meta (a FLOP count, benchmarks/gpu_check.py) runs no kernel.
    device = next((p.device for p in transformer.parameters() if not p.is_meta),
                  torch.device("meta"))
    backend = attention_backend(choice, device)
    transformer.set_attention_backend(backend)
    return backend


def checkpoint_blocks(transformer: torch.nn.Module, every: int, offload: bool = False) -> None:
    """Recompute the activations of every `every`-th block in backward (0 = none); with
    `offload`, the other blocks keep theirs in host memory (infra.activations.apply_block_plan)."""
    recompute = [every > 0 and i % every == 0 for i in range(len(transformer.blocks))]
    apply_block_plan(transformer, recompute, [offload and not r for r in recompute])


def fsdp_mixed_precision(cfg: ParallelConfig, device: torch.device) -> MixedPrecisionPolicy:
    """FSDP2's mixed precision for the frozen base: bf16 all-gathered weights and fp32 gradient
    reductions when bf16 is on and the device is CUDA; elsewhere FSDP's default (no casts), so
    the CPU layouts stay equal to the plain path.

    Inputs are not cast (`cast_forward_inputs=False`): the trainer already passes latents and
    text in the model's dtype, while the timestep and the rotary table stay float32 (bf16 rounds
    timestep 999 to 1000). Autocast (`autocast`) picks each op's precision as without FSDP."""
    if cfg.bf16 and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    return MixedPrecisionPolicy()


def apply_fsdp(transformer: torch.nn.Module, layout: Layout,
               mp_policy: MixedPrecisionPolicy | None = None) -> None:
    """FSDP2 over the whole world: one unit per WanTransformerBlock, then the root, with
    `mp_policy` (fsdp_mixed_precision; None = FSDP's default, no casts).

    The LoRA weights are left out of every unit (`ignored_params`): they are a few MiB against
    the base's GiBs, so sharding them saves nothing, while leaving them whole keeps frozen and
    trainable (bf16 and fp32) weights out of one all-gather unit, keeps the reference pass
    (adapters disabled) free of FSDP, and lets checkpoints save plain tensors. Their partial
    gradients are all-reduced by Layout.reduce_gradients like every other layout's, in fp32:
    the LoRA master weights stay float32 whatever the policy (models.wan.add_lora). Under a
    casting policy the modules diffusers keeps in fp32 stay out of the units too (kept_in_fp32).
    """
    mp_policy = mp_policy or MixedPrecisionPolicy()

    # FSDP warns that the root returns a view (diffusers' unpatchify): an in-place op on it
    # would skip a hook. The trainer only reads the prediction (losses.flow_error).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    ignored = set(lora_parameters(transformer, adapter=None))  # a reference adapter too
    if mp_policy.param_dtype is not None:  # a casting policy must not cast these either
        ignored |= set(kept_in_fp32(transformer))
    for block in transformer.blocks:
        fully_shard(block, mesh=layout.world_mesh, ignored_params=ignored, mp_policy=mp_policy)
    # The root's weights (embeddings, head) are needed right after the last block: keep them.
    fully_shard(transformer, mesh=layout.world_mesh, ignored_params=ignored,
                reshard_after_forward=False, mp_policy=mp_policy)


def kept_in_fp32(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The float32 weights of the modules diffusers keeps in fp32 in a bf16 model
    (`_keep_in_fp32_modules`: Wan's time embedder, modulation tables and affine norms, a few
    MiB). Under a bf16 MixedPrecisionPolicy they stay out of the FSDP units, replicated and
    uncast, as from_pretrained(torch_dtype=bf16) leaves them."""
    keep = set(getattr(transformer, "_keep_in_fp32_modules", None) or [])
    return [p for name, p in transformer.named_parameters()
            if p.dtype == torch.float32 and keep.intersection(name.split("."))
            and "lora_" not in name]


def autocast(cfg: ParallelConfig, device: torch.device) -> ContextManager:
    """bf16 autocast on CUDA when enabled; a no-op elsewhere."""
    if cfg.bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


ErrorFn = Callable[[Tensor, Tensor], Tensor]


def pair_forward(errors: ErrorFn, win: tuple[Tensor, Tensor], lose: tuple[Tensor, Tensor],
                 cfg: ParallelConfig, layout: Layout | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample errors (e^w [B], e^l [B]) of one model on the win and lose sides of B pairs.

    `errors(x_t, y)` runs the model on a stack of k·B noisy latents (k = 1 or 2; it tiles the
    pairs' shared conditioning k times) and returns k·B errors; `win`/`lose` are (x_t, y).
    Batched, both sides share one graph and one pass over the weights (paper A.2, item 3).
    Pair-parallel, this rank runs one side and the errors are exchanged.
    """
    if layout is not None and layout.pair > 1:
        return exchange_errors(errors(*(win, lose)[layout.local("pair")]), layout)
    if cfg.pair_batch:
        both = errors(torch.cat([win[0], lose[0]]), torch.cat([win[1], lose[1]]))
        err_w, err_l = both.chunk(2)
        return err_w, err_l
    return errors(*win), errors(*lose)
