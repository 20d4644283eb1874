"""Preference losses on per-sample flow-matching errors: DPO, Reg-DPO, SFT, region DPO, KTO, NLL.

Inputs are per-sample errors e (see losses.errors): policy errors carry the graph, reference
errors (the base with LoRA adapters disabled) are detached here whatever the caller passes.
Every loss returns (scalar loss, metrics) with metrics as python floats, batch means over pairs.
Equation numbers refer to Reg-DPO (shared/papers/001_114754527b1a7ba0.txt).

Notation (docs/architecture.md, "Training: losses (exact)"):
    win_gap = e_θ^w − e_ref^w,  lose_gap = e_θ^l − e_ref^l,  s = win_gap − lose_gap   (Eq. 2)
    b = beta / 2            Diffusion-DPO's convention: beta = 500 ⇒ DGR = 125 at step 0 (Fig. 2)
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from infra.config.train import LossConfig, LossKind

Metrics = dict[str, float]
# The `train.loss` section is the losses' config: one definition, in the torch-free config tree.
PreferenceLoss = LossConfig
KINDS: tuple[str, ...] = get_args(LossKind)


def dgr(s: Tensor, beta: float) -> Tensor:
    """DPO gradient ratio (Eq. 4 with b = β/2): b·(1 − σ(−b·s)), detached; 0 ≤ DGR ≤ b."""
    b = beta / 2
    # 1 − σ(−x) = σ(x): the same value without the cancellation 1 − (1 − tiny) for very negative s.
    return b * torch.sigmoid(b * s.detach())


def dpo_loss(err_w: Tensor, err_l: Tensor, ref_w: Tensor, ref_l: Tensor, *,
             beta: float = 500.0) -> tuple[Tensor, Metrics]:
    """Diffusion-DPO (Eq. 2): mean over pairs of −log σ(−b·s)."""
    return regdpo_loss(err_w, err_l, ref_w, ref_l, beta=beta, r=0.0)


def regdpo_loss(err_w: Tensor, err_l: Tensor, ref_w: Tensor, ref_l: Tensor, *,
                beta: float = 500.0, r: float | Literal["dgr"] = "dgr",
                k: float = 1.0) -> tuple[Tensor, Metrics]:
    """Reg-DPO (Eq. 6): mean over pairs of −log σ(−b·s) + r·e_θ^w.

    r is a constant or k·DGR per pair; either way it is detached, so the gradient is exactly
    Eq. 5: −[2(DGR + r)(y^w − y_θ^w)ᵀ∇y_θ^w − 2·DGR(y^l − y_θ^l)ᵀ∇y_θ^l] (up to the 1/N of e).
    """
    _check_errors(err_w=err_w, err_l=err_l, ref_w=ref_w, ref_l=ref_l)
    ref_w, ref_l = ref_w.detach(), ref_l.detach()
    win_gap = err_w - ref_w
    lose_gap = err_l - ref_l
    s = win_gap - lose_gap  # Eq. 2
    b = beta / 2
    dpo_per_pair = -F.logsigmoid(-b * s)  # Eq. 2; logsigmoid stays finite for any s
    g = dgr(s, beta)  # Eq. 4
    weight = k * g if r == "dgr" else torch.full_like(g, float(r))
    sft_per_pair = weight * err_w  # Eq. 6's SFT term; weight carries no graph
    loss = (dpo_per_pair + sft_per_pair).mean()
    return loss, _floats(
        loss=loss,
        dpo_loss=dpo_per_pair.mean(),
        sft_term=sft_per_pair.mean(),
        dgr=g.mean(),
        r=weight.mean(),
        dgr_plus_r=(g + weight).mean(),
        **_pair_stats(err_w, err_l, ref_w, ref_l, s),
    )


def region_loss(err_w: Tensor, err_l: Tensor, ref_w: Tensor, ref_l: Tensor, *,
                beta: float = 500.0) -> tuple[Tensor, Metrics]:
    """LocalDPO's region-aware DPO: Eq. 2 on errors from `masked_error` over the corrupted region.

    The loss itself is DPO; what makes it regional is that all four errors are masked means
    with the pair's mask (the same mask for win, lose, policy and reference).
    """
    return dpo_loss(err_w, err_l, ref_w, ref_l, beta=beta)


def sft_loss(err_w: Tensor, err_l: Tensor | None = None, ref_w: Tensor | None = None,
             ref_l: Tensor | None = None, *, beta: float = 500.0) -> tuple[Tensor, Metrics]:
    """Supervised fine-tuning on the winners: mean e_θ^w.

    Given the lose and reference errors too, the pair diagnostics (gaps, s, DGR, the DPO loss
    as a monitor) are logged so an SFT baseline draws the same Fig. 2 panels.
    """
    _check_errors(err_w=err_w)
    loss = err_w.mean()
    if err_l is None or ref_w is None or ref_l is None:
        return loss, _floats(loss=loss, sft_term=loss, err_win=loss)
    _, pair = dpo_loss(err_w.detach(), err_l.detach(), ref_w, ref_l, beta=beta)
    monitors = {k: v for k, v in pair.items() if k not in ("r", "dgr_plus_r")}
    return loss, monitors | _floats(loss=loss, sft_term=loss)


def kto_loss(err: Tensor, ref: Tensor, desirable: Tensor, *, beta: float = 500.0,
             desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[Tensor, Metrics]:
    """Diffusion-KTO (Li et al. 2024) on single samples with a detached KL baseline.

    Per sample the implicit reward is ρ = −b·(e_θ − e_ref) (lower error than the reference ⇒
    higher likelihood). The reference point is z = max(0, mean_batch ρ), detached: KTO's
    z_ref = max(0, KL(π_θ‖π_ref)) estimated as the batch's mean implicit log-ratio, as the
    Diffusion-KTO reference code does (its kl = clamp(mean(g), min=0).detach()). Losses:
        desirable:    λ_D·(1 − σ(ρ − z))        undesirable:  λ_U·(1 − σ(z − ρ))
    averaged over the batch. Choices: the scale is b = β/2 like every loss here, so Diffusion-KTO's
    β equals our β/2; z is the mean over this call's batch only — under data parallelism pass
    the errors gathered from all ranks for the same estimate the reference code all-reduces.
    """
    _check_errors(err=err, ref=ref)
    if desirable.dtype != torch.bool or desirable.shape != err.shape:
        raise ValueError(
            f"desirable must be a bool tensor of shape {tuple(err.shape)} (one label per sample); "
            f"got {desirable.dtype} of shape {tuple(desirable.shape)}"
        )
    b = beta / 2
    ref = ref.detach()
    rho = -b * (err - ref)
    z = rho.detach().mean().clamp(min=0)  # KL baseline: no gradient flows through it
    sign = torch.where(desirable, 1.0, -1.0).to(rho.dtype)
    margin = sign * (rho - z)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(rho.dtype)
    loss = (weight * (1 - torch.sigmoid(margin))).mean()
    stats = dict(loss=loss, kto_loss=loss, kl=z, reward=rho.mean(),
                 implicit_acc=(margin > 0).to(rho.dtype).mean(), err=err.mean(), err_ref=ref.mean(),
                 n_desirable=desirable.sum(), n_undesirable=(~desirable).sum())
    if desirable.any():
        stats["reward_desirable"] = rho[desirable].mean()
    if not desirable.all():
        stats["reward_undesirable"] = rho[~desirable].mean()
    return loss, _floats(**stats)


def add_nll(loss: Tensor, metrics: Metrics, err: Tensor, *, nll_lambda: float,
            on: str = "real", where: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """Dual-IPO's NLL regulariser: loss + λ·mean(e_θ) over the samples `err` (`on` names them:
    real videos, or the winners). The flow-matching error is the diffusion model's negative
    log-likelihood bound up to constants, so lowering it keeps those videos likely.

    `where` (bool, like err) restricts the mean to the marked samples; with none marked the
    term is 0 (a KTO batch without a desirable sample). Metrics: nll_term (the sum of every
    NLL term added so far), nll_<on> (this term) and err_<on> (the mean error it weighs).
    """
    _check_errors(**{f"err_{on}": err})
    if where is None:
        mean = err.mean()
    else:
        weights = where.to(err.dtype)
        mean = (err * weights).sum() / weights.sum().clamp(min=1)
    nll_term = nll_lambda * mean
    total = loss + nll_term
    before = metrics.get("nll_term", 0.0)
    new = _floats(loss=total, nll_term=nll_term, **{f"nll_{on}": nll_term, f"err_{on}": mean})
    return total, metrics | new | {"nll_term": before + new["nll_term"]}


def nll_terms(cfg: PreferenceLoss, loss: Tensor, metrics: Metrics, winners: Tensor,
              err_real: Tensor | None, *, where: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """The configured NLL terms (train.loss.nll_on): λ·mean e_θ on real videos, on the winners
    (`winners`, restricted to `where` when given), or one term on each; nothing when λ = 0."""
    if cfg.nll_lambda <= 0:
        return loss, metrics
    if cfg.nll_on in ("real", "both"):
        if err_real is None:
            raise ValueError(
                f"train.loss.nll_lambda = {cfg.nll_lambda} with nll_on {cfg.nll_on!r} needs "
                "err_real, the policy's errors on real videos; pass them, set nll_on to "
                "'winners', or set nll_lambda to 0"
            )
        loss, metrics = add_nll(loss, metrics, err_real, nll_lambda=cfg.nll_lambda)
    if cfg.nll_on in ("winners", "both"):
        loss, metrics = add_nll(loss, metrics, winners, nll_lambda=cfg.nll_lambda,
                                on="winners", where=where)
    return loss, metrics


def preference_loss(cfg: PreferenceLoss, err_w: Tensor, err_l: Tensor, ref_w: Tensor,
                    ref_l: Tensor, *, err_real: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """The configured loss on a batch of pairs; `err_*` are [B] per-sample errors.

    For kind="region" compute all four errors with `masked_error` and the pair's mask. For
    kind="kto" the winners are the desirable samples and the losers the undesirable ones, so
    err_w and err_l may differ in length. `err_real` (policy errors on real videos) is needed
    when nll_lambda > 0 and nll_on is real or both; the winners' NLL term uses err_w.
    """
    if cfg.kind == "regdpo":
        loss, metrics = regdpo_loss(err_w, err_l, ref_w, ref_l, beta=cfg.beta, r=cfg.r, k=cfg.k)
    elif cfg.kind == "dpo":
        loss, metrics = dpo_loss(err_w, err_l, ref_w, ref_l, beta=cfg.beta)
    elif cfg.kind == "region":
        loss, metrics = region_loss(err_w, err_l, ref_w, ref_l, beta=cfg.beta)
    elif cfg.kind == "sft":
        loss, metrics = sft_loss(err_w, err_l, ref_w, ref_l, beta=cfg.beta)
    else:
        _check_errors(err_w=err_w, ref_w=ref_w)
        _check_errors(err_l=err_l, ref_l=ref_l)
        desirable = torch.cat([torch.ones_like(err_w, dtype=torch.bool),
                               torch.zeros_like(err_l, dtype=torch.bool)])
        loss, metrics = kto_loss(torch.cat([err_w, err_l]), torch.cat([ref_w, ref_l]), desirable,
                                 beta=cfg.beta, desirable_weight=cfg.kto_desirable_weight,
                                 undesirable_weight=cfg.kto_undesirable_weight)
    return nll_terms(cfg, loss, metrics, err_w, err_real)


def pointwise_loss(cfg: PreferenceLoss, err: Tensor, ref: Tensor, desirable: Tensor, *,
                   err_real: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """Diffusion-KTO on single labelled videos (Dual-IPO's pointwise rows): kto_loss on the [B]
    errors and labels, plus the configured NLL terms (the winners are the desirable samples)."""
    if cfg.kind != "kto":
        raise ValueError(f"pointwise rows train kind 'kto' only, not {cfg.kind!r}: set "
                         "train.loss.kind: kto, or train on pairs")
    loss, metrics = kto_loss(err, ref, desirable, beta=cfg.beta,
                             desirable_weight=cfg.kto_desirable_weight,
                             undesirable_weight=cfg.kto_undesirable_weight)
    return nll_terms(cfg, loss, metrics, err, err_real, where=desirable)


def _pair_stats(err_w: Tensor, err_l: Tensor, ref_w: Tensor, ref_l: Tensor,
                s: Tensor) -> dict[str, Tensor]:
    """The Fig. 2 panels that do not depend on r: gaps, s, implicit accuracy, the four errors."""
    return dict(
        win_gap=(err_w - ref_w).mean(),
        lose_gap=(err_l - ref_l).mean(),
        s=s.mean(),
        implicit_acc=(s < 0).to(s.dtype).mean(),  # s < 0: the policy prefers the winner more
        err_win=err_w.mean(),
        err_lose=err_l.mean(),
        err_ref_win=ref_w.mean(),
        err_ref_lose=ref_l.mean(),
    )


def _floats(**values: Tensor) -> Metrics:
    # One device→host copy for all metrics instead of one sync per .item().
    stacked = torch.stack([v.detach().to(torch.float64).reshape(()) for v in values.values()])
    return dict(zip(values, stacked.cpu().tolist()))


def _check_errors(**errors: Tensor) -> None:
    """Each argument is a non-empty 1-D tensor of per-sample errors, all of the same length."""
    first_name, first = next(iter(errors.items()))
    for name, t in errors.items():
        if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() == 0:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"{name} must be a non-empty 1-D tensor of per-sample errors [B]; got {shape} "
                "(reduce the latent with flow_error or masked_error first)"
            )
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {first_name} has {tuple(first.shape)}; "
                "pass one error per sample for each"
            )
