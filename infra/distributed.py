"""Processes, process groups and collectives for multi-rank training (torchrun), and context
parallelism applied to a WanTransformer3DModel from outside through hooks and an attention
processor. Model code never sees any of this (docs/architecture.md, "Layers").

Rank layout. The world of W ranks is a (dp, pair, cp) grid, cp innermost:
- cp   ranks share one sample's video tokens (context parallelism over the sequence axis);
- pair 2 when the win side of each pair runs on one rank and the lose side on its partner
       (pair parallelism), else 1;
- dp   the rest: each dp slice trains on different pairs of the micro-batch.

Gradients. Every rank's backward yields an exact *partial* gradient of its dp slice's loss:
the pieces of the computation a rank owns (its tokens, its side of the pair) contribute their
share, and the replicated rest (the loss on gathered outputs/errors) is counted once, because a
gather whose result every rank uses identically passes back only the local chunk's gradient
(`gather(..., replicated=True)`). Summing over the cp × pair ranks gives the slice's gradient;
the dp slices' mean then gives the micro-batch gradient — `reduce_gradients` does both in one
all-reduce, so every rank holds the same LoRA update.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

Metrics = dict[str, Any]


# ---------------------------------------------------------------------------------------
# The layout of one process in the world
# ---------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Where this process sits: its rank, device, and the (dp, pair, cp) grid's groups.

    `Layout.single(device)` is the plain one-process path (no process group needed); torchrun
    processes get theirs from `Layout.from_env`.
    """

    device: torch.device
    rank: int = 0
    world: int = 1
    dp: int = 1
    pair: int = 1
    cp: int = 1
    mesh: DeviceMesh | None = field(default=None, repr=False)
    world_mesh: DeviceMesh | None = field(default=None, repr=False)

    @classmethod
    def single(cls, device: torch.device) -> "Layout":
        return cls(device=device)

    @classmethod
    def from_env(cls, pair: int, cp: int, device: str | None = None) -> "Layout":
        """The layout torchrun asked for (RANK, WORLD_SIZE, LOCAL_RANK in the environment), with
        the default process group started if needed: NCCL on CUDA, gloo on CPU. Without
        torchrun's variables: the single-process layout."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)  # one GPU per process, torchrun's convention
        if world == 1:
            check_grid(1, pair, cp)
            return cls.single(dev)
        dp = check_grid(world, pair, cp)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                    timeout=timedelta(minutes=30))
        mesh = init_device_mesh(dev.type, (dp, pair, cp), mesh_dim_names=("dp", "pair", "cp"))
        world_mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("world",))
        return cls(device=dev, rank=dist.get_rank(), world=world, dp=dp, pair=pair, cp=cp,
                   mesh=mesh, world_mesh=world_mesh)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes what the run leaves behind (checkpoints, logs, the adapter)."""
        return self.rank == 0

    def group(self, dim: str) -> dist.ProcessGroup:
        assert self.mesh is not None, "a single-process layout has no process groups"
        return self.mesh.get_group(dim)

    def local(self, dim: str) -> int:
        """This rank's index along `dim` ("dp", "pair" or "cp"); 0 in a single process."""
        return 0 if self.mesh is None else self.mesh.get_local_rank(dim)

    def main_only(self, make: Callable[[], Any]) -> Any:
        """`make()` on the main rank; elsewhere an object on which every call does nothing.
        The one place that decides which rank writes: the trainer just calls its sinks."""
        return make() if self.is_main else _Silent()

    def reduce_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum the ranks' partial gradients, divide by dp: the micro-batch mean (module doc)."""
        params = [p for p in params if p.grad is not None]
        if self.world == 1 or not params:
            return
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat)
        flat /= self.dp
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p.grad))

    def mean_metrics(self, metrics: Metrics) -> Metrics:
        """Each metric averaged over the dp slices (equal within a slice, so: over the world)."""
        if self.world == 1:
            return metrics
        names = [k for k, v in metrics.items() if isinstance(v, (int, float))]
        values = torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64,
                              device=self.device)
        dist.all_reduce(values)
        return metrics | dict(zip(names, (values / self.world).tolist()))

    def max_values(self, values: list[float]) -> list[float]:
        """Each value's maximum over all ranks (so that every rank plans from the same numbers)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class _Silent:
    """The non-main ranks' stand-in for a writer: any method call is a no-op returning None."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def check_grid(world: int, pair: int, cp: int) -> int:
    """dp = world / (pair × cp), or a ValueError saying which sizes to change."""
    if world % (pair * cp):
        raise ValueError(
            f"{world} process(es) cannot be laid out as dp × pair({pair}) × "
            f"context_parallel({cp}): the world size must be a multiple of {pair * cp}; change "
            "the number of processes (nproc) or train.parallel.context_parallel / pair_parallel")
    return world // (pair * cp)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Differentiable gather
