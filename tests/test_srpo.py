"""SRPO: PCE and its filter on constructed rewards, the loss's gradient against autograd, the
sequence log-prob helper, pseudo-labels from votes, and one LoRA step on the tiny critic."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from infra.config.critic import CRITIC_DIMENSIONS, CriticConfig, SrpoConfig
from losses.srpo import certain, implicit_reward, preference_certainty, srpo_loss
from models.critic import (add_lora, judgment_inputs, load_critic, lora_parameters,
                           pair_messages, reference_mode, response_ids, response_logprobs,
                           save_adapter)
from models.tiny import build_tiny_critic
from tasks.critic_refine import (SrpoExample, certainty, make_optimizer, srpo_pairs, srpo_step)
from tests.test_critic import chain, frames


@pytest.fixture(scope="module")
def tiny_critic(tmp_path_factory) -> str:
    return build_tiny_critic(tmp_path_factory.mktemp("tiny_critic"))


# ---------------------------------------------------------------------------------------
# PCE and the SRPO loss on constructed numbers
# ---------------------------------------------------------------------------------------


def test_pce_is_the_probability_that_the_reward_beats_the_mean():
    policy = torch.tensor([-10.0, -12.0, -9.0, -11.0], dtype=torch.float64)
    ref = torch.tensor([-11.0, -11.0, -11.0, -11.0], dtype=torch.float64)
    reward = implicit_reward(policy, ref)  # [1, -1, 2, 0], Q = 0.5
    pce, q = preference_certainty(reward, beta=2.0)
    assert q.item() == 0.5
    want = [1 / (1 + math.exp(-2.0 * (r - 0.5))) for r in (1, -1, 2, 0)]
    assert pce.tolist() == pytest.approx(want, abs=1e-15)
    assert certain(pce).tolist() == [True, False, True, False]  # R > Q, whatever β is
    assert certain(pce, 0.9).tolist() == [False, False, True, False]
    assert certain(preference_certainty(reward, beta=50.0)[0]).tolist() == [True, False, True, False]
    pce_q, _ = preference_certainty(reward, beta=2.0, mean_reward=1.0)  # a given Q
    assert certain(pce_q).tolist() == [False, False, True, False]


def test_a_fresh_adapter_is_certain_of_nothing():
    same = torch.tensor([-3.0, -7.0, -5.0])
    pce, q = preference_certainty(implicit_reward(same, same.clone()), beta=0.1)
    assert q.item() == 0 and pce.tolist() == [0.5] * 3 and not certain(pce).any()


def test_srpo_gradient_matches_the_formula_and_autograd():
    torch.manual_seed(0)
    n, beta = 5, 0.7
    pw = torch.randn(n, dtype=torch.float64, requires_grad=True)
    pl = torch.randn(n, dtype=torch.float64, requires_grad=True)
    rw, rl = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    pce = torch.rand(n, dtype=torch.float64).requires_grad_()  # a weight: gets no gradient
    loss, metrics = srpo_loss(pw, pl, rw, rl, pce, beta=beta)
    loss.backward()

    m = (pw - rw) - (pl - rl)
    want_loss = (pce * -torch.log(torch.sigmoid(beta * m))).mean()
    assert loss.item() == pytest.approx(want_loss.item(), abs=1e-14)
    g = (pce * beta * torch.sigmoid(-beta * m) / n).detach()
    assert torch.allclose(pw.grad, -g, atol=1e-15) and torch.allclose(pl.grad, g, atol=1e-15)
    assert pce.grad is None
    assert metrics["accuracy"] == (m > 0).double().mean().item()
    # PCE = 1 everywhere is plain DPO.
    plain, _ = srpo_loss(pw, pl, rw, rl, torch.ones(n, dtype=torch.float64), beta=beta)
    assert plain.item() == pytest.approx(-torch.log(torch.sigmoid(beta * m)).mean().item())


def test_srpo_refuses_an_empty_set():
    empty = torch.zeros(0)
    with pytest.raises(ValueError, match="filtered out"):
        srpo_loss(empty, empty, empty, empty, empty)


# ---------------------------------------------------------------------------------------
# Pseudo-labels from votes: majority chain preferred over a dissenting one, per order
# ---------------------------------------------------------------------------------------


def judgment_of(verdicts: dict[str, list]) -> dict:
    chains = [{"order": o, "index": i, "seed": 100 * j + i, "text": f"{o}{i}:{v}", "verdict": v}
              for j, (o, vs) in enumerate(verdicts.items()) for i, v in enumerate(vs)]
    from models.critic import pair_tally

    return {"chains": chains, **pair_tally(chains)}


def test_pairs_from_votes():
    judgment = judgment_of({"ab": ["a", "a", "b", None], "ba": ["a", "b", "b", "a", "a"]})
    assert judgment["verdict"] == "a" and judgment["vote_share"] == 5 / 9
    pairs = srpo_pairs(judgment)  # within an order only; majority chains taken in turn
    assert [(p["order"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("ab", "ab0:a", "ab2:b"), ("ba", "ba0:a", "ba1:b"), ("ba", "ba3:a", "ba2:b")]
    assert pairs[0]["chosen_seed"] == 0 and pairs[0]["rejected_seed"] == 2
    assert srpo_pairs(judgment_of({"ab": ["a", "b"], "ba": ["b", "a"]})) == []  # tie
    assert srpo_pairs(judgment_of({"ab": ["a", "a"], "ba": ["a", None]})) == []  # unanimous
    assert srpo_pairs(judgment_of({"ab": ["b", "b", "b"], "ba": ["a"]})) == []  # none agree in ba


# ---------------------------------------------------------------------------------------
# The tiny critic: log-probs, the reference, one SRPO step, the adapter
# ---------------------------------------------------------------------------------------


def lora_critic(tiny_critic: str, seed: int = 1):
    critic = load_critic(CriticConfig(model=tiny_critic))
    add_lora(critic, rank=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    g = torch.Generator().manual_seed(seed)  # B starts at 0, which would leave A without gradient
    with torch.no_grad():
        for p in lora_parameters(critic.model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return critic


def examples(critic, n: int = 4) -> list[SrpoExample]:
    out = []
    for i in range(n):
        inputs = judgment_inputs(critic, pair_messages(f"prompt {i}", frames((40 * i, 90, 30)),
                                                       frames((30, 90, 40 * i)), CRITIC_DIMENSIONS))
        win, lose = ("A", "B") if i % 2 else ("B", "A")
        out.append(SrpoExample(inputs, response_ids(critic, chain(win)),
                               response_ids(critic, chain(lose)[: 40 + 9 * i])))
    return out


def test_response_logprobs_is_the_sum_of_token_logprobs(tiny_critic):
    critic = lora_critic(tiny_critic)
    ex = examples(critic, 1)[0]
    short, long = ex.rejected, ex.chosen
    assert len(short) < len(long)
    with torch.no_grad():
        batched = response_logprobs(critic.model, ex.inputs, [long, short],
                                    critic.tokenizer.pad_token_id)
        for got, response in zip(batched, (long, short)):  # one at a time, token by token
            full = torch.cat([ex.inputs["input_ids"][0], response]).unsqueeze(0)
            extra = {k: v for k, v in ex.inputs.items() if k in ("pixel_values", "image_grid_thw")}
            mm = torch.cat([ex.inputs["mm_token_type_ids"][0], torch.zeros_like(response)])
            logits = critic.model(input_ids=full, attention_mask=torch.ones_like(full),
                                  mm_token_type_ids=mm.unsqueeze(0), **extra).logits[0]
            plen = ex.inputs["input_ids"].shape[1]
            logp = torch.log_softmax(logits.float(), -1)
            want = sum(logp[plen - 1 + j, t] for j, t in enumerate(response.tolist()))
            assert got.item() == pytest.approx(want.item(), rel=1e-6)  # float32 sums
        with reference_mode(critic.model):
            ref = response_logprobs(critic.model, ex.inputs, [long], critic.tokenizer.pad_token_id)
    assert not torch.allclose(ref, batched[:1])  # the adapter moves the policy off the reference
    assert all(p.requires_grad for p in lora_parameters(critic.model))  # re-enabled after


def test_one_srpo_step_moves_every_lora_weight_and_saves_the_adapter(tiny_critic, tmp_path):
    critic = lora_critic(tiny_critic)
    cfg = SrpoConfig(beta=0.5, lr=1e-3)
    exs = examples(critic)
    pce, q, kept = certainty(critic, exs, cfg)
    assert pce.shape == (4,) and 0 < kept.sum() < 4  # R_w > Q for some, not all
    kept_exs = [ex for ex, k in zip(exs, kept) if k]

    optimizer = make_optimizer(critic, cfg)
    before = [p.detach().clone() for p in lora_parameters(critic.model)]
    frozen = {n: p.detach().clone() for n, p in critic.model.named_parameters() if "lora_" not in n}
    metrics = srpo_step(critic, kept_exs, pce[kept], optimizer, cfg.beta)

    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0 and metrics["pairs"] == kept.sum()
    assert metrics["pce"] == pytest.approx(pce[kept].mean().item(), rel=1e-5)
    after = lora_parameters(critic.model)
    unchanged = [i for i, (a, b) in enumerate(zip(before, after)) if torch.equal(a, b)]
    assert not unchanged, f"{len(unchanged)} of {len(after)} LoRA weights never moved"
    assert all(torch.equal(p, frozen[n]) for n, p in critic.model.named_parameters()
               if "lora_" not in n), "a frozen weight moved"

    path = save_adapter(critic.model, tmp_path / "adapter")
    tensors = load_file(str(path))
    assert len(tensors) == len(after) and all("lora_" in k for k in tensors)
    assert save_adapter(critic.model, tmp_path / "again").read_bytes() == path.read_bytes()
    # The refined critic reloads through load_critic and scores as the trained one does.
    reloaded = load_critic(CriticConfig(model=tiny_critic), adapter=tmp_path / "adapter")
    ex = kept_exs[0]
    with torch.no_grad():
        want = response_logprobs(critic.model, ex.inputs, [ex.chosen], critic.tokenizer.pad_token_id)
        got = response_logprobs(reloaded.model, ex.inputs, [ex.chosen], critic.tokenizer.pad_token_id)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
