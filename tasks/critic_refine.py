"""The critic's refinement (Dual-IPO's SRPO; the `refine` stage, flows/refine.py): round 0
fine-tunes the critic's LoRA adapter on the human seed pairs and their rationales; round r
refines it on pseudo-labels from its own votes on the round's videos, PCE-filtered, with a
PCE-weighted DPO update. Plain functions (no Prefect). Math in losses/srpo.py, model code in
models/critic.py.

    refine_critic(store, out, payload)              the stage's work: rows + the adapter
    examples = seed_examples(critic, pairs, frames) round 0: the answers the humans imply
    sft_step(critic, examples, optimizer)           one fine-tune step (mean NLL per token)

    pairs    = srpo_pairs(judgment)                 majority chain ≻ dissenting chain, per order
    examples = [SrpoExample(inputs, chosen, rejected), ...]   token ids after the judgment
    pce, q, kept = certainty(critic, examples, cfg)   PCE = σ(β(R_w − Q)), kept = PCE > 0.5
    metrics  = srpo_step(critic, kept examples, pce[kept], optimizer, cfg.beta)
    save_adapter(critic.model, dir)                 the refined critic: an artifact of the round
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from infra.config.critic import CriticConfig, SrpoConfig
from infra.critic_seed import SeedPair, read_seed_pairs
from infra.store import Store
from losses.srpo import certain, implicit_reward, preference_certainty, srpo_loss
from models.critic import (ADAPTER_FILES, POINT_VERDICTS, Critic, add_lora, fetch_adapter,
                           judgment_inputs, load_critic, lora_parameters, pair_messages,
                           point_messages, reference_mode, response_ids, response_logprobs,
                           save_adapter, video_frames)


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


# ---------------------------------------------------------------------------------------
# Round 0: the fine-tune on the human seed pairs
# ---------------------------------------------------------------------------------------


@dataclass
class SftExample:
    """One answer the critic should write: a judgment's model inputs (batch 1) and its token ids."""

    inputs: Mapping[str, Tensor]
    target: Tensor
    label: str


def _one_line(text: str) -> str:
    return " ".join(text.split())


def seed_answer(pair: SeedPair, dimensions: Sequence[str], verdict: str) -> str:
    """The answer a seed pair teaches: a line per dimension (its note; the rationale where the
    humans left that dimension without one), then the verdict line, in the format
    models.critic.parse_verdict reads."""
    lines = [f"{d[0].upper()}{d[1:]}: {_one_line(pair.notes.get(d) or pair.rationale)}"
             for d in dimensions]
    return "\n".join([*lines, f"Verdict: {verdict}"])


def seed_examples(critic: Critic, pairs: Sequence[SeedPair],
                  frames: Callable[[str], list]) -> list[SftExample]:
    """Four answers per human-labelled pair: the pairwise verdict in both orders (A = the video
    shown first, so the label flips with the order: no position to learn) and each video
    pointwise, the preferred one good and the other bad (the seed file has no pointwise labels;
    this is our reading of a preference as a pointwise one)."""
    dims, examples = critic.cfg.dimensions, []
    for pair in pairs:
        a, b = frames(pair.video_a), frames(pair.video_b)
        for order, first, second in (("ab", a, b), ("ba", b, a)):
            shown = "A" if order[0] == pair.preferred else "B"
            inputs = judgment_inputs(critic, pair_messages(pair.prompt, first, second, dims))
            examples.append(SftExample(inputs, response_ids(critic, seed_answer(pair, dims, shown)),
                                       f"seed.{pair.id}.{order}"))
        for side, video in (("a", a), ("b", b)):
            good, bad = POINT_VERDICTS
            verdict = good if side == pair.preferred else bad
            inputs = judgment_inputs(critic, point_messages(pair.prompt, video, dims))
            examples.append(SftExample(inputs, response_ids(critic, seed_answer(pair, dims, verdict)),
                                       f"seed.{pair.id}.point_{side}"))
    return examples