# ---------------------------------------------------------------------------------------


class _Gather(torch.autograd.Function):
    """all_gather along `dim`; backward returns this rank's chunk of the gradient.

    replicated=True: every rank applies the same function to the gathered tensor (the loss on
    gathered errors or outputs), so each rank's own chunk gradient is already complete.
    replicated=False: ranks use the gathered tensor differently (their own queries attend to
    all keys), so a chunk's gradient is the sum over ranks — a reduce-scatter.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: dist.ProcessGroup,
                replicated: bool) -> Tensor:
        ctx.dim, ctx.group, ctx.replicated = dim, group, replicated
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        n, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        if ctx.replicated:
            return grad.chunk(n, ctx.dim)[rank].contiguous(), None, None, None
        chunks = grad.movedim(ctx.dim, 0).contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = chunks.new_empty((chunks.shape[0] // n, *chunks.shape[1:]))
            dist.reduce_scatter_tensor(out, chunks, group=ctx.group)
        else:  # gloo has no reduce-scatter: sum everything, keep the own chunk
            dist.all_reduce(chunks, group=ctx.group)
            out = chunks.chunk(n)[rank]
        return out.movedim(0, ctx.dim).contiguous(), None, None, None


def gather(x: Tensor, dim: int, group: dist.ProcessGroup, replicated: bool) -> Tensor:
    """The group's tensors concatenated along `dim` in rank order, differentiable (_Gather)."""
    return _Gather.apply(x, dim, group, replicated)


# ---------------------------------------------------------------------------------------
# Context parallelism for WanTransformer3DModel, two implementations
# ---------------------------------------------------------------------------------------
#
# diffusers' (CUDA): WanTransformer3DModel._cp_plan splits the rotary table and blocks[0]'s
# tokens and gathers proj_out's output; its attention backends run Ulysses (all-to-all: local
# heads over all tokens) or ring attention (K/V chunks around the ring, merged by
# log-sum-exp), both with a backward. Its enable_parallelism picks the device as
# `rank % torch.accelerator.device_count()`, a ZeroDivisionError on a machine without an
# accelerator, and ring attention needs a kernel that returns the log-sum-exp (torch SDPA does
# not), so it cannot serve the CPU/gloo path.
#
# Ours ("gather", any device): the same split, with K/V gathered instead of exchanged.
# The video tokens (frame-major: frame, row, column) are cut into cp equal contiguous chunks,
# i.e. runs of whole frames when cp divides the latent frame count. Everything in a Wan block
# is per token except self-attention, so:
#   rope output         -> this rank's chunk of the rotary table        (forward hook)
#   blocks[0] input     -> this rank's chunk of the tokens              (forward pre-hook)
#   attn1 (self-attn)   -> local queries, keys/values of ALL tokens      (attention processor)
#   proj_out output     -> all tokens again, before the unpatchify      (forward hook)
# Cross-attention (text/image keys are not split) and the feed-forward need nothing. Gathering
# K/V keeps attention exact with any SDPA backend; each rank holds the full K/V of one block at
# a time (Ulysses all-to-all would hold less: a later option).


