"""Per-sample flow-matching errors e = mean((y − v)²), the quantity every preference loss compares.

Flow matching (docs/architecture.md, "Training: losses (exact)"): x_t = (1 − σ_t) z + σ_t ε, target y = ε − z, and
e(z) = mean over all latent elements of (y − v(x_t, t, c))². The paper writes ‖y − y_θ‖²
(Reg-DPO Eq. 2); the mean only rescales it by 1/N, which β absorbs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _squared_error(pred: Tensor, target: Tensor) -> Tensor:
    if pred.shape != target.shape:
        raise ValueError(
            f"pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}; "
            "both must be the latent [B, C, F, H, W] of the same samples"
        )
    if pred.dim() < 2:
        raise ValueError(f"pred must be batched [B, ...]; got shape {tuple(pred.shape)}")
    # bf16 predictions are compared in float32: the errors differ from the reference's only in
    # late digits, and s (Eq. 2) is a difference of such differences.
    dtype = torch.promote_types(pred.dtype, torch.float32)
    return (target.to(dtype) - pred.to(dtype)).square()


def flow_error(pred: Tensor, target: Tensor) -> Tensor:
    """e per sample: mean of (target − pred)² over every non-batch element; returns [B]."""
    return _squared_error(pred, target).flatten(1).mean(dim=1)


def masked_error(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """e over a region (LocalDPO's region-aware loss): sum(m·(y − v)²) / sum(m) per sample.

    `mask` (≥ 0, binary or soft) broadcasts to the latent shape, e.g. [B, 1, F, H, W] for a
    spatio-temporal mask shared by the channels; the denominator counts the mask over the full
    latent shape, so the result is a weighted mean whatever the broadcast. A sample whose mask is
    all zero gets error 0 (it then adds nothing to s and no gradient), never NaN. Returns [B].
    """
    sq = _squared_error(pred, target)
    try:
        weight = mask.to(sq.dtype).expand_as(sq)
    except RuntimeError as e:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the latent shape "
            f"{tuple(sq.shape)}; give it the latent's layout, e.g. [B, 1, F, H, W]"
        ) from e
    num = (weight * sq).flatten(1).sum(dim=1)
    den = weight.flatten(1).sum(dim=1)
    # where() on a safe denominator, not on the quotient: 0/0 in an unused branch still
    # poisons the backward pass with NaN.
    return num / torch.where(den > 0, den, torch.ones_like(den))
