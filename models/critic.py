"""The Dual-IPO critic (arXiv 2502.02088, SRPO): a Qwen2-VL-class VLM that judges generated
videos with CoT-guided reasoning and voting-based self-consistency, and what SRPO trains it with.

- Loading: any Qwen2-VL / Qwen2.5-VL-class model (e.g. Qwen/Qwen2.5-VL-7B-Instruct, or a reward
  VLM of that class such as UnifiedReward-qwen) by hub id or local folder, through transformers'
  AutoModelForImageTextToText. Offline only: a hub id must already be in the HF cache; nothing
  is downloaded, and a missing model is an error naming `critic.model` and how to provide it.
- Videos go in as frame lists: `frames` frames sampled evenly from each mp4 (infra.video), each
  one image. Qwen2-VL's video processor needs torchvision, which must not be installed here
  (it breaks transformers' imports), so `FrameProcessor` is Qwen2-VL's own processor without its
  video half; images run through Qwen2VLImageProcessorPil (PIL/numpy). An image is the video
  path's temporal patch with the frame repeated, so a frame costs the tokens of two video frames.
- Judging: a CoT prompt asks for one line of reasoning per dimension (infra.config.critic) and a
  final `Verdict:` line. Each judgment samples K chains, each from its own recorded seed (the
  chain is reproducible from the seed alone). A strict parser turns a chain into a verdict or
  an abstain with its reason. Pairwise judgments run in both orders (A first, then B first) to
  cancel position bias; the majority over all 2K chains is kept with its vote share.
- SRPO: `response_logprobs` (log π(chain | judgment) summed over the chain's tokens), the LoRA
  adapter (peft, through transformers' adapter API), `reference_mode` (adapters disabled: the
  reference, one copy of the weights, as models.wan.reference_mode), adapter save and load.

Everything returned is plain data (lists, dicts, strings, ints) for the manifest.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText, PreTrainedModel, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from infra.config.critic import CriticConfig
from infra.video import decode_frames, probe
from infra.weights import files_identity

CRITIC_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
ORDERS = ("ab", "ba")  # which video is shown first: a pairwise judgment runs both
PAIR_VERDICTS = ("A", "B")  # as shown: A = the first video of the order
POINT_VERDICTS = ("good", "bad")


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


class FrameProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor (chat template, image-token expansion, Qwen2VLImageProcessorPil)
    without its video processor, which needs torchvision: videos come in as frame lists."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None,
                 chat_template: str | None = None, **kwargs: Any) -> None:
        # Qwen2VLProcessor.__init__ insists on a video processor; set what it sets, then skip it.
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = (getattr(tokenizer, "image_token_id", None)
                               or tokenizer.convert_tokens_to_ids(self.image_token))
        self.video_token_id = (getattr(tokenizer, "video_token_id", None)
                               or tokenizer.convert_tokens_to_ids(self.video_token))
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template,
                                **kwargs)


def _missing(name: str, why: str) -> ValueError:
    how = (f"run `hf download {name}` on a machine with network and copy its HF cache here (or "
           "set HF_HOME to it), or set critic.model to a local folder written by save_pretrained "
           "(config, weights, tokenizer, processor; models.tiny.build_tiny_critic writes a toy one)")
    return ValueError(f"critic model {name!r} (critic.model) is not available: {why}. To provide "
                      f"it, {how}.")


def resolve(name: str) -> Path:
    """The local folder of critic model `name`: the folder itself, or a hub id's snapshot in the
    local HF cache (never downloaded)."""
    if not name:
        raise ValueError("critic.model is not set: set it to a Qwen2-VL-class hub id in the HF "
                         "cache or a local folder written by save_pretrained")
    path = Path(name).expanduser()
    if not path.is_dir():
        if name.startswith((".", "/", "~")):
            raise _missing(name, f"no folder {str(path)!r}")
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(name, local_files_only=True))
        except Exception as e:  # noqa: BLE001 - every miss means the same: not on this machine
            raise _missing(name, f"not in the HF cache ({type(e).__name__})") from None
    if not (path / "config.json").is_file():
        raise _missing(name, f"{str(path)!r} has no config.json")
    return path


def check_available(name: str) -> str | None:
    """Why critic model `name` cannot be loaded here, or None; downloads nothing."""
    try:
        resolve(name)
    except ValueError as e:
        return str(e)
    return None


def weight_identity(name: str) -> str:
    """The critic's weight identity (infra.weights) for the keys of the stages that load it."""
    return files_identity(resolve(name), "critic")


