"""Where each transformer block's activations live between forward and backward: on the device
(stored), recomputed in backward (activation checkpointing), or offloaded to host memory; and
the probe that measures what storing costs, for the planner (infra/memory_plan.py).

Applied from outside the model (infra.parallel.parallelize), through diffusers' checkpointing
hook: with gradient checkpointing enabled, WanTransformer3DModel runs every block through
`_gradient_checkpointing_func(block, *args)`, which here picks the block's mode. Every mode
gives the same numbers: recompute reruns the same ops, offload moves bytes.
"""

from __future__ import annotations

import ctypes
import gc
import re
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from infra.memory_plan import Line, MemoryProfile


def apply_block_plan(transformer: torch.nn.Module, recompute: Sequence[bool],
                     offload: Sequence[bool]) -> None:
    """Per block: recompute its activations in backward (torch.utils.checkpoint, non-reentrant,
    as diffusers calls it: the frozen base with trainable LoRA still gets its gradients), keep
    the tensors autograd saves in host memory (`offload`), or store them on the device.
    Re-applicable: each call replaces the previous plan."""
    blocks = list(transformer.blocks)
    if len(recompute) != len(blocks) or len(offload) != len(blocks):
        raise ValueError(f"a block plan needs one entry per block ({len(blocks)}); got "
                         f"{len(recompute)} recompute and {len(offload)} offload entries")
    if not any(recompute) and not any(offload):
        transformer.disable_gradient_checkpointing()
        return
    transformer.enable_gradient_checkpointing()  # sets diffusers' own checkpoint function
    checkpointed = transformer._gradient_checkpointing_func
    mode = {id(b): (r, o) for b, r, o in zip(blocks, recompute, offload)}

    def run_block(block: torch.nn.Module, *args: object) -> object:
        recompute_it, offload_it = mode[id(block)]
        if recompute_it:
            return checkpointed(block, *args)
        if offload_it:
            with offloaded():
                return block(*args)
        return block(*args)

    transformer._gradient_checkpointing_func = run_block


def _host_copy(tensor: Tensor) -> Tensor:
    """The host copy of an accelerator tensor: pinned, copied asynchronously on the device's
    stream (as torch.autograd.graph.save_on_cpu(pin_memory=True)). A CPU tensor stays as is."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def offloaded() -> torch.autograd.graph.saved_tensors_hooks:
    """Saved tensors go to host memory and come back for backward, like torch's save_on_cpu,
    except parameters (and views of them): the linears save their frozen base weights for the
    input gradient, and copying those (GiBs per block of a 14B model) would free nothing."""

    def pack(tensor: Tensor) -> tuple[torch.device, Tensor]:
        base = tensor._base if tensor._base is not None else tensor
        if isinstance(base, torch.nn.Parameter):
            return tensor.device, tensor
        return tensor.device, _host_copy(tensor)

    def unpack(packed: tuple[torch.device, Tensor]) -> Tensor:
        device, tensor = packed
        return tensor.to(device, non_blocking=True)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


# -- measuring -----------------------------------------------------------------------------


def _rss(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1)) * 1024


def peak_memory(device: torch.device, run: Callable[[], None]) -> int:
    """Peak bytes while `run()` runs: torch.cuda.max_memory_allocated on CUDA (everything the
    caching allocator handed out: weights, optimizer state, activations); on CPU the process's
    peak resident memory (Linux VmHWM, reset to the current RSS through /proc/self/clear_refs
    after glibc returned its free heap: the runtime counts too, so it reads above a GPU's
    allocated bytes for the same tensors)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on cuda or cpu devices, not {device}")
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: freed heap may stay resident, which only overstates the peak
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError as e:
        raise OSError("measuring peak memory on CPU needs Linux's /proc/self/clear_refs "
                      f"({e}); plan on a GPU, or set train.parallel.checkpoint_every instead "
                      "of memory_budget_gb") from None
    run()
    return _rss("VmHWM")


def optimizer_bytes(params: list[torch.nn.Parameter]) -> int:
    """What AdamW adds to a step that probe steps (forward + backward only) do not hold: its two
    fp32 moments per weight and its foreach update's temporaries (about two more copies): with
    2 copies the F=2 plan of benchmarks/train_memory.py read 15 MiB under its measured peak."""
    return 4 * sum(p.numel() * 4 for p in params)


def measure_profile(transformer: torch.nn.Module, device: torch.device,
                    step: Callable[[int], None], frames: Sequence[int] = (1, 2),
                    extra: float = 0.0,
                    agree: Callable[[list[float]], list[float]] = lambda peaks: peaks,
                    ) -> MemoryProfile:
    """Probe steps: `step(f)` runs one forward + backward at f latent frames (and drops the
    gradients), first with every block storing its activations, then with every block
    recomputing; each peak is measured after a warm-up step (first calls allocate kernels'
    workspaces once). `agree` makes the ranks of a distributed run plan from the same numbers
    (e.g. the maximum over ranks). Leaves every block storing; apply the plan after."""
    n = len(transformer.blocks)
    frames = sorted(set(frames))
    peaks: list[float] = []
    for recompute in (False, True):
        apply_block_plan(transformer, [recompute] * n, [False] * n)
        step(frames[0])
        peaks += [float(peak_memory(device, lambda f=f: step(f))) for f in frames]
    apply_block_plan(transformer, [False] * n, [False] * n)
    peaks = agree(peaks)
    k = len(frames)

    def line(values: list[float]) -> Line:
        if k == 1:  # one probe size (the run's own): a constant
            return Line(values[0], 0.0)
        return Line.through(list(zip(frames, values)))

    return MemoryProfile(n, stored=line(peaks[:k]), recomputed=line(peaks[k:]), extra=extra)
