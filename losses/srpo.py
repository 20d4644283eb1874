"""SRPO, the critic's self-refinement (Dual-IPO, arXiv 2502.02088 v4, "Self-Refined Preference
Optimization"): DPO on the critic's own reasoning chains, weighted by the Preference Certainty
Estimator. Inputs are sequence log-probs log π(y | x) (models.critic.response_logprobs) of the
policy (critic + LoRA) and the reference (the same critic, adapters disabled); reference
log-probs and PCE are detached here whatever the caller passes. Pure: no I/O, no models.

The paper's definitions:

    R(y | x)     = log π_θ(y | x) / π_ref(y | x)                   implicit reward (DPO)
    PCE(y_w | x) = P_θ( R(y_w | x) > Q ),  Q = the dataset's average reward
    keep a pseudo-label (x, y_w, y_l) only if PCE(y_w | x) > 0.5
    L_SRPO       = E_(x, y_w, y_l) [ PCE(y_w | x) · L_DPO ]
    L_DPO        = −log σ( β·(R(y_w | x) − R(y_l | x)) )

Choices the paper leaves open (ours, documented):

- The probability P_θ(R > Q): the Bradley–Terry probability DPO itself assumes, with the same
  β as the loss: PCE = σ(β·(R(y_w|x) − Q)), i.e. the critic's own probability that this
  preferred chain beats a chain of average reward. PCE > 0.5 ⇔ R(y_w|x) > Q whatever β is.
- Q: the mean of R(y_w | x) over the preferred chains of the pseudo-labelled set being filtered
  (all candidates, before the filter); a caller may pass its own Q.
- The expectation: the mean over the kept pairs (PCE weights, not renormalised), so a set of
  uncertain pairs pulls less than a set of certain ones.
- A fresh adapter (policy = reference) gives R ≡ 0, so every PCE is exactly 0.5 and nothing is
  kept: there is no certainty before the critic has learnt something (the human seed pairs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Metrics = dict[str, float]


def implicit_reward(logp_policy: Tensor, logp_ref: Tensor) -> Tensor:
    """R(y | x) = log π_θ(y|x) − log π_ref(y|x), per sequence."""
    return logp_policy - logp_ref.detach()


def preference_certainty(reward_w: Tensor, beta: float, mean_reward: float | Tensor | None = None
                         ) -> tuple[Tensor, Tensor]:
    """(PCE per pseudo-label, Q): PCE = σ(β·(R(y_w|x) − Q)), Q = mean R(y_w|x) over the set
    unless given. Detached: PCE is a weight, not a path for gradients."""
    reward_w = reward_w.detach()
    q = reward_w.mean() if mean_reward is None else torch.as_tensor(mean_reward, dtype=reward_w.dtype)
    return torch.sigmoid(beta * (reward_w - q)), q


def certain(pce: Tensor, threshold: float = 0.5) -> Tensor:
    """Which pseudo-labels SRPO keeps: PCE strictly above the threshold (the paper: 0.5)."""
    return pce > threshold


def srpo_loss(policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, pce: Tensor, *,
              beta: float = 0.1) -> tuple[Tensor, Metrics]:
    """L_SRPO: the mean over kept pairs of PCE · −log σ(β·(R_w − R_l)).

    Gradient (checked against autograd in tests): ∂L/∂log π_θ(y_w|x) = −PCE·β·σ(−β·m)/N and
    ∂L/∂log π_θ(y_l|x) = +PCE·β·σ(−β·m)/N, with m = R_w − R_l and N pairs.
    """
    if policy_w.numel() == 0:
        raise ValueError("SRPO got no pairs: every pseudo-label was filtered out (PCE ≤ "
                         "threshold); skip the critic's update for this round")
    reward_w = implicit_reward(policy_w, ref_w)
    reward_l = implicit_reward(policy_l, ref_l)
    margin = reward_w - reward_l
    dpo = -F.logsigmoid(beta * margin)  # numerically stable −log σ
    weight = pce.detach().to(dpo.dtype)
    loss = (weight * dpo).mean()
    metrics = {
        "loss": loss.item(),
        "dpo": dpo.mean().item(),
        "pce": weight.mean().item(),
        "reward_w": reward_w.mean().item(),
        "reward_l": reward_l.mean().item(),
        "margin": margin.mean().item(),
        "accuracy": (margin > 0).to(margin.dtype).mean().item(),
        "pairs": float(policy_w.numel()),
    }
    return loss, metrics
