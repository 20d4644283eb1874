"""precompute (paper A.2, "prompt pre-encoding"): every tensor the trainer needs, encoded once.

Per train pair, one regdpo.pairs.v1 file (infra/pairs_format.py):
  prompt_embeds  UMT5, zero-padded to 512 tokens           (WanPipeline.encode_prompt)
  win, lose      VAE latents, (z - latents_mean) / latents_std, the distribution's mode
  cond           I2V: 4 first-frame mask channels + the latent of the zero-padded first frame
                 (WanImageToVideoPipeline.prepare_latents)
  image_embeds   Wan2.1 I2V: CLIP penultimate hidden states of the reference frame
  mask           LocalDPO pairs: the corrupted region, resampled to this latent grid
Per single video (Dual-IPO: a pointwise row with its critic label, or a real GT clip for the
NLL term; the row's `kind`), one regdpo.video.v1 file: `latent` in place of win/lose, the same
conditioning (from the video's reference frame for I2V).

Each piece is content-addressed in the store (`cache/encoded/<what>/<digest>.safetensors`, the
digest of the input bytes, the encoder's identity, the size and the code that computes it,
infra.code), so the GT clip that
wins five pairs is encoded once, a prompt shared by many clips once, and the negatives stage's
prompt embeddings are reused here. Frozen encoders are held only while a stage runs
(`FROZEN`), and the text encoder only during the prompt phase, never next to the VAE.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors

from infra.code import code_digest
from infra.config import PrecomputeConfig
from infra.encoded import cached, encoded_key, read_tensor, sha256_of
from infra.gtspec import size_in_bucket
from infra.pairs_format import (PAIRS_FORMAT, VIDEO_FORMAT, VIDEO_LATENTS, check_pair,
                                 pair_bytes, video_bytes)
from infra.store import Store
from infra.video import probe, read_frames, reference_image
from models import wan
from models.runtime import FROZEN, torch_device, weight_identity

def load_vae(spec: wan.WanSpec, device: torch.device) -> Any:
    return wan.load_vae(spec).to(device).eval()


def load_clip(spec: wan.WanSpec, device: torch.device) -> tuple[Any, Any]:
    encoder, processor = wan.load_image_encoder(spec)
    return encoder.to(device).eval(), processor


# ---------------------------------------------------------------------------------------
# Frames at the encode size
# ---------------------------------------------------------------------------------------


def encode_size(row: dict, cfg: PrecomputeConfig) -> tuple[int, int, int]:
    """(width, height, frames) to encode a pair at: the GT spec, or the train resolution."""
    if cfg.frames and cfg.frames > row["frames"]:
        raise ValueError(f"precompute.frames {cfg.frames} > the {row['frames']} frames of the "
                         "GT spec; lower precompute.frames")
    return size_in_bucket(row, cfg.short_edge, cfg.frames)


# ---------------------------------------------------------------------------------------
# One pair
# ---------------------------------------------------------------------------------------


def video_latent(store: Store, spec: wan.WanSpec, uri: str, row: dict, size: tuple[int, int, int],
                 device: torch.device) -> torch.Tensor:
    width, height, frames = size
    vae_id = weight_identity(spec.model, spec.kind, spec.dtype, "vae")
    key = encoded_key("latent", code_digest("tasks.precompute:video_latent"),
                      video=sha256_of(store, uri), vae=vae_id, width=width,
                      height=height, frames=frames, fps=row["fps"], bucket=row["bucket"])

    def compute() -> torch.Tensor:
        with store.local_copy(store.key_of(uri)) as local:
            pixels = torch.from_numpy(read_frames(local, probe(local), row["bucket"], width,
                                                  height, row["fps"], frames))
        with FROZEN.use(("vae", spec.model), lambda: load_vae(spec, device)) as vae:
            return wan.encode_video(vae, pixels)

    return cached(store, key, compute)


def i2v_condition(store: Store, spec: wan.WanSpec, ref_uri: str, size: tuple[int, int, int],
                  device: torch.device) -> torch.Tensor:
    width, height, frames = size
    vae_id = weight_identity(spec.model, spec.kind, spec.dtype, "vae")
    key = encoded_key("cond", code_digest("tasks.precompute:i2v_condition"),
                      image=sha256_of(store, ref_uri), vae=vae_id, width=width,
                      height=height, frames=frames)

    def compute() -> torch.Tensor:
        image = reference_image(store, ref_uri)
        with FROZEN.use(("vae", spec.model), lambda: load_vae(spec, device)) as vae:
            return wan.image_condition(vae, image, height, width, frames)

    return cached(store, key, compute)


def clip_embedding(store: Store, spec: wan.WanSpec, ref_uri: str,
                   device: torch.device) -> torch.Tensor:
    clip_id = weight_identity(spec.model, spec.kind, spec.dtype, "image_encoder")
    key = encoded_key("clip", code_digest("tasks.precompute:clip_embedding"),
                      image=sha256_of(store, ref_uri), encoder=clip_id)

    def compute() -> torch.Tensor:
        image = reference_image(store, ref_uri)
        with FROZEN.use(("clip", spec.model), lambda: load_clip(spec, device)) as (enc, proc):
            return wan.encode_image(enc, proc, image, device).float().cpu()

    return cached(store, key, compute)


def resample_mask(mask: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The [1, F, H, W] region mask (on the GT clip's latent grid) on the encode grid.

    Time: both grids start at GT frame 0 with the VAE's same 4-frame packing, and the encode
    keeps the first frames (precompute.frames), so latent frame i is the same GT time span in
    both: keep the first F. Space: the same picture at another size, nearest (stays 0/1)."""
    f, h, w = latent_shape[-3:]
    if mask.shape[-3] < f:
        raise ValueError(f"the region mask covers {mask.shape[-3]} latent frames, the encode "
                         f"{f}: the negative was made from fewer frames than are encoded")
    mask = mask[..., :f, :, :].float()
    if tuple(mask.shape[-2:]) == (h, w):
        return mask
    return F.interpolate(mask[None], size=(f, h, w), mode="nearest-exact")[0]