@dataclass
class Critic:
    """A loaded critic: processor, model (eval mode), and how it samples chains."""

    processor: FrameProcessor
    model: PreTrainedModel | PeftModel  # a PeftModel once it has an SRPO adapter
    cfg: CriticConfig

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer


def load_critic(cfg: CriticConfig, adapter: str | Path | None = None,
                trainable: bool = False) -> Critic:
    """The critic `cfg.model` names, optionally with a saved SRPO adapter (`save_adapter`):
    frozen (a judge), or with its LoRA weights trainable (the refine stage goes on from it)."""
    path = resolve(cfg.model)
    try:
        processor = FrameProcessor.from_pretrained(str(path))
        model = AutoModelForImageTextToText.from_pretrained(str(path),
                                                            dtype=getattr(torch, cfg.dtype))
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise _missing(cfg.model, f"it could not be loaded ({reason})") from e
    if model.config.model_type not in CRITIC_MODEL_TYPES:
        raise ValueError(f"critic model {cfg.model!r} (critic.model) is a "
                         f"{model.config.model_type!r} model; the critic needs a Qwen2-VL-class "
                         f"VLM ({', '.join(CRITIC_MODEL_TYPES)})")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    return Critic(processor, model.to(cfg.device).eval(), cfg)


# ---------------------------------------------------------------------------------------
# Frames and prompts
# ---------------------------------------------------------------------------------------


def video_frames(path: str | Path, count: int, short_edge: int) -> list[Image.Image]:
    """`count` frames sampled evenly (first and last included) from the video at `path`,
    decoded at `short_edge`, as RGB images."""
    info = probe(str(path))
    frames = decode_frames(str(path), info, short_edge)
    if len(frames) == 0:
        raise ValueError(f"video {str(path)!r} decoded to no frames: re-encode it (ffmpeg) or "
                         "drop it from the critique")
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    return [Image.fromarray(frames[i]) for i in picks]


def _format_lines(dimensions: Sequence[str], verdicts: str) -> str:
    lines = [f"{d[0].upper()}{d[1:]}: <your reasoning about {d}>" for d in dimensions]
    return "\n".join([*lines, f"Verdict: <{verdicts}>"])


def pair_messages(prompt: str, first: list[Image.Image], second: list[Image.Image],
                  dimensions: Sequence[str]) -> list[dict]:
    """The pairwise CoT prompt: video A's frames, video B's frames, then reason per dimension
    and give the verdict A or B on the last line."""
    intro = (f"You are a strict critic of generated videos. Two videos were generated for the "
             f"prompt: \"{prompt}\". Each is shown as {len(first)} frames in time order.")
    ask = ("Compare the two videos. First reason step by step, one line per aspect, then give "
           "your verdict on the last line: A if video A is better, B if video B is better. "
           "Answer in exactly this format:\n" + _format_lines(dimensions, "A or B"))
    content = [{"type": "text", "text": intro}, {"type": "text", "text": "Video A:"},
               *({"type": "image", "image": f} for f in first),
               {"type": "text", "text": "Video B:"},
               *({"type": "image", "image": f} for f in second), {"type": "text", "text": ask}]
    return [{"role": "user", "content": content}]