def _chunk_tokens(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % n:
        raise ValueError(
            f"context_parallel={n} cannot split {x.shape[dim]} video tokens evenly; choose a "
            "degree that divides (latent frames / patch_t) × (latent height / patch_h) × "
            "(latent width / patch_w), e.g. one that divides the latent frame count")
    return x.chunk(n, dim)[rank]


def _apply_rotary_emb(x: Tensor, freqs_cos: Tensor, freqs_sin: Tensor) -> Tensor:
    """Wan's rotary embedding on interleaved pairs, as WanAttnProcessor applies it."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class GatheredKVAttnProcessor:
    """Self-attention (a Wan block's attn1) with this rank's queries against the keys and values
    of every rank's tokens. Mirrors diffusers' WanAttnProcessor on its self-attention path;
    K and V are gathered after the norm and the rotary embedding (which need the local rope)."""

    def __init__(self, group: dist.ProcessGroup, inner: Any):
        self.group = group
        self._attention_backend = getattr(inner, "_attention_backend", None)

    def __call__(self, attn: Any, hidden_states: Tensor,
                 encoder_hidden_states: Tensor | None = None, attention_mask: Tensor | None = None,
                 rotary_emb: tuple[Tensor, Tensor] | None = None) -> Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("GatheredKVAttnProcessor serves self-attention (attn1) only")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _apply_rotary_emb(query, *rotary_emb), _apply_rotary_emb(key, *rotary_emb)
        key = gather(key, 1, self.group, replicated=False)
        value = gather(value, 1, self.group, replicated=False)
        out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0,
                                    is_causal=False, backend=self._attention_backend)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def apply_gathered_kv(transformer: torch.nn.Module, group: dist.ProcessGroup) -> None:
    """Split a WanTransformer3DModel's video tokens across `group` (see the table above)."""
    def shard_rope(module: Any, args: Any, out: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return tuple(_chunk_tokens(t, 1, group) for t in out)  # [1, S, 1, D]

    def shard_tokens(module: Any, args: tuple) -> tuple:
        return (_chunk_tokens(args[0], 1, group), *args[1:])  # [B, S, D]

    def gather_tokens(module: Any, args: Any, out: Tensor) -> Tensor:
        return gather(out, 1, group, replicated=True)  # the loss sees all tokens on every rank

    transformer.rope.register_forward_hook(shard_rope)
    transformer.blocks[0].register_forward_pre_hook(shard_tokens)
    transformer.proj_out.register_forward_hook(gather_tokens)
    for block in transformer.blocks:
        block.attn1.set_processor(GatheredKVAttnProcessor(group, block.attn1.processor))


def apply_diffusers_cp(transformer: Any, layout: Layout, ulysses: int, ring: int) -> None:
    """diffusers' context parallelism (ContextParallelConfig, the model's `_cp_plan`) over this
    layout's cp ranks: a (ring, ulysses) mesh cut from the (dp, pair, ring, ulysses) grid, so
    the token chunk of cp rank i is the same as with `apply_gathered_kv`."""
    from diffusers import ContextParallelConfig

    if torch.accelerator.device_count() == 0:
        raise ValueError(
            "train.parallel.context_parallel.implementation 'diffusers' needs an accelerator: "
            "diffusers' enable_parallelism picks its device as rank % "
            "torch.accelerator.device_count(), which is 0 here (ZeroDivisionError); use "
            "implementation 'gather' (or 'auto') on CPU")
    heads = transformer.config.num_attention_heads
    if heads % ulysses:
        raise ValueError(
            f"train.parallel.context_parallel.ulysses={ulysses} must divide the model's "
            f"{heads} attention heads (Ulysses splits the heads across ranks); pick a divisor "
            "of the heads and put the rest of the degree into `ring`")
    assert layout.mesh is not None and ulysses * ring == layout.cp
    grid = init_device_mesh(layout.device.type, (layout.dp, layout.pair, ring, ulysses),
                            mesh_dim_names=("dp", "pair", "ring", "ulysses"))
    transformer.enable_parallelism(config=ContextParallelConfig(
        ulysses_degree=ulysses, ring_degree=ring, mesh=grid["ring", "ulysses"]))


# ---------------------------------------------------------------------------------------
# Pair parallelism: the two sides of a pair on two ranks
# ---------------------------------------------------------------------------------------


def exchange_errors(local: Tensor, layout: Layout) -> tuple[Tensor, Tensor]:
    """(e^w, e^l) on both ranks of a pair group from this rank's side (pair rank 0 = win).
    Only the B per-sample errors cross the wire; the gradient of the (replicated) loss flows
    back to the rank that computed each side."""
    both = gather(local.unsqueeze(0), 0, layout.group("pair"), replicated=True)
    return both[0], both[1]