_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def precompute_pair(store: Store, row: dict, cfg: PrecomputeConfig, text_key: str,
                    model_config: dict, out_key: str) -> dict:
    """Encode one train pair into a regdpo.pairs.v1 file at `out_key`; returns row fields."""
    spec = wan.WanSpec(cfg.kind, cfg.model, cfg.dtype)  # type: ignore[arg-type]
    device = torch_device(cfg.device)
    size = encode_size(row, cfg)
    tensors = {"win": video_latent(store, spec, row["win"], row, size, device),
               "lose": video_latent(store, spec, row["lose"], row, size, device),
               **conditioning(store, spec, row, size, device, text_key)}
    if row.get("mask"):
        mask = load_safetensors(store.read_bytes(store.key_of(row["mask"])))["mask"]
        tensors["mask"] = resample_mask(mask, tuple(tensors["win"].shape))
    dtype = getattr(torch, cfg.save_dtype)
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    header = {k: (_SAFETENSORS_DTYPE[v.dtype], tuple(v.shape)) for k, v in tensors.items()}
    if problems := check_pair(header, model_config, need_mask=bool(row.get("mask"))):
        raise ValueError(f"pair {row['pair_id']} does not fit {cfg.model!r} ({cfg.kind}): "
                         + "; ".join(problems))
    uri = store.write_bytes(out_key, pair_bytes(tensors))
    width, height, frames = size
    return {"status": "ok", "reason": "", "latents": uri, "format": PAIRS_FORMAT,
            "latent_shape": list(tensors["win"].shape), "encode_width": width,
            "encode_height": height, "encode_frames": frames}


def conditioning(store: Store, spec: wan.WanSpec, row: dict, size: tuple[int, int, int],
                 device: torch.device, text_key: str) -> dict[str, torch.Tensor]:
    """What the transformer is conditioned on: the prompt's embedding, and for I2V the
    first-frame condition (and Wan2.1's CLIP tokens) of the row's reference frame."""
    tensors = {"prompt_embeds": read_tensor(store, text_key)}
    if spec.kind != "t2v":
        tensors["cond"] = i2v_condition(store, spec, row["ref_image"], size, device)
    if spec.kind == "i2v":
        tensors["image_embeds"] = clip_embedding(store, spec, row["ref_image"], device)
    return tensors