def point_messages(prompt: str, frames: list[Image.Image], dimensions: Sequence[str]) -> list[dict]:
    """The pointwise CoT prompt: one video's frames, reason per dimension, verdict good or bad."""
    intro = (f"You are a strict critic of generated videos. This video was generated for the "
             f"prompt: \"{prompt}\". It is shown as {len(frames)} frames in time order.")
    ask = ("Judge the video. First reason step by step, one line per aspect, then give your "
           "verdict on the last line: good if it is a good video for the prompt, bad if not. "
           "Answer in exactly this format:\n" + _format_lines(dimensions, "good or bad"))
    content = [{"type": "text", "text": intro}, *({"type": "image", "image": f} for f in frames),
               {"type": "text", "text": ask}]
    return [{"role": "user", "content": content}]


def judgment_inputs(critic: Critic, messages: list[dict]) -> dict[str, torch.Tensor]:
    """The model inputs of one judgment (batch 1), on the critic's device."""
    inputs = critic.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True, return_dict=True,
                                                  return_tensors="pt")
    return {k: (v.to(critic.model.device, critic.model.dtype) if v.is_floating_point()
                else v.to(critic.model.device)) for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------
# Chains: seeds, sampling, the strict verdict parser
# ---------------------------------------------------------------------------------------


def chain_seed(seed: int, order: str, index: int) -> int:
    """The seed of chain `index` of a judgment seeded `seed`, shown in `order` ('ab', 'ba', or
    'point'): a digest, so chains never share a seed and a re-run draws the same ones."""
    digest = hashlib.sha256(f"{seed}/{order}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sample_chain(critic: Critic, inputs: Mapping[str, torch.Tensor], seed: int) -> str:
    """One sampled reasoning chain (decoded text). The RNG is seeded with `seed` alone, inside a
    forked RNG state: the same seed gives the same chain, and the caller's RNG is untouched."""
    device = critic.model.device
    cfg = critic.cfg
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.inference_mode():  # top_k=0 lifts the repo's own top_k (Qwen2-VL-Instruct
            # ships top_k=1, i.e. greedy: K identical chains would be no vote at all)
            out = critic.model.generate(**inputs, do_sample=True, temperature=cfg.temperature,
                                        top_p=cfg.top_p, top_k=0,
                                        max_new_tokens=cfg.max_new_tokens)
    answer = out[0, inputs["input_ids"].shape[1]:]
    return critic.tokenizer.decode(answer, skip_special_tokens=True)


_VERDICT_LINE = re.compile(r"^\s*verdict\s*:(.*)$", re.IGNORECASE)


def parse_verdict(text: str, allowed: Sequence[str],
                  dimensions: Sequence[str]) -> tuple[str | None, str]:
    """(verdict, "") for a well-formed chain, else (None, why it abstains).

    Well-formed: one line `<dimension>: <reasoning>` for every dimension (any order, non-empty),
    and exactly one `Verdict: <v>` line, the last non-empty one, where <v> is one of `allowed`
    (case-insensitive, an optional final period). Anything else, random text included, abstains:
    a vote is counted only when the chain says plainly what it decided.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None, "empty chain"
    verdict_lines = [i for i, line in enumerate(lines) if _VERDICT_LINE.match(line)]
    if not verdict_lines:
        return None, "no 'Verdict:' line"
    if len(verdict_lines) > 1:
        return None, f"{len(verdict_lines)} 'Verdict:' lines"
    if verdict_lines[0] != len(lines) - 1:
        return None, "the 'Verdict:' line is not the last line"
    value = _VERDICT_LINE.match(lines[-1]).group(1).strip().removesuffix(".").strip()
    match = [v for v in allowed if v.lower() == value.lower()]
    if not match:
        return None, f"verdict {value!r} is not one of {', '.join(allowed)}"
    reasoned = {line.split(":", 1)[0].strip().lower() for line in lines[:-1]
                if ":" in line and line.split(":", 1)[1].strip()}
    missing = [d for d in dimensions if d.lower() not in reasoned]
    if missing:
        return None, f"no reasoning line for {', '.join(missing)}"
    return match[0], ""


# ---------------------------------------------------------------------------------------
# Votes: majority and vote share (pure, on recorded chains)
# ---------------------------------------------------------------------------------------


def original_side(order: str, shown: str) -> str:
    """Which video ('a' or 'b') the shown verdict ('A' = first shown) names in `order`."""
    return order[PAIR_VERDICTS.index(shown)]


def tally(verdicts: Sequence[str | None]) -> dict[str, Any]:
    """Majority verdict and vote share of a judgment's chains (None = abstain).

    votes counts each verdict and the abstains; `verdict` is the strict majority among the
    chains that voted (None on a tie or when every chain abstained); `vote_share` = its votes
    over ALL chains, so abstains lower the certainty (0.0 when there is no majority).
    """
    counts = Counter(v for v in verdicts if v is not None)
    ranked = counts.most_common()
    verdict = None
    if ranked and (len(ranked) == 1 or ranked[0][1] > ranked[1][1]):
        verdict = ranked[0][0]
    votes = dict(sorted(counts.items()))
    votes["abstain"] = sum(v is None for v in verdicts)
    share = counts[verdict] / len(verdicts) if verdict is not None else 0.0
    return {"verdict": verdict, "vote_share": share, "votes": votes}


def pair_tally(chains: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """tally() over both orders' chains (each with 'order' and 'verdict' in 'a'/'b'/None), plus
    the per-order tallies: a verdict that flips with the order is position bias, and shows."""
    result = tally([c["verdict"] for c in chains])
    result["by_order"] = {o: tally([c["verdict"] for c in chains if c["order"] == o])
                          for o in ORDERS if any(c["order"] == o for c in chains)}
    return result


# ---------------------------------------------------------------------------------------
# Judgments
# ---------------------------------------------------------------------------------------


def judge_pair(critic: Critic, prompt: str, frames_a: list[Image.Image],
               frames_b: list[Image.Image], seed: int) -> dict[str, Any]:
    """Which of videos a and b is better for `prompt`: K chains with A shown first and K with
    B shown first, each seeded by chain_seed(seed, order, index). Returns plain data: every
    chain (order, index, seed, text, shown verdict, verdict as 'a'/'b'/None, abstain reason),
    the majority verdict ('a', 'b' or None), its vote share, the votes and per-order tallies."""
    chains = []
    for order in ORDERS:
        first, second = (frames_a, frames_b) if order == "ab" else (frames_b, frames_a)
        inputs = judgment_inputs(critic, pair_messages(prompt, first, second,
                                                       critic.cfg.dimensions))
        for index in range(critic.cfg.chains):
            s = chain_seed(seed, order, index)
            text = sample_chain(critic, inputs, s)
            shown, why = parse_verdict(text, PAIR_VERDICTS, critic.cfg.dimensions)
            chains.append({"order": order, "index": index, "seed": s, "text": text,
                           "shown": shown, "abstain": why,
                           "verdict": original_side(order, shown) if shown else None})
    return {"kind": "pair", "seed": seed, "chains": chains, **pair_tally(chains)}


def judge_video(critic: Critic, prompt: str, frames: list[Image.Image],
                seed: int) -> dict[str, Any]:
    """Whether one video is good or bad for `prompt` (the pointwise judgment KTO needs): K
    chains seeded by chain_seed(seed, 'point', index); plain data as judge_pair."""
    inputs = judgment_inputs(critic, point_messages(prompt, frames, critic.cfg.dimensions))
    chains = []
    for index in range(critic.cfg.chains):
        s = chain_seed(seed, "point", index)
        text = sample_chain(critic, inputs, s)
        verdict, why = parse_verdict(text, POINT_VERDICTS, critic.cfg.dimensions)
        chains.append({"order": "point", "index": index, "seed": s, "text": text,
                       "shown": verdict, "abstain": why, "verdict": verdict})
    return {"kind": "point", "seed": seed, "chains": chains,
            **tally([c["verdict"] for c in chains])}


# ---------------------------------------------------------------------------------------
# SRPO: sequence log-probs, the LoRA adapter and the reference
# ---------------------------------------------------------------------------------------


def response_ids(critic: Critic, text: str) -> torch.Tensor:
    """A chain's token ids as the model would emit them: its text, then the end-of-turn token."""
    ids = critic.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([*ids, critic.tokenizer.eos_token_id], dtype=torch.long)


def response_logprobs(model: PreTrainedModel, prompt: Mapping[str, torch.Tensor],
                      responses: Sequence[torch.Tensor], pad_id: int) -> torch.Tensor:
    """log π(y | x) of each response y after one prompt x: the sum over y's tokens of the log
    probability the model gives each token after the prompt and y's earlier tokens. [n].

    `prompt` is a batch-1 model input (judgment_inputs); the responses run as one batch of n,
    right-padded (padding after the response changes no earlier logit under causal attention),
    with the prompt's image tensors repeated per row. Differentiable: gradients flow into the
    trainable weights unless called under no_grad.
    """
    ids = prompt["input_ids"]
    n, plen, device = len(responses), ids.shape[1], ids.device
    length = max(len(r) for r in responses)
    batch: dict[str, torch.Tensor] = {}
    for key, value in prompt.items():
        if value.dim() >= 2 and value.shape[:2] == ids.shape:  # per token: extend over y
            fill = {"input_ids": pad_id, "attention_mask": 0}.get(key, 0)
            rows = torch.full((n, plen + length), fill, dtype=value.dtype, device=device)
            rows[:, :plen] = value
            batch[key] = rows
        else:  # per image (pixel_values, image_grid_thw): every row sees the same images
            batch[key] = torch.cat([value] * n)
    mask = torch.zeros(n, length, dtype=torch.bool, device=device)
    for i, r in enumerate(responses):
        batch["input_ids"][i, plen:plen + len(r)] = r.to(device)
        batch["attention_mask"][i, plen:plen + len(r)] = 1
        mask[i, :len(r)] = True
    logits = model(**batch).logits[:, plen - 1:-1].float()  # the logits that predict y
    targets = batch["input_ids"][:, plen:]
    token_logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logp * mask).sum(-1)


def add_lora(critic: Critic, rank: int, alpha: float, targets: Sequence[str]) -> None:
    """Freeze the critic and give it a trainable LoRA adapter: `critic.model` becomes a peft
    PeftModel over the same weights (LoRA weights in float32). B starts at 0, so the policy
    starts equal to the reference. (peft's own wrapper: transformers' add_adapter needs a newer
    peft than this platform has.)"""
    critic.model.requires_grad_(False)
    critic.model = get_peft_model(critic.model, LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True))


