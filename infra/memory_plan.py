"""The memory planner: which transformer blocks recompute their activations in backward and
which keep them in host memory, so that one training step fits a memory budget with the least
recompute. Pure arithmetic, no torch: the measurements come from infra/activations.py.

The model (linear, measured, not derived from the architecture). At a fixed latent H×W, batch
and layout, the peak memory of one training step is linear in the latent frames F (the video
tokens are F·H·W / patch; attention runs through SDPA / flash kernels whose memory is linear in
the tokens), and every block holds the same share of it, so with s of the L blocks keeping their
activations on the device

    peak(F, s) = recomputed(F) + s/L · (stored(F) − recomputed(F))

where stored(F) = a_s + b_s·F is the peak measured with every block storing its activations and
recomputed(F) = a_r + b_r·F the peak with every block recomputed (the probe steps of
infra.activations.measure_profile at F = 1 and 2). A block whose activations are offloaded
to host memory is counted like a recomputed one: its saved tensors leave the device, what stays
(its input, the copy in flight) is no more than a recomputed block keeps. The planner adds
HEADROOM to the part it extrapolates. Not modelled: the allocator's fragmentation at the full
size and attention whose memory grows with tokens² (none of the kernels used here).

The choice, for F frames and a budget: the fewest blocks taken off the device. With offload
switched on, offloaded blocks come first (no recompute) up to what host memory holds; the
rest are recomputed. Recomputed blocks are the first ones (their recompute happens in backward
after the later blocks' stored activations are freed), offloaded blocks the next ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GiB = 2**30
# Plans add this fraction to the part of the peak they extrapolate (everything above the
# probes' all-recomputed intercept): the line from F = 1, 2 missed the measured peak by -2% to
# +5% of that part at F = 3-8 in benchmarks/train_memory.py (CPU, small config).
HEADROOM = 0.05


@dataclass(frozen=True)
class Line:
    """bytes = intercept + slope · frames."""

    intercept: float
    slope: float

    def at(self, frames: float) -> float:
        return self.intercept + self.slope * frames

    @classmethod
    def through(cls, points: list[tuple[float, float]]) -> "Line":
        """The least-squares line through (frames, bytes) points (two or more frame counts)."""
        xs = {x for x, _ in points}
        if len(xs) < 2:
            raise ValueError(f"a memory line needs probes at two frame counts or more; got {points}")
        mx = sum(x for x, _ in points) / len(points)
        my = sum(y for _, y in points) / len(points)
        slope = (sum((x - mx) * (y - my) for x, y in points)
                 / sum((x - mx) ** 2 for x, _ in points))
        return cls(my - slope * mx, slope)


@dataclass(frozen=True)
class MemoryProfile:
    """Measured peak memory of a training step (bytes) as lines in the latent frames F."""

    blocks: int
    stored: Line  # every block keeps its activations on the device
    recomputed: Line  # every block recomputes its activations in backward
    extra: float = 0.0  # bytes the probe steps do not hold (the optimizer state of the LoRA)

    def block_bytes(self, frames: float) -> float:
        """What one block's stored activations cost on the device over a recomputed block's."""
        return max(0.0, self.stored.at(frames) - self.recomputed.at(frames)) / self.blocks

    def peak(self, frames: float, on_device: int) -> float:
        """Predicted peak with `on_device` blocks storing their activations on the device."""
        return self.extra + self.recomputed.at(frames) + on_device * self.block_bytes(frames)


@dataclass(frozen=True)
class MemoryPlan:
    """Per block: recompute in backward, offload to host memory, or (neither) store."""

    recompute: tuple[bool, ...]
    offload: tuple[bool, ...]
    frames: int
    peak_bytes: float  # predicted
    budget_bytes: float

    @property
    def recomputed(self) -> int:
        return sum(self.recompute)

    @property
    def offloaded(self) -> int:
        return sum(self.offload)

    def describe(self) -> str:
        n = len(self.recompute)
        return (f"recompute {self.recomputed}/{n} blocks, offload {self.offloaded}/{n}, store "
                f"{n - self.recomputed - self.offloaded}/{n} at F={self.frames}: predicted peak "
                f"{self.peak_bytes / GiB:.3f} GiB of a {self.budget_bytes / GiB:.3f} GiB budget")


class BudgetTooSmall(ValueError):
    """Even with every block off the device the step does not fit the budget."""


def plan_memory(profile: MemoryProfile, budget_bytes: float, frames: int,
                offload: bool = False, host_bytes: float = math.inf,
                headroom: float = HEADROOM) -> MemoryPlan:
    """The plan for `frames` latent frames that fits `budget_bytes` (the extrapolated part of
    the prediction raised by `headroom`, a fraction) taking the fewest blocks off the device: offloaded first when `offload` (as many as
    `host_bytes` holds), then recomputed. Raises BudgetTooSmall (naming the smallest budget that
    fits) when none does."""
    n = profile.blocks
    fixed = profile.extra + profile.recomputed.intercept  # measured at the probes' size as is

    def need(on_device: int) -> float:  # the prediction, its extrapolated part raised
        return fixed + (1 + headroom) * (profile.peak(frames, on_device) - fixed)

    if need(0) > budget_bytes:
        raise BudgetTooSmall(
            f"a step at F={frames} latent frames needs {need(0) / GiB:.3f} GiB even with every "
            f"block's activations off the device (predicted {profile.peak(frames, 0) / GiB:.3f}"
            f" GiB with all {n} blocks recomputed, plus the planner's {headroom:.0%} margin on "
            f"what it extrapolates); the budget is {budget_bytes / GiB:.3f} GiB")
    per_block = profile.block_bytes(frames) * (1 + headroom)
    on_device = n if per_block == 0 else min(
        n, math.floor((budget_bytes - need(0)) / per_block + 1e-9))
    off = n - on_device
    offloaded = 0
    if offload and per_block > 0:
        offloaded = off if host_bytes >= off * per_block else math.floor(host_bytes / per_block)
    recomputed = off - offloaded
    return MemoryPlan(
        recompute=tuple(i < recomputed for i in range(n)),
        offload=tuple(recomputed <= i < off for i in range(n)),
        frames=frames, peak_bytes=profile.peak(frames, on_device), budget_bytes=budget_bytes)
