"""The critic's self-refinement step (Dual-IPO's SRPO): pseudo-labels from the critic's own
votes, PCE filtering, and a PCE-weighted DPO update of its LoRA adapter. Plain functions (no
Prefect); the round flow calls them. Math in losses/srpo.py, model code in models/critic.py.

    pairs    = srpo_pairs(judgment)                 majority chain ≻ dissenting chain, per order
    examples = [SrpoExample(inputs, chosen, rejected), ...]   token ids after the judgment
    pce, q, kept = certainty(critic, examples, cfg)   PCE = σ(β(R_w − Q)), kept = PCE > 0.5
    metrics  = srpo_step(critic, kept examples, pce[kept], optimizer, cfg.beta)
    save_adapter(critic.model, dir)                 the refined critic: an artifact of the round
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from infra.config.critic import SrpoConfig
from losses.srpo import certain, implicit_reward, preference_certainty, srpo_loss
from models.critic import Critic, lora_parameters, reference_mode, response_logprobs


@dataclass
class SrpoExample:
    """One pseudo-label: a judgment's model inputs (batch 1, as models.critic.judgment_inputs
    returns them) and the token ids of its preferred and rejected chains."""

    inputs: Mapping[str, Tensor]
    chosen: Tensor
    rejected: Tensor


def srpo_pairs(judgment: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Preference pairs from one recorded judgment (models.critic.judge_pair / judge_video):
    within each order (same inputs), every chain that dissents from the majority verdict is
    rejected against a majority chain (taken in turn). Abstaining chains are neither: they said
    nothing to prefer or reject. No majority, or no dissent, gives no pairs."""
    verdict = judgment["verdict"]
    if verdict is None:
        return []
    pairs = []
    orders = dict.fromkeys(c["order"] for c in judgment["chains"])
    for order in orders:
        chains = [c for c in judgment["chains"] if c["order"] == order]
        agree = [c for c in chains if c["verdict"] == verdict]
        dissent = [c for c in chains if c["verdict"] is not None and c["verdict"] != verdict]
        for i, rejected in enumerate(dissent if agree else []):
            chosen = agree[i % len(agree)]
            pairs.append({"order": order, "chosen": chosen["text"], "rejected": rejected["text"],
                          "chosen_seed": chosen["seed"], "rejected_seed": rejected["seed"]})
    return pairs


def _logprobs(critic: Critic, example: SrpoExample) -> Tensor:
    """[log π(chosen | x), log π(rejected | x)] under the critic as it is now."""
    return response_logprobs(critic.model, example.inputs, [example.chosen, example.rejected],
                             critic.tokenizer.pad_token_id)


def certainty(critic: Critic, examples: Sequence[SrpoExample],
              cfg: SrpoConfig) -> tuple[Tensor, float, Tensor]:
    """(PCE per example, Q, kept mask): R(y_w|x) under the current adapter against the
    reference, Q their mean over `examples`, kept = PCE > cfg.pce_threshold."""
    with torch.no_grad():
        policy_w = torch.stack([_logprobs(critic, ex)[0] for ex in examples])
        with reference_mode(critic.model):
            ref_w = torch.stack([_logprobs(critic, ex)[0] for ex in examples])
    pce, q = preference_certainty(implicit_reward(policy_w, ref_w), cfg.beta)
    return pce, q.item(), certain(pce, cfg.pce_threshold)


def make_optimizer(critic: Critic, cfg: SrpoConfig) -> torch.optim.Optimizer:
    """AdamW over the critic's LoRA weights only."""
    return torch.optim.AdamW(lora_parameters(critic.model), lr=cfg.lr,
                             weight_decay=cfg.weight_decay)


def srpo_step(critic: Critic, examples: Sequence[SrpoExample], pce: Tensor,
              optimizer: torch.optim.Optimizer, beta: float) -> dict[str, float]:
    """One update: L_SRPO over `examples` (the kept ones, with their PCE), accumulated one
    example at a time (each contributes its loss / N, so the sum is the mean of
    losses.srpo.srpo_loss over all of them), then one optimizer step. Returns the metrics
    averaged over examples."""
    if not examples:
        raise ValueError("srpo_step got no examples: every pseudo-label was filtered out "
                         "(PCE ≤ threshold); skip the critic's update for this round")
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = {}
    for example, weight in zip(examples, pce):
        with torch.no_grad(), reference_mode(critic.model):
            ref = _logprobs(critic, example)
        policy = _logprobs(critic, example)
        loss, metrics = srpo_loss(policy[:1], policy[1:], ref[:1], ref[1:], weight.reshape(1),
                                  beta=beta)
        (loss / len(examples)).backward()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v / len(examples)
    optimizer.step()
    totals["pairs"] = float(len(examples))
    return totals