def lora_parameters(model: PreTrainedModel | PeftModel) -> list[torch.nn.Parameter]:
    """The adapter's parameters (the only ones SRPO trains)."""
    return [p for name, p in model.named_parameters() if "lora_" in name]


@contextmanager
def reference_mode(model: PeftModel) -> Iterator[PeftModel]:
    """Inside, the critic is its reference π_ref (adapters bypassed, bit-exact); re-enabled on
    exit even if the body raises. Use under torch.no_grad()."""
    with model.disable_adapter():
        yield model


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # what save_adapter writes


def fetch_adapter(store: Any, key: str, directory: str | Path) -> Path:
    """Copy a saved adapter (ADAPTER_FILES under store key `key`; `store` is an infra.store
    Store) into local `directory`, which load_critic(cfg, adapter=directory) then reads."""
    directory = Path(directory)
    for name in ADAPTER_FILES:
        (directory / name).write_bytes(store.read_bytes(f"{key}/{name}"))
    return directory


def save_adapter(model: PeftModel, directory: str | Path) -> Path:
    """Write the adapter (adapter_model.safetensors + adapter_config.json, what
    `load_critic(cfg, adapter=directory)` reads); the safetensors bytes depend only on the
    weights. Returns the safetensors path."""
    from models.wan import canonical_safetensors

    model.save_pretrained(str(directory))
    path = Path(directory) / "adapter_model.safetensors"
    path.write_bytes(canonical_safetensors(path.read_bytes()))
    return path
