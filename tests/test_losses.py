"""The preference losses against the paper's math (Reg-DPO Eqs. 2, 4, 5, 6), in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from losses import (
    PreferenceLoss,
    add_nll,
    dgr,
    dpo_loss,
    flow_error,
    kto_loss,
    masked_error,
    preference_loss,
    region_loss,
    regdpo_loss,
    sft_loss,
)

LATENT = (2, 3, 4, 4)  # C, F, H, W
N = math.prod(LATENT)
PAIR_METRICS = {"loss", "dpo_loss", "sft_term", "dgr", "r", "dgr_plus_r", "win_gap", "lose_gap",
                "s", "implicit_acc", "err_win", "err_lose", "err_ref_win", "err_ref_lose"}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class LinearPairs:
    """A tiny linear "model" v = W x on random pairs; the reference is W at initialisation."""

    def __init__(self, batch: int = 5, d_in: int = 6, step: float = 1e-3, seed: int = 0):
        g = _gen(seed)
        self.batch = batch
        self.w_ref = torch.randn(N, d_in, generator=g, dtype=torch.float64)
        # A small step away from the reference keeps b·s in sigmoid's non-saturated range.
        self.w = (self.w_ref + step * torch.randn(N, d_in, generator=g, dtype=torch.float64))
        self.w.requires_grad_(True)
        self.x_w, self.x_l = (torch.randn(batch, d_in, generator=g, dtype=torch.float64)
                              for _ in range(2))
        self.y_w, self.y_l = (torch.randn(batch, *LATENT, generator=g, dtype=torch.float64)
                              for _ in range(2))

    def predict(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x @ w.T).reshape(self.batch, *LATENT)

    def errors(self):
        """(v_w, v_l, err_w, err_l, ref_w, ref_l); v_* retain their gradient."""
        v_w, v_l = self.predict(self.w, self.x_w), self.predict(self.w, self.x_l)
        v_w.retain_grad()
        v_l.retain_grad()
        with torch.no_grad():
            ref_w = flow_error(self.predict(self.w_ref, self.x_w), self.y_w)
            ref_l = flow_error(self.predict(self.w_ref, self.x_l), self.y_l)
        return v_w, v_l, flow_error(v_w, self.y_w), flow_error(v_l, self.y_l), ref_w, ref_l


def _errors(batch: int = 6, seed: int = 1, requires_grad: bool = True):
    g = _gen(seed)
    ref_w, ref_l = (torch.rand(batch, generator=g, dtype=torch.float64) + 0.5 for _ in range(2))
    err_w = (ref_w + 1e-3 * torch.randn(batch, generator=g, dtype=torch.float64))
    err_l = (ref_l + 1e-3 * torch.randn(batch, generator=g, dtype=torch.float64))
    return err_w.requires_grad_(requires_grad), err_l.requires_grad_(requires_grad), ref_w, ref_l


# ---------------------------------------------------------------------------------------
# Reg-DPO's gradient is the paper's Eq. 5
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "beta, step, r, k",
    [
        (500.0, 1e-3, "dgr", 1.0),  # the paper's default
        (500.0, 1e-3, 50.0, 1.0),  # a constant r (Table 10)
        (5.0, 1e-1, "dgr", 2.0),  # r = DGR × 2
        (500.0, 1e-3, 0.0, 1.0),  # r = 0: vanilla DPO's Eq. 3
    ],
)
def test_regdpo_gradient_is_eq5(beta, step, r, k):
    m = LinearPairs(step=step)
    v_w, v_l, err_w, err_l, ref_w, ref_l = m.errors()
    loss, _ = regdpo_loss(err_w, err_l, ref_w, ref_l, beta=beta, r=r, k=k)
    loss.backward()

    b = beta / 2
    with torch.no_grad():
        s = (err_w - ref_w) - (err_l - ref_l)
        dgr_i = b * (1 - torch.sigmoid(-b * s))  # Eq. 4
        r_i = k * dgr_i if r == "dgr" else torch.full_like(dgr_i, r)
    # The check means something only where DGR is neither 0 nor b.
    assert (dgr_i > 1e-3 * b).all() and (dgr_i < (1 - 1e-3) * b).all(), dgr_i

    # Eq. 5 per pair, with d mean((y − v)²)/dv = −(2/N)(y − v) and the batch mean's 1/B.
    res_w = (m.y_w - v_w).detach().reshape(m.batch, N)
    res_l = (m.y_l - v_l).detach().reshape(m.batch, N)
    c_w = (2 / N) * (dgr_i + r_i)[:, None] / m.batch
    c_l = (2 / N) * dgr_i[:, None] / m.batch
    # w.r.t. the model output y_θ …
    assert torch.allclose(v_w.grad.reshape(m.batch, N), -c_w * res_w, rtol=1e-9, atol=1e-14)
    assert torch.allclose(v_l.grad.reshape(m.batch, N), c_l * res_l, rtol=1e-9, atol=1e-14)
    # … and w.r.t. θ = W, where ∇_W y_θ(x) turns (y − y_θ)ᵀ∇y_θ into the outer product with x.
    eq5 = -((c_w * res_w).T @ m.x_w - (c_l * res_l).T @ m.x_l)
    assert torch.allclose(m.w.grad, eq5, rtol=1e-9, atol=1e-14)


def test_regdpo_with_r_zero_is_dpo_loss_and_grads():
    beta = 500.0
    grads = []
    losses = []
    for fn in ("regdpo", "dpo", "by_hand"):
        m = LinearPairs(seed=3)
        _, _, err_w, err_l, ref_w, ref_l = m.errors()
        if fn == "regdpo":
            loss, _ = regdpo_loss(err_w, err_l, ref_w, ref_l, beta=beta, r=0.0)
        elif fn == "dpo":
            loss, _ = dpo_loss(err_w, err_l, ref_w, ref_l, beta=beta)
        else:  # Diffusion-DPO's reference form: inside = −½β(model_diff − ref_diff)
            inside = -0.5 * beta * ((err_w - err_l) - (ref_w - ref_l))
            loss = -F.logsigmoid(inside).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(m.w.grad.clone())
    assert torch.allclose(losses[0], losses[2], rtol=1e-12) and torch.allclose(losses[1], losses[2])
    assert torch.allclose(grads[0], grads[2], rtol=1e-10, atol=1e-16)
    assert torch.allclose(grads[1], grads[2], rtol=1e-10, atol=1e-16)
    assert grads[2].abs().max() > 0


def test_regdpo_loss_is_eq6():
    err_w, err_l, ref_w, ref_l = _errors()
    beta, k = 500.0, 1.5
    loss, metrics = regdpo_loss(err_w, err_l, ref_w, ref_l, beta=beta, k=k)
    b = beta / 2
    s = (err_w - ref_w) - (err_l - ref_l)
    l_dpo = -torch.log(torch.sigmoid(-b * s))
    r = k * b * (1 - torch.sigmoid(-b * s))
    assert loss.item() == pytest.approx((l_dpo + r * err_w).mean().item(), rel=1e-12)
    assert metrics["dpo_loss"] == pytest.approx(l_dpo.mean().item(), rel=1e-12)
    assert metrics["sft_term"] == pytest.approx((r * err_w).mean().item(), rel=1e-12)
    assert metrics["r"] == pytest.approx(r.mean().item(), rel=1e-12)
    assert metrics["dgr_plus_r"] == pytest.approx(metrics["dgr"] + metrics["r"], rel=1e-12)
    assert metrics["loss"] == pytest.approx(metrics["dpo_loss"] + metrics["sft_term"], rel=1e-12)


def test_constant_r_weights_the_sft_term():
    err_w, err_l, ref_w, ref_l = _errors()
    loss, metrics = regdpo_loss(err_w, err_l, ref_w, ref_l, r=125.0)
    dpo, _ = dpo_loss(err_w, err_l, ref_w, ref_l)
    assert loss.item() == pytest.approx(dpo.item() + 125.0 * err_w.mean().item(), rel=1e-12)
    assert metrics["r"] == 125.0


# ---------------------------------------------------------------------------------------
# DGR (Eq. 4)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [5.0, 500.0, 5000.0])
def test_dgr_is_bounded_by_b(dtype, beta):
    b = beta / 2
    extreme = torch.tensor(
        [-math.inf, -1e30, -1e6, -1.0, -1e-9, 0.0, 1e-9, 1.0, 1e6, 1e30, math.inf])
    s = torch.cat([extreme, 10 * torch.randn(200, generator=_gen(5))]).to(dtype)
    d = dgr(s, beta)
    assert torch.isfinite(d).all()
    assert (d >= 0).all() and (d <= b).all()
    assert d[s == math.inf].eq(b).all() and d[s == -math.inf].eq(0).all()
    moderate = s.abs() < 1e3 / b
    expected = b * (1 - torch.sigmoid(-b * s.double()))  # Eq. 4 as written
    assert torch.allclose(d[moderate].double(), expected[moderate], rtol=1e-5)


def test_metrics_dgr_bounded_and_s_is_win_gap_minus_lose_gap():
    g = _gen(7)
    for scale in (1e-3, 1.0, 1e3):
        ref_w, ref_l = torch.rand(8, generator=g) + 0.1, torch.rand(8, generator=g) + 0.1
        err_w = ref_w + scale * torch.randn(8, generator=g)
        err_l = ref_l + scale * torch.randn(8, generator=g)
        loss, m = regdpo_loss(err_w, err_l, ref_w, ref_l, beta=500.0)
        assert math.isfinite(loss.item())
        assert 0 <= m["dgr"] <= 250.0
        assert m["s"] == pytest.approx(m["win_gap"] - m["lose_gap"], rel=1e-5, abs=1e-6)
        s = (err_w - ref_w) - (err_l - ref_l)
        assert m["s"] == pytest.approx(s.mean().item(), rel=1e-5, abs=1e-6)
        assert m["implicit_acc"] == pytest.approx((s < 0).float().mean().item())


def test_step_zero_dgr_is_half_b():
    # Policy = reference (LoRA at init): s = 0, so DGR = b/2 = β/4 = 125 for β = 500 (Fig. 2).
    err_w = torch.tensor([0.4, 0.7, 1.1], dtype=torch.float64, requires_grad=True)
    err_l = torch.tensor([0.5, 0.9, 1.3], dtype=torch.float64, requires_grad=True)
    loss, m = regdpo_loss(err_w, err_l, err_w.detach(), err_l.detach(), beta=500.0)
    assert m["s"] == 0 and m["win_gap"] == 0 and m["lose_gap"] == 0
    assert m["dgr"] == pytest.approx(125.0) and m["r"] == pytest.approx(125.0)
    assert m["dgr_plus_r"] == pytest.approx(250.0)
    assert m["dpo_loss"] == pytest.approx(math.log(2))
    assert m["implicit_acc"] == 0.0
    assert loss.item() == pytest.approx(math.log(2) + 125.0 * err_w.mean().item())
    assert m["err_win"] == pytest.approx(err_w.mean().item())
    assert m["err_ref_lose"] == pytest.approx(err_l.mean().item())


def test_dgr_and_r_are_detached():
    err_w, err_l, ref_w, ref_l = _errors(seed=11)
    ref_w.requires_grad_(True)  # a careless caller; the loss must still not reach the reference
    ref_l.requires_grad_(True)
    beta, k = 500.0, 1.0
    loss, _ = regdpo_loss(err_w, err_l, ref_w, ref_l, beta=beta, k=k)
    loss.backward()
    assert ref_w.grad is None and ref_l.grad is None

    # Explicit: r is a number; the only gradient into e^w besides DPO's DGR is r itself.
    b, batch = beta / 2, err_w.numel()
    with torch.no_grad():
        s = (err_w - ref_w) - (err_l - ref_l)
        dgr_i = b * (1 - torch.sigmoid(-b * s))
    assert torch.allclose(err_w.grad, (dgr_i + k * dgr_i) / batch, rtol=1e-10)
    assert torch.allclose(err_l.grad, -dgr_i / batch, rtol=1e-10)

    # The same loss with r left attached would give a different gradient: the check can fail.
    e_w = err_w.detach().requires_grad_(True)
    s_att = (e_w - ref_w.detach()) - (err_l.detach() - ref_l.detach())
    attached = (-F.logsigmoid(-b * s_att) + k * b * torch.sigmoid(b * s_att) * e_w).mean()
    attached.backward()
    assert not torch.allclose(e_w.grad, err_w.grad, rtol=1e-3)


def test_dpo_gradient_direction():
    err_w, err_l, ref_w, ref_l = _errors(seed=12)
    loss, _ = regdpo_loss(err_w, err_l, ref_w, ref_l)
    loss.backward()
    assert (err_w.grad > 0).all()  # descent lowers the winner's error …
    assert (err_l.grad < 0).all()  # … and raises the loser's


# ---------------------------------------------------------------------------------------
# Region (LocalDPO)
# ---------------------------------------------------------------------------------------

def test_region_loss_with_full_mask_is_dpo():
    g = _gen(13)
    batch = 4
    pred_w, pred_l, ref_pred_w, ref_pred_l, y_w, y_l = (
        torch.randn(batch, *LATENT, generator=g, dtype=torch.float64) for _ in range(6))
    pred_w.requires_grad_(True)
    ones = torch.ones(batch, 1, *LATENT[1:], dtype=torch.float64)

    def run(err_fn, loss_fn):
        pred_w.grad = None
        loss, metrics = loss_fn(err_fn(pred_w, y_w), err_fn(pred_l, y_l),
                                err_fn(ref_pred_w, y_w), err_fn(ref_pred_l, y_l), beta=500.0)
        loss.backward()
        return loss.detach(), metrics, pred_w.grad.clone()

    region = run(lambda p, y: masked_error(p, y, ones), region_loss)
    plain = run(flow_error, dpo_loss)
    assert torch.allclose(region[0], plain[0], rtol=1e-12)
    assert torch.allclose(region[2], plain[2], rtol=1e-10, atol=1e-16)
    assert region[1] == pytest.approx(plain[1], rel=1e-10, abs=1e-12)


def test_masked_error_is_weighted_mean_over_region():
    g = _gen(14)
    pred, y = (torch.randn(3, *LATENT, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(3, 1, *LATENT[1:], generator=g, dtype=torch.float64)  # soft, shared by C
    mask[:, :, :, :2] = 0
    e = masked_error(pred, y, mask)
    full = mask.expand_as(pred)
    expected = (full * (y - pred) ** 2).sum(dim=(1, 2, 3, 4)) / full.sum(dim=(1, 2, 3, 4))
    assert e.shape == (3,)
    assert torch.allclose(e, expected, rtol=1e-12)
    # What lies outside the region does not matter.
    outside = mask.expand_as(pred) == 0
    changed = torch.where(outside, pred + 100.0, pred)
    assert torch.allclose(masked_error(changed, y, mask), e, rtol=1e-12)
    assert torch.allclose(masked_error(pred, y, torch.ones(1)), flow_error(pred, y), rtol=1e-12)


def test_masked_error_zero_mask_is_zero_without_nan_grads():
    g = _gen(15)
    pred = torch.randn(2, *LATENT, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, *LATENT, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 1, *LATENT[1:], dtype=torch.float64)
    mask[1] = 0
    e = masked_error(pred, y, mask)
    assert e[1] == 0 and e[0] > 0
    e.sum().backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[1].abs().max() == 0 and pred.grad[0].abs().max() > 0


def test_error_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="target"):
        flow_error(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask"):
        masked_error(torch.zeros(2, *LATENT), torch.zeros(2, *LATENT), torch.ones(3, 1, 1, 1, 1))


# ---------------------------------------------------------------------------------------
# KTO (Diffusion-KTO, as used by Dual-IPO)
# ---------------------------------------------------------------------------------------

def _kto_batch(policy_better: bool):
    g = _gen(21)
    ref = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
    shift = -2e-3 if policy_better else 2e-3  # mean ρ > 0 ⇒ the KL baseline z is active
    err = ref + shift + 1e-3 * torch.randn(8, generator=g, dtype=torch.float64)
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    return err.requires_grad_(True), ref, desirable


def test_kto_gradient_direction():
    for policy_better in (True, False):
        err, ref, desirable = _kto_batch(policy_better)
        loss, m = kto_loss(err, ref, desirable, beta=500.0)
        loss.backward()
        assert (err.grad[desirable] > 0).all()  # descent lowers desirable errors
        assert (err.grad[~desirable] < 0).all()  # and raises undesirable ones
        assert m["n_desirable"] == 4 and m["n_undesirable"] == 4


def test_kto_matches_formula_with_detached_kl_baseline():
    err, ref, desirable = _kto_batch(policy_better=True)
    beta, w_d, w_u = 500.0, 1.0, 1.5
    loss, m = kto_loss(err, ref, desirable, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    loss.backward()

    b, batch = beta / 2, err.numel()
    with torch.no_grad():
        rho = -b * (err - ref)
        z = max(rho.mean().item(), 0.0)
        sign = desirable.double() * 2 - 1
        weight = torch.where(desirable, w_d, w_u).double()
        sig = torch.sigmoid(sign * (rho - z))
    assert z > 0, "the batch must exercise the KL baseline"
    assert m["kl"] == pytest.approx(z, rel=1e-12)
    assert loss.item() == pytest.approx((weight * (1 - sig)).mean().item(), rel=1e-12)
    # z constant: dL/de_i = w_i·σ'(m_i)·sign_i·b / B, with no coupling through the batch mean.
    expected = weight * sig * (1 - sig) * sign * b / batch
    assert torch.allclose(err.grad, expected, rtol=1e-10)

    # An attached z would couple the samples: the gradient would differ, so the check can fail.
    e = err.detach().requires_grad_(True)
    rho_att = -b * (e - ref)
    attached = (weight * (1 - torch.sigmoid(sign * (rho_att - rho_att.mean().clamp(min=0))))).mean()
    attached.backward()
    assert not torch.allclose(e.grad, expected, rtol=1e-3)


def test_kto_kl_baseline_clamped_at_zero():
    err, ref, desirable = _kto_batch(policy_better=False)
    _, m = kto_loss(err, ref, desirable)
    assert m["reward"] < 0 and m["kl"] == 0.0


def test_kto_dispatch_uses_winners_as_desirable():
    err_w, err_l, ref_w, ref_l = _errors(seed=22)
    cfg = PreferenceLoss(kind="kto", kto_undesirable_weight=2.0)
    loss, m = preference_loss(cfg, err_w, err_l[:4], ref_w, ref_l[:4])  # lengths may differ
    direct, _ = kto_loss(torch.cat([err_w, err_l[:4]]), torch.cat([ref_w, ref_l[:4]]),
                         torch.tensor([True] * 6 + [False] * 4), undesirable_weight=2.0)
    assert loss.item() == pytest.approx(direct.item(), rel=1e-12)
    assert m["n_desirable"] == 6 and m["n_undesirable"] == 4


def test_kto_rejects_bad_labels():
    err, ref, _ = _kto_batch(True)
    with pytest.raises(ValueError, match="desirable"):
        kto_loss(err, ref, torch.ones(8))
    with pytest.raises(ValueError, match="desirable"):
        kto_loss(err, ref, torch.ones(7, dtype=torch.bool))


# ---------------------------------------------------------------------------------------
# NLL regulariser (Dual-IPO), SFT, dispatch
# ---------------------------------------------------------------------------------------

def test_nll_adds_lambda_times_mean_real_error():
    err_w, err_l, ref_w, ref_l = _errors(seed=31)
    err_real = torch.tensor([0.3, 0.6, 0.9, 1.5], dtype=torch.float64, requires_grad=True)
    base, base_m = dpo_loss(err_w, err_l, ref_w, ref_l)
    loss, m = add_nll(base, base_m, err_real, nll_lambda=0.25)
    assert loss.item() == pytest.approx(base.item() + 0.25 * 0.825, rel=1e-12)
    assert m["nll_term"] == pytest.approx(0.25 * 0.825) and m["err_real"] == pytest.approx(0.825)
    assert m["loss"] == pytest.approx(loss.item()) and m["dpo_loss"] == base_m["dpo_loss"]
    loss.backward()
    assert torch.allclose(err_real.grad, torch.full((4,), 0.25 / 4, dtype=torch.float64))

    cfg = PreferenceLoss(kind="dpo", nll_lambda=0.25)
    via_cfg, _ = preference_loss(cfg, err_w, err_l, ref_w, ref_l, err_real=err_real)
    assert via_cfg.item() == pytest.approx(loss.item(), rel=1e-12)
    with pytest.raises(ValueError, match="nll_lambda"):
        preference_loss(cfg, err_w, err_l, ref_w, ref_l)


def test_sft_is_mean_winner_error():
    err_w, err_l, ref_w, ref_l = _errors(seed=32)
    loss, m = sft_loss(err_w, err_l, ref_w, ref_l)
    assert loss.item() == pytest.approx(err_w.mean().item(), rel=1e-12)
    assert m["sft_term"] == m["loss"] == pytest.approx(err_w.mean().item())
    assert "win_gap" in m and "dgr" in m  # diagnostics for the Fig. 2 panels
    loss.backward()
    assert err_l.grad is None
    assert torch.allclose(err_w.grad, torch.full_like(err_w, 1 / err_w.numel()))
    alone, m_alone = sft_loss(err_w)
    assert alone.item() == loss.item() and m_alone["err_win"] == pytest.approx(loss.item())


@pytest.mark.parametrize("kind", ["dpo", "regdpo", "sft", "region"])
def test_dispatch_matches_the_named_loss(kind):
    err_w, err_l, ref_w, ref_l = _errors(seed=33)
    cfg = PreferenceLoss(kind=kind, beta=300.0, r="dgr", k=0.5)
    loss, metrics = preference_loss(cfg, err_w, err_l, ref_w, ref_l)
    direct = {
        "dpo": lambda: dpo_loss(err_w, err_l, ref_w, ref_l, beta=300.0),
        "regdpo": lambda: regdpo_loss(err_w, err_l, ref_w, ref_l, beta=300.0, k=0.5),
        "sft": lambda: sft_loss(err_w, err_l, ref_w, ref_l, beta=300.0),
        "region": lambda: region_loss(err_w, err_l, ref_w, ref_l, beta=300.0),
    }[kind]()
    assert loss.item() == direct[0].item() and metrics == direct[1]
    assert all(isinstance(v, float) for v in metrics.values())
    if kind != "sft":
        assert PAIR_METRICS <= set(metrics)


def test_pair_inputs_are_checked():
    err_w, err_l, ref_w, ref_l = _errors()
    with pytest.raises(ValueError, match="ref_l"):
        regdpo_loss(err_w, err_l, ref_w, ref_l[:3])
    with pytest.raises(ValueError, match="err_w"):
        regdpo_loss(err_w[None], err_l, ref_w, ref_l)
    with pytest.raises(ValueError, match="err_w"):
        regdpo_loss(err_w[:0], err_l[:0], ref_w[:0], ref_l[:0])


# ---------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------

def test_config_defaults_are_the_papers():
    cfg = PreferenceLoss()
    assert (cfg.kind, cfg.beta, cfg.r, cfg.k, cfg.nll_lambda) == ("regdpo", 500.0, "dgr", 1.0, 0.0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("beta", 0.0), ("beta", -500.0), ("beta", math.nan), ("beta", math.inf), ("beta", "500"),
        ("kind", "ipo"), ("r", -1.0), ("r", "DGR"), ("r", True), ("k", -0.5), ("k", math.nan),
        ("nll_lambda", -0.1), ("kto_desirable_weight", -1.0), ("kto_undesirable_weight", math.inf),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        PreferenceLoss(**{field: value})


def test_config_accepts_constant_r_and_k():
    assert PreferenceLoss(r=125).r == 125
    assert PreferenceLoss(r=0.0, k=2.0, nll_lambda=0.1, kind="kto").kind == "kto"
