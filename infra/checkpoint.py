"""Training checkpoints in the store: all an exact resume needs, made visible atomically.

Layout under a prefix (e.g. `runs/<name>/train/checkpoints`):

    step-00000010/adapter/pytorch_lora_weights.safetensors   the LoRA, diffusers' format
    step-00000010/state.pt        optimizer + LR scheduler + RNG states (tensors, plain data)
    step-00000010/meta.json       step, config digest and config, the trainer's own state
    latest.json                   {"step", "dir", "config_digest"}: written LAST

A checkpoint exists for readers only once `latest.json` points at it, so a process killed
while writing one leaves the previous checkpoint in force. `state.pt` is written by us with
torch.save and read back with `torch.load(weights_only=True)`: no arbitrary unpickling.
"""

from __future__ import annotations

import hashlib
import io
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load as load_safetensors

from infra.store import Store, join_key
from models.wan import lora_parameters, save_lora

LATEST = "latest.json"
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
_PREFIX = "transformer."  # diffusers' LoRA key prefix for the denoiser


class ConfigMismatchError(ValueError):
    """A resume from a checkpoint written under another config (or other data)."""


def rng_state() -> dict[str, Any]:
    """Every global RNG a step may draw from (LoRA dropout, anything stochastic in the model)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # numpy's key array is stored as a tensor: weights_only loads no ndarrays.
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))


def load_adapter(transformer: torch.nn.Module, data: bytes, source: str,
                 adapter: str = "default") -> None:
    """Load a `save_lora` file into the transformer's adapter `adapter` ("default", the one
    that trains, or a frozen reference adapter), strictly."""
    state = {k.removeprefix(_PREFIX): v for k, v in load_safetensors(data).items()}
    expected = len(lora_parameters(transformer, adapter))
    fix = "was it written with another train.lora rank/targets or another model?"
    try:
        result = set_peft_model_state_dict(transformer, state, adapter_name=adapter)
    except RuntimeError as e:  # torch's load_state_dict: tensors of another shape (rank)
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line),
                     str(e)[:300])
        raise ValueError(f"adapter {source} does not fit the model's LoRA: {first}; "
                         f"{fix}") from None
    missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter}." in k]
    if result.unexpected_keys or missing or len(state) != expected:
        raise ValueError(
            f"adapter {source} does not fit the model's LoRA: {len(state)} tensors for "
            f"{expected} LoRA weights, unexpected "
            f"{result.unexpected_keys[:3]}, missing {missing[:3]}; {fix}")


def adapter_file(key: str) -> str:
    """The adapter file's store key from a key that names it or the dir that holds it."""
    return key if key.endswith(".safetensors") else join_key(key, ADAPTER_FILE)


def read_adapter(store: Store, key: str) -> tuple[bytes, str]:
    """(bytes, sha256) of the adapter at `key` (train.init_adapter): the sha256 is its identity
    in keys. A missing file is an error naming the key and the fix."""
    path = adapter_file(store.key_of(key))
    try:
        data = store.read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"train.init_adapter: no adapter at {store.uri(path)}; give the store key of a "
            f"train stage's adapter dir (…/adapter) or its {ADAPTER_FILE}") from None
    return data, hashlib.sha256(data).hexdigest()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


class Checkpointer:
    """Saves and restores training state under `prefix` in the store."""

    def __init__(self, store: Store, prefix: str, config_digest: str, config: dict[str, Any]):
        self.store, self.prefix = store, join_key(prefix)
        self.config_digest, self.config = config_digest, config

    def latest_step(self) -> int | None:
        """The step of the visible checkpoint, or None. Raises ConfigMismatchError when it was
        written under another config: checked before any step runs."""
        try:
            latest = self.store.read_json(f"{self.prefix}/{LATEST}")
        except FileNotFoundError:
            return None
        if latest["config_digest"] != self.config_digest:
            meta = self.store.read_json(f"{self.prefix}/{latest['dir']}/meta.json")
            raise ConfigMismatchError(self._mismatch(meta))
        return int(latest["step"])

    def _mismatch(self, meta: dict[str, Any]) -> str:
        old, new = _flatten(meta["config"]), _flatten(self.config)
        diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
                for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
        return (f"cannot resume from {self.store.uri(self.prefix)} (step {meta['step']}): it was "
                f"written under config digest {meta['config_digest']}, this run's is "
                f"{self.config_digest}. Differences: {'; '.join(diff) or 'the pairs dataset'}. "
                "Restore the old config, or train into a new output prefix "
                "(or set train.checkpoint.resume: false there).")

    def save(self, step: int, transformer: torch.nn.Module, optimizer: torch.optim.Optimizer,
             lr_scheduler: Any, trainer_state: dict[str, Any]) -> str:
        """Write the checkpoint of `step`, then make it visible; returns its URI."""
        name = f"step-{step:08d}"
        base = f"{self.prefix}/{name}"
        with tempfile.TemporaryDirectory(prefix="regdpo-ckpt-") as tmp:
            self.store.put_file(save_lora(transformer, tmp), f"{base}/adapter/{ADAPTER_FILE}")
        buf = io.BytesIO()
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "rng": rng_state()}, buf)
        self.store.write_bytes(f"{base}/state.pt", buf.getvalue())
        self.store.write_json(f"{base}/meta.json", {
            "step": step, "config_digest": self.config_digest, "config": self.config,
            "trainer": trainer_state})
        # Last: until this pointer moves, readers (and a resume) see the previous checkpoint.
        self.store.write_json(f"{self.prefix}/{LATEST}",
                              {"step": step, "dir": name, "config_digest": self.config_digest})
        return base

    def load(self, transformer: torch.nn.Module, optimizer: torch.optim.Optimizer,
             lr_scheduler: Any) -> dict[str, Any]:
        """Restore the latest checkpoint into the given objects; returns the trainer's state."""
        latest = self.store.read_json(f"{self.prefix}/{LATEST}")
        base = f"{self.prefix}/{latest['dir']}"
        key = f"{base}/adapter/{ADAPTER_FILE}"
        load_adapter(transformer, self.store.read_bytes(key), self.store.uri(key))
        blob = io.BytesIO(self.store.read_bytes(f"{base}/state.pt"))
        state = torch.load(blob, weights_only=True, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        set_rng_state(state["rng"])
        return self.store.read_json(f"{base}/meta.json")["trainer"]


def save_final_adapter(store: Store, transformer: torch.nn.Module, key_dir: str) -> str:
    """The trained adapter as `<key_dir>/pytorch_lora_weights.safetensors` for diffusers'
    `pipe.load_lora_weights(dir)`; returns its URI."""
    with tempfile.TemporaryDirectory(prefix="regdpo-adapter-") as tmp:
        return store.put_file(save_lora(transformer, Path(tmp)), f"{key_dir}/{ADAPTER_FILE}")