def precompute_video(store: Store, row: dict, cfg: PrecomputeConfig, text_key: str,
                     model_config: dict, out_key: str) -> dict:
    """Encode one single video (row `kind` pointwise, with its `desirable` label, or real) into
    a regdpo.video.v1 file at `out_key`; returns row fields."""
    spec = wan.WanSpec(cfg.kind, cfg.model, cfg.dtype)  # type: ignore[arg-type]
    device, size = torch_device(cfg.device), encode_size(row, cfg)
    tensors = {"latent": video_latent(store, spec, row["video"], row, size, device),
               **conditioning(store, spec, row, size, device, text_key)}
    dtype = getattr(torch, cfg.save_dtype)
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    header = {k: (_SAFETENSORS_DTYPE[v.dtype], tuple(v.shape)) for k, v in tensors.items()}
    if problems := check_pair(header, model_config, need_mask=False, latents=VIDEO_LATENTS):
        raise ValueError(f"{row['kind']} video {row['video']} does not fit {cfg.model!r} "
                         f"({cfg.kind}): " + "; ".join(problems))
    if row["kind"] == "pointwise" and not isinstance(row.get("desirable"), bool):
        raise ValueError(f"pointwise row for {row['video']} has desirable="
                         f"{row.get('desirable')!r}, not a bool: the pairs stage labels it")
    uri = store.write_bytes(out_key, video_bytes(tensors))
    width, height, frames = size
    return {"status": "ok", "reason": "", "kind": row["kind"], "latents": uri,
            "format": VIDEO_FORMAT, "desirable": row.get("desirable"),
            "latent_shape": list(tensors["latent"].shape), "encode_width": width,
            "encode_height": height, "encode_frames": frames}


def check_encoders(spec: wan.WanSpec, model_config: dict) -> None:
    """Fail before encoding anything when the encoders cannot feed this transformer."""
    in_channels, image_dim = model_config["in_channels"], model_config.get("image_dim")
    if in_channels != (16 if spec.kind == "t2v" else 36) or bool(image_dim) != (spec.kind == "i2v"):
        raise ValueError(f"model {spec.model!r} does not fit kind {spec.kind!r}: its transformer "
                         f"has in_channels={in_channels}, image_dim={image_dim}; fix "
                         "precompute.kind (train.kind) or the model")
    problems = []
    z_dim = wan.component_config(spec, "vae").get("z_dim")
    if z_dim != model_config["out_channels"]:
        problems.append(f"VAE z_dim {z_dim} != transformer out_channels "
                        f"{model_config['out_channels']}")
    d_model = wan.component_config(spec, "text_encoder").get("d_model")
    if d_model != model_config["text_dim"]:
        problems.append(f"text encoder d_model {d_model} != transformer text_dim "
                        f"{model_config['text_dim']}")
    if spec.kind == "i2v":
        hidden = wan.component_config(spec, "image_encoder").get("hidden_size")
        if hidden != model_config.get("image_dim"):
            problems.append(f"CLIP hidden_size {hidden} != transformer image_dim "
                            f"{model_config.get('image_dim')}")
    if problems:
        raise ValueError(f"model {spec.model!r} ({spec.kind}) cannot be pre-encoded: "
                         + "; ".join(problems) + "; check precompute.model and kind")


def precompute_item(store: Store, out_dir: str, payload: dict) -> dict:
    """The precompute stage's item: one train pair's regdpo.pairs.v1 file in `out_dir` (a row
    of kind pointwise or real: one video's regdpo.video.v1 file)."""
    cfg = PrecomputeConfig.model_validate(payload["config"])
    if payload["row"].get("kind") in ("pointwise", "real"):
        return {"id": payload["id"]} | precompute_video(
            store, payload["row"], cfg, payload["text_key"], payload["model_config"],
            f"{out_dir}/video.safetensors")
    out = precompute_pair(store, payload["row"], cfg, payload["text_key"], payload["model_config"],
                          f"{out_dir}/pair.safetensors")
    return {"id": payload["row"]["pair_id"]} | out
