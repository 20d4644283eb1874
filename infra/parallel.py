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
                         the numbers the CPU tests compare);
- attention              the kernel behind every attention, through diffusers' attention
                         backends: flash-attn when installed and on CUDA, else torch SDPA;
- fsdp                   FSDP2 `fully_shard` per transformer block, then the root, over all
                         ranks: the frozen base weights are sharded and all-gathered per block;
- context_parallel       the video tokens split across this many ranks (infra.distributed);
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

from infra.activations import apply_block_plan
from infra.config import ParallelConfig
from infra.distributed import Layout, apply_context_parallel, exchange_errors
from models.wan import lora_parameters


def parallelize(transformer: torch.nn.Module, cfg: ParallelConfig,
                layout: Layout | None = None) -> torch.nn.Module:
    """Apply the switches to the (LoRA-wrapped) transformer on its device, in place; returns it.
    Order as in torchtitan: activation checkpointing, then the parallel layouts, FSDP last. The
    attention kernel comes first: context parallelism wraps the processors it configures."""
    set_attention(transformer, cfg.attention)
    if cfg.gradient_checkpointing or cfg.offload_activations:
        every = cfg.checkpoint_every if cfg.gradient_checkpointing else 0
        checkpoint_blocks(transformer, every, offload=cfg.offload_activations)
    if layout is not None and layout.cp > 1:
        apply_context_parallel(transformer, layout.group("cp"))
    if cfg.fsdp and layout is not None and layout.world > 1:
        apply_fsdp(transformer, layout)
    return transformer


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
    device = next(transformer.parameters()).device
    backend = attention_backend(choice, device)
    transformer.set_attention_backend(backend)
    return backend


def checkpoint_blocks(transformer: torch.nn.Module, every: int, offload: bool = False) -> None:
    """Recompute the activations of every `every`-th block in backward (0 = none); with
    `offload`, the other blocks keep theirs in host memory (infra.activations.apply_block_plan)."""
    recompute = [every > 0 and i % every == 0 for i in range(len(transformer.blocks))]
    apply_block_plan(transformer, recompute, [offload and not r for r in recompute])


def apply_fsdp(transformer: torch.nn.Module, layout: Layout) -> None:
    """FSDP2 over the whole world: one unit per WanTransformerBlock, then the root.

    The LoRA weights are left out of every unit (`ignored_params`): they are a few MiB against
    the base's GiBs, so sharding them saves nothing, while leaving them whole keeps frozen and
    trainable (bf16 and fp32) weights out of one all-gather unit, keeps the reference pass
    (adapters disabled) free of FSDP, and lets checkpoints save plain tensors. Their partial
    gradients are all-reduced by Layout.reduce_gradients like every other layout's.
    """
    from torch.distributed.fsdp import fully_shard

    # FSDP warns that the root returns a view (diffusers' unpatchify): an in-place op on it
    # would skip a hook. The trainer only reads the prediction (losses.flow_error).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    lora = set(lora_parameters(transformer))
    for block in transformer.blocks:
        fully_shard(block, mesh=layout.world_mesh, ignored_params=lora)
    # The root's weights (embeddings, head) are needed right after the last block: keep them.
    fully_shard(transformer, mesh=layout.world_mesh, ignored_params=lora,
                reshard_after_forward=False)


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
