"""What the model-running stages share: the frozen models a stage holds while it runs, the
device, free memory, weight identities, and prompt embeddings cached in the store."""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Callable, Iterator

import torch

from infra.code import code_digest
from infra.encoded import encoded_key, write_tensor
from infra.store import Store
from models import wan


class Frozen:
    """The frozen models a stage holds while it runs; `release()` drops them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple, tuple[Any, threading.Lock]] = {}

    @contextmanager
    def use(self, key: tuple, load: Callable[[], Any]) -> Iterator[Any]:
        """The model under `key` (loaded once), exclusively: pipelines and their schedulers
        keep per-call state, so calls are serialized while ffmpeg and uploads overlap."""
        with self._lock:
            if key not in self._models:
                self._models[key] = (load(), threading.Lock())
            model, lock = self._models[key]
        with lock:
            yield model

    def release(self) -> None:
        with self._lock:
            self._models.clear()
        free_memory()


FROZEN = Frozen()


def free_memory() -> None:
    """Return freed tensors to the device (after a stage drops its models)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def torch_device(name: str | None) -> torch.device:
    """The configured device, else CUDA when there is one, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


@lru_cache(maxsize=None)
def weight_identity(model: str, kind: str, dtype: str, component: str) -> str:
    """Which weights compute a result (models.wan.component_identity): in every key of a stage
    that loads them, so a rebuilt folder or a new hub revision makes new results."""
    return wan.component_identity(wan.WanSpec(kind, model, dtype), component)  # type: ignore[arg-type]


def prompt_key(spec: wan.WanSpec, prompt: str) -> str:
    text = weight_identity(spec.model, spec.kind, spec.dtype, "text_encoder")
    tokens = weight_identity(spec.model, spec.kind, spec.dtype, "tokenizer")
    return encoded_key("text", code_digest("models.wan:encode_prompts"), prompt=prompt,
                       encoder=text, tokenizer=tokens)


def encode_prompts(store: Store, spec: wan.WanSpec, prompts: list[str], device: str | None,
                   chunk: int = 8) -> dict[str, str]:
    """prompt -> store key of its [512, text_dim] UMT5 embedding. Loads the text encoder only
    if some prompt is new, and frees it before returning."""
    keys = {p: prompt_key(spec, p) for p in dict.fromkeys(prompts)}
    missing = [p for p, k in keys.items() if not store.exists(k)]
    if missing:
        dev = torch_device(device)
        encoder, tokenizer = wan.load_text_encoder(spec)
        encoder = encoder.to(dev).eval()
        for i in range(0, len(missing), chunk):
            part = missing[i:i + chunk]
            embeds = wan.encode_prompts(encoder, tokenizer, part, dev).cpu()
            for prompt, embed in zip(part, embeds):
                write_tensor(store, keys[prompt], embed)
        del encoder
        free_memory()
    return keys