def sft_step(critic: Critic, examples: Sequence[SftExample],
             optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One update on `examples`: the mean over them of −log π(answer | x) per answer token,
    accumulated one example at a time. Returns {"nll": that mean, "examples": n}."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for ex in examples:
        logp = response_logprobs(critic.model, ex.inputs, [ex.target], critic.tokenizer.pad_token_id)
        loss = -logp.sum() / len(ex.target) / len(examples)
        loss.backward()
        total += loss.item()
    optimizer.step()
    return {"nll": total, "examples": float(len(examples))}


def batches(n: int, size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """`steps` batches of `size` indices into n examples: seeded passes over a permutation,
    each pass a new one, so every example is seen once before any is seen twice."""
    rng, order = random.Random(seed), []
    for _ in range(steps):
        batch = []
        while len(batch) < min(size, n):
            if not order:
                order = list(range(n))
                rng.shuffle(order)
            batch.append(order.pop())
        yield batch


# ---------------------------------------------------------------------------------------
# Round r: pseudo-labels from the round's critique
# ---------------------------------------------------------------------------------------


def pseudo_labels(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every pseudo-label (srpo_pairs) of a critique manifest's ok rows, with what rebuilds its
    inputs: the prompt, the videos shown (store keys, in the order shown) and the judgment kind."""
    labels = []
    for row in rows:
        if row.get("status") != "ok" or row.get("kind") == "human":
            continue
        videos = {v["id"]: v["video"] for v in json.loads(row["videos"])}
        for j, judgment in enumerate(json.loads(row["judgments"])):
            for p in srpo_pairs(judgment):
                if judgment["kind"] == "pair":
                    a, b = videos[judgment["a"]], videos[judgment["b"]]
                    shown = [a, b] if p["order"] == "ab" else [b, a]
                else:
                    shown = [videos[judgment["video_id"]]]
                labels.append({"id": f"{row['id']}/{j}/{p['order']}/{p['rejected_seed']}",
                               "source": row["source"], "prompt": row["prompt"],
                               "kind": judgment["kind"], "shown": shown, **p})
    return labels


def label_examples(critic: Critic, labels: Sequence[Mapping[str, Any]],
                   frames: Callable[[str], list]) -> list[SrpoExample]:
    dims, examples = critic.cfg.dimensions, []
    for label in labels:
        shown = [frames(v) for v in label["shown"]]
        messages = (pair_messages(label["prompt"], *shown, dims) if label["kind"] == "pair"
                    else point_messages(label["prompt"], shown[0], dims))
        examples.append(SrpoExample(judgment_inputs(critic, messages),
                                    response_ids(critic, label["chosen"]),
                                    response_ids(critic, label["rejected"])))
    return examples


# ---------------------------------------------------------------------------------------
# The stage's work
# ---------------------------------------------------------------------------------------


def refine_critic(store: Store, out: str, payload: Mapping[str, Any],
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """One refinement of the critic; payload: critic (CriticConfig), srpo (SrpoConfig), round,
    adapter (store key of the critic's adapter so far, or None), and round 0's `seed` (the seed
    file) or round r's `labels` (pseudo_labels of its critique). Writes the refined adapter to
    `<out>/critic_adapter/` and returns {"rows": one per example, "adapter": its key or the
    start adapter's when nothing was trained, "trained": bool, "why": ..., "metrics": ...}."""
    cfg = SrpoConfig.model_validate(payload["srpo"])
    critic_cfg = CriticConfig.model_validate(payload["critic"])
    cache: dict[str, list] = {}

    def frames(video: str) -> list:
        if video not in cache:
            if payload["round"] == 0:  # the seed file's own (local) videos
                cache[video] = video_frames(video, critic_cfg.frames, critic_cfg.frame_short_edge)
            else:
                with store.local_copy(store.key_of(video)) as local:
                    cache[video] = video_frames(local, critic_cfg.frames,
                                                critic_cfg.frame_short_edge)
        return cache[video]

    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory(prefix="regdpo-critic-") as tmp:
        torch.manual_seed(cfg.seed)
        start = fetch_adapter(store, payload["adapter"], tmp) if payload["adapter"] else None
        critic = load_critic(critic_cfg, adapter=start, trainable=True)
        if start is None:
            add_lora(critic, cfg.rank, cfg.alpha, cfg.targets)
        if payload["round"] == 0:
            result = _seed_round(critic, cfg, payload, frames, log)
        else:
            result = _srpo_round(critic, cfg, payload, frames, log)
        if result["trained"]:
            local = Path(tmp) / "refined"
            save_adapter(critic.model, local)
            key = f"{out}/critic_adapter"
            for name in ADAPTER_FILES:
                store.put_file(local / name, f"{key}/{name}")
            result["adapter"] = key
        else:
            result["adapter"] = payload["adapter"]
    return result


def _seed_round(critic: Critic, cfg: SrpoConfig, payload: Mapping[str, Any], frames,
                log) -> dict[str, Any]:
    pairs = read_seed_pairs(payload["seed"])
    examples = seed_examples(critic, pairs, frames)
    optimizer = torch.optim.AdamW(lora_parameters(critic.model), lr=cfg.seed_lr,
                                  weight_decay=cfg.weight_decay)
    first = last = None
    for step, idx in enumerate(batches(len(examples), cfg.batch, cfg.seed_steps, cfg.seed), 1):
        metrics = sft_step(critic, [examples[i] for i in idx], optimizer)
        first = metrics["nll"] if first is None else first
        last = metrics["nll"]
        if step == 1 or step % 10 == 0 or step == cfg.seed_steps:
            log(f"refine round 0: step {step}/{cfg.seed_steps}, nll {metrics['nll']:.4g}")
    rows = [{"id": ex.label, "source": payload["seed"], "kind": "seed", "tokens": len(ex.target),
             "status": "ok", "reason": ""} for ex in examples]
    return {"rows": rows, "trained": True, "why": "",
            "metrics": {"examples": len(examples), "nll_first": first, "nll_last": last}}


def _srpo_round(critic: Critic, cfg: SrpoConfig, payload: Mapping[str, Any], frames,
                log) -> dict[str, Any]:
    labels = list(payload["labels"])
    if len(labels) > cfg.max_pairs:
        labels = random.Random(cfg.seed).sample(labels, cfg.max_pairs)
    rows = [{"id": lb["id"], "source": lb["source"], "kind": lb["kind"], "order": lb["order"],
             "chosen_seed": lb["chosen_seed"], "rejected_seed": lb["rejected_seed"],
             "status": "ok", "reason": ""} for lb in labels]
    if not labels:
        return {"rows": rows, "trained": False, "metrics": {"pseudo_labels": 0, "kept": 0},
                "why": "no pseudo-label: no judgment had both a majority and a dissenting chain"}
    examples = label_examples(critic, labels, frames)
    pce, q, kept = certainty(critic, examples, cfg)
    for row, p, k in zip(rows, pce.tolist(), kept.tolist()):
        row.update(pce=p, kept=bool(k))
    metrics: dict[str, Any] = {"pseudo_labels": len(labels), "kept": int(kept.sum()), "q": q}
    log(f"refine round {payload['round']}: {len(labels)} pseudo-labels, {metrics['kept']} with "
        f"PCE > {cfg.pce_threshold} (Q = {q:.4g})")
    if not kept.any():
        return {"rows": rows, "trained": False, "metrics": metrics,
                "why": f"no pseudo-label has PCE > {cfg.pce_threshold}"}
    chosen = [ex for ex, k in zip(examples, kept.tolist()) if k]
    weights = pce[kept]
    optimizer = make_optimizer(critic, cfg)
    for step, idx in enumerate(batches(len(chosen), cfg.batch, cfg.steps, cfg.seed), 1):
        step_metrics = srpo_step(critic, [chosen[i] for i in idx], weights[idx], optimizer, cfg.beta)
        if step == 1 or step % 10 == 0 or step == cfg.steps:
            log(f"refine round {payload['round']}: step {step}/{cfg.steps}, " + ", ".join(
                f"{k} {v:.4g}" for k, v in step_metrics.items()))
    metrics |= {f"last_{k}": v for k, v in step_metrics.items()}
    return {"rows": rows, "trained": True, "why": "", "metrics": metrics}
