"""Captions for clips without a source caption (the normalize stage): a transformers VLM.

Any image-to-text model that `AutoModelForImageTextToText` knows loads by hub id or local
folder: BLIP-style captioners (the prompt, if any, is the caption's prefix) and chat-style
VLMs (the prompt goes through the processor's chat template). `models.tiny.build_tiny_captioner` writes
a random-weight BLIP that loads through the same path, for tests and the toy run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel

from infra.config import CaptionConfig
from infra.weights import files_identity

CHAT_PROMPT = "Describe this image in one sentence."  # chat VLMs need a question; BLIP does not

_cache: dict[tuple[str, str], tuple[Any, PreTrainedModel]] = {}
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class Captioner:
    """A loaded VLM plus how to ask it; `caption` is greedy and deterministic."""

    processor: Any
    model: PreTrainedModel
    prompt: str | None
    max_new_tokens: int

    @property
    def chat(self) -> bool:
        return getattr(self.processor, "chat_template", None) is not None

    def caption(self, image: Image.Image) -> str:
        """One cleaned line of text; empty only if the model generated no words."""
        image = image.convert("RGB")
        if self.chat:
            messages = [{"role": "user", "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": self.prompt or CHAT_PROMPT},
            ]}]
            inputs = self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                return_tensors="pt",
            )
        else:
            inputs = self.processor(images=image, text=self.prompt, return_tensors="pt")
        inputs = inputs.to(self.model.device).to(self.model.dtype)  # dtype casts floats only
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if self.chat:  # decoder-only chat models echo the templated prompt; keep the answer
            out = out[:, inputs["input_ids"].shape[1]:]
        text = self.processor.batch_decode(out, skip_special_tokens=True)[0]
        return " ".join(text.split())


def load_captioner(cfg: CaptionConfig) -> Captioner:
    """The captioner `cfg` names; the weights load once per (model, device) per process."""
    if not cfg.model:
        raise ValueError("normalize.caption.model is not set: no captioning model to load")
    key = (cfg.model, cfg.device)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = _load(cfg.model, cfg.device)
        processor, model = _cache[key]
    return Captioner(processor, model, cfg.prompt, cfg.max_new_tokens)


def _load(name: str, device: str) -> tuple[Any, PreTrainedModel]:
    if name.startswith((".", "/")) and not Path(name).is_dir():
        raise ValueError(
            f"captioning model folder {name!r} does not exist: set normalize.caption.model to a "
            "folder written by save_pretrained (config, weights, processor) or to a hub id"
        )
    # With HF_HUB_OFFLINE=1 transformers reads only local folders and the hub cache.
    try:
        processor = AutoProcessor.from_pretrained(name)
        model = AutoModelForImageTextToText.from_pretrained(name)
    except (OSError, ValueError) as e:  # hub errors (missing files, offline) are OSErrors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"captioning model {name!r} could not be loaded ({reason}). Fetch it on a machine "
            f"with network (`hf download {name}`, then copy the HF cache / set HF_HOME), or set "
            "normalize.caption.model to a local folder holding its config, weights and processor."
        ) from e
    return processor, model.to(device).eval()


def weight_identity(name: str) -> str:
    """The captioner's weight identity (infra.weights): a local folder, or a hub id's snapshot in
    the local cache; a model that is not here is an error naming how to provide it."""
    path = Path(name)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(name, local_files_only=True))
        except Exception as e:  # noqa: BLE001 - every miss means the same: not on this machine
            raise ValueError(
                f"captioning model {name!r} is not on this machine ({type(e).__name__}): fetch "
                f"it where there is network (`hf download {name}`, then copy the HF cache / set "
                "HF_HOME), or set normalize.caption.model to a local folder") from None
    return files_identity(path, "captioner")


def check_available(name: str) -> str | None:
    """Why the captioner `name` cannot be loaded here, or None; downloads nothing (a local
    folder with a config, or a hub id in the HF cache, or, online only, on the hub)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return None if (path / "config.json").is_file() else (
            f"captioning model folder {name!r} has no config.json: set normalize.caption.model "
            "to a folder written by save_pretrained (config, weights, processor)")
    if name.startswith((".", "/", "~")):
        return (f"captioning model folder {name!r} does not exist: set normalize.caption.model "
                "to a folder written by save_pretrained (config, weights, processor) or a hub id")
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import constants as hub_constants

    try:
        snapshot_download(name, local_files_only=True)
        return None
    except Exception:  # noqa: BLE001 - every miss means "not in the cache"
        pass
    how = (f"fetch it where there is network (`hf download {name}`, then copy the HF cache / "
           "set HF_HOME), or set normalize.caption.model to a local folder")
    if hub_constants.HF_HUB_OFFLINE:
        return f"captioning model {name!r} is not in the HF cache (HF_HUB_OFFLINE=1): {how}"
    try:
        HfApi().model_info(name, timeout=15)
    except Exception as e:  # noqa: BLE001 - not on the hub, private, or no network
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"captioning model {name!r} is not in the HF cache nor reachable on the hub ({line}): {how}"
    return None
