"""Content-addressed tensors in the store: `cache/encoded/<what>/<digest>.safetensors`.

The digest covers the input bytes, the encoder's weight identity, the sizes and the code that
computes the tensor (infra.code), so a GT clip that wins five pairs is encoded once, and the
negatives stage's prompt embeddings are the ones precompute reuses.
"""

from __future__ import annotations

import hashlib
import threading
from collections import defaultdict
from typing import Any, Callable

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from infra.store import Store, digest, join_key

_KEY_LOCKS: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)


def encoded_key(what: str, code: str, **inputs: Any) -> str:
    """The store key of one encoding of `what` from `inputs` by the code with digest `code`."""
    return join_key("cache", "encoded", what,
                    f"{digest({'what': what, **inputs, 'code': code}, 32)}.safetensors")


def read_tensor(store: Store, key: str) -> torch.Tensor:
    return load_safetensors(store.read_bytes(key))["t"]


def write_tensor(store: Store, key: str, tensor: torch.Tensor) -> str:
    return store.write_bytes(key, save_safetensors({"t": tensor.contiguous()}))


def cached(store: Store, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The tensor at `key`, computed and written (atomically) the first time."""
    with _KEY_LOCKS[key]:
        if store.exists(key):
            return read_tensor(store, key)
        tensor = compute().contiguous()
        write_tensor(store, key, tensor)
        return tensor


def sha256_of(store: Store, ref: str) -> str:
    """sha256 of a stored object, named by key or store URI."""
    return hashlib.sha256(store.read_bytes(store.key_of(ref))).hexdigest()
