"""Random pairs datasets in the regdpo.pairs.v1 format, for the training tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from infra.config.wan import TEXT_LEN
from infra.pairs_format import PAIRS_FORMAT, pair_bytes, video_bytes
from infra.store import Store


def random_pair(model_config: dict[str, Any], frames: int, height: int, width: int,
                generator: torch.Generator, mask: bool = False,
                image_tokens: int = 17) -> dict[str, Tensor]:
    """One pair of random tensors in the pairs format, shaped for `model_config`."""
    c, c_in = model_config["out_channels"], model_config["in_channels"]
    latent = (c, frames, height, width)
    pair = {"win": torch.randn(latent, generator=generator),
            "lose": torch.randn(latent, generator=generator),
            "prompt_embeds": torch.randn(TEXT_LEN, model_config["text_dim"], generator=generator)}
    if c_in > c:
        pair["cond"] = torch.randn((c_in - c, frames, height, width), generator=generator)
    if model_config.get("image_dim"):
        pair["image_embeds"] = torch.randn(image_tokens, model_config["image_dim"],
                                           generator=generator)
    if mask:
        pair["mask"] = (torch.rand((1, frames, height, width), generator=generator) < 0.5).float()
    return pair


def write_pairs(store: Store, stage_dir: str, pairs: dict[str, dict[str, Tensor]]) -> str:
    """Write pair files, then commit the manifest (last); returns the stage dir (a store key)."""
    rows = []
    for pair_id, tensors in pairs.items():
        key = f"{stage_dir}/pairs/{pair_id}.safetensors"
        uri = store.write_bytes(key, pair_bytes(tensors))
        rows.append({"id": pair_id, "status": "ok", "reason": "", "latents": uri})
    store.commit_manifest(stage_dir, rows, {"format": PAIRS_FORMAT, "pairs": len(rows)})
    return stage_dir


def write_random_pairs(store: Store, stage_dir: str, model_config: dict[str, Any], n: int, *,
                       frames: int = 2, height: int = 4, width: int = 4, mask: bool = False,
                       seed: int = 0) -> str:
    """A committed random pairs dataset: n pairs shaped for `model_config`."""
    g = torch.Generator().manual_seed(seed)
    pairs = {f"pair-{i:06d}": random_pair(model_config, frames, height, width, g, mask)
             for i in range(n)}
    return write_pairs(store, stage_dir, pairs)


def random_video(model_config: dict[str, Any], frames: int, height: int, width: int,
                 generator: torch.Generator) -> dict[str, Tensor]:
    """One single video's random tensors (regdpo.video.v1), shaped for `model_config`."""
    pair = random_pair(model_config, frames, height, width, generator)
    pair.pop("lose")
    pair["latent"] = pair.pop("win")
    return pair


def write_rows(store: Store, stage_dir: str, pairs: dict[str, dict[str, Tensor]],
               videos: dict[str, tuple[str, bool | None, dict[str, Tensor]]]) -> str:
    """A committed dataset of every row kind: pairs, and videos id -> (kind "pointwise" or
    "real", the pointwise label or None, tensors). Returns the stage dir."""
    rows = []
    for pair_id, tensors in pairs.items():
        uri = store.write_bytes(f"{stage_dir}/pairs/{pair_id}.safetensors", pair_bytes(tensors))
        rows.append({"id": pair_id, "status": "ok", "reason": "", "kind": "pair",
                     "latents": uri, "desirable": None})
    for video_id, (kind, desirable, tensors) in videos.items():
        uri = store.write_bytes(f"{stage_dir}/videos/{video_id}.safetensors", video_bytes(tensors))
        rows.append({"id": video_id, "status": "ok", "reason": "", "kind": kind, "latents": uri,
                     "desirable": desirable})
    store.commit_manifest(stage_dir, rows, {"format": PAIRS_FORMAT, "rows": len(rows)})
    return stage_dir
