"""precompute (paper A.2, "prompt pre-encoding"): every tensor the trainer needs, encoded once.

Per train pair, one regdpo.pairs.v1 file (tasks/train.py, "Pair data"):
  prompt_embeds  UMT5, zero-padded to 512 tokens           (WanPipeline.encode_prompt)
  win, lose      VAE latents, (z - latents_mean) / latents_std, the distribution's mode
  cond           I2V: 4 first-frame mask channels + the latent of the zero-padded first frame
                 (WanImageToVideoPipeline.prepare_latents)
  image_embeds   Wan2.1 I2V: CLIP penultimate hidden states of the reference frame
  mask           LocalDPO pairs: the corrupted region, resampled to this latent grid

Each piece is content-addressed in the store (`cache/encoded/<what>/<digest>.safetensors`, the
digest of the input bytes, the encoder's identity, the size and this code), so the GT clip that
wins five pairs is encoded once, a prompt shared by many clips once, and the negatives stage's
prompt embeddings are reused here. Frozen encoders are held only while a stage runs
(`FROZEN`), and the text encoder only during the prompt phase, never next to the VAE.
"""

from __future__ import annotations

import gc
import hashlib
import threading
from collections import defaultdict
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from infra.config import PrecomputeConfig
from infra.stage import code_version
from infra.store import Store, digest, join_key
from infra.video import VideoInfo, bucket_geometry, file_url, probe, run_ffmpeg
from models import wan
from tasks.train import PAIRS_FORMAT, check_pair

# ---------------------------------------------------------------------------------------
# Frozen modules: loaded on first use, shared by a stage's worker threads, one call at a time
# ---------------------------------------------------------------------------------------


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
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def torch_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_vae(spec: wan.WanSpec, device: torch.device) -> Any:
    return wan.load_vae(spec).to(device).eval()


def load_clip(spec: wan.WanSpec, device: torch.device) -> tuple[Any, Any]:
    encoder, processor = wan.load_image_encoder(spec)
    return encoder.to(device).eval(), processor


# ---------------------------------------------------------------------------------------
# Content-addressed tensors
# ---------------------------------------------------------------------------------------

_KEY_LOCKS: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)


@lru_cache(maxsize=None)
def identity(model: str, kind: str, dtype: str, component: str) -> str:
    """Which weights encode: two models shipping the same UMT5 share their embeddings."""
    return wan.component_identity(wan.WanSpec(kind, model, dtype), component)  # type: ignore[arg-type]


def encoded_key(what: str, **inputs: Any) -> str:
    return join_key("cache", "encoded", what,
                    f"{digest({'what': what, **inputs, 'code': code_version('precompute')}, 32)}"
                    ".safetensors")


def read_tensor(store: Store, key: str) -> torch.Tensor:
    return load_safetensors(store.read_bytes(key))["t"]


def cached(store: Store, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The tensor at `key`, computed and written (atomically) the first time."""
    with _KEY_LOCKS[key]:
        if store.exists(key):
            return read_tensor(store, key)
        tensor = compute().contiguous()
        store.write_bytes(key, save_safetensors({"t": tensor}))
        return tensor


def sha256_of(store: Store, uri: str) -> str:
    return hashlib.sha256(store.read_bytes(store.key_of(uri))).hexdigest()


def prompt_key(spec: wan.WanSpec, prompt: str) -> str:
    text = identity(spec.model, spec.kind, spec.dtype, "text_encoder")
    tokens = identity(spec.model, spec.kind, spec.dtype, "tokenizer")
    return encoded_key("text", prompt=prompt, encoder=text, tokenizer=tokens)


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
                store.write_bytes(keys[prompt], save_safetensors({"t": embed.contiguous()}))
        del encoder
        free_memory()
    return keys


# ---------------------------------------------------------------------------------------
# Frames at the encode size
# ---------------------------------------------------------------------------------------


def encode_size(row: dict, cfg: PrecomputeConfig) -> tuple[int, int, int]:
    """(width, height, frames) to encode a pair at: the GT spec, or the train resolution."""
    frames = cfg.frames or row["frames"]
    if frames > row["frames"]:
        raise ValueError(f"precompute.frames {frames} > the {row['frames']} frames of the GT "
                         "spec; lower precompute.frames")
    if cfg.short_edge is None:
        return row["width"], row["height"], frames
    geo = bucket_geometry(row["width"], row["height"], [row["bucket"]], cfg.short_edge)
    return geo.out_w, geo.out_h, frames


def read_frames(path: str, info: VideoInfo, bucket: str, width: int, height: int, fps: float,
                frames: int) -> torch.Tensor:
    """uint8 [frames, height, width, 3]: the first `frames` at `fps`, center-cropped to `bucket`
    and scaled, as normalize does (a no-op crop and scale for clips already at the size)."""
    import ffmpeg

    geo = bucket_geometry(info.display_width, info.display_height, [bucket], min(width, height))
    args = (
        ffmpeg.input(file_url(path)).video
        .filter("fps", fps=fps)
        .filter("crop", geo.crop_w, geo.crop_h, geo.crop_x, geo.crop_y)
        .filter("scale", width, height, flags="lanczos")
        .output("pipe:", format="rawvideo", pix_fmt="rgb24", **{"frames:v": frames})
        .global_args("-v", "error", "-nostdin")
        .compile()
    )
    buf = run_ffmpeg(args).stdout
    got = len(buf) // (width * height * 3)
    if got < frames:
        raise ValueError(f"video has {got} frames at {fps:g} fps, need {frames}")
    return torch.from_numpy(np.frombuffer(buf, np.uint8)[: frames * height * width * 3].copy()
                            .reshape(frames, height, width, 3))


# ---------------------------------------------------------------------------------------
# One pair
# ---------------------------------------------------------------------------------------


def video_latent(store: Store, spec: wan.WanSpec, uri: str, row: dict, size: tuple[int, int, int],
                 device: torch.device) -> torch.Tensor:
    width, height, frames = size
    vae_id = identity(spec.model, spec.kind, spec.dtype, "vae")
    key = encoded_key("latent", video=sha256_of(store, uri), vae=vae_id, width=width,
                      height=height, frames=frames, fps=row["fps"], bucket=row["bucket"])

    def compute() -> torch.Tensor:
        with store.local_copy(store.key_of(uri)) as local:
            pixels = read_frames(local, probe(local), row["bucket"], width, height, row["fps"],
                                 frames)
        with FROZEN.use(("vae", spec.model), lambda: load_vae(spec, device)) as vae:
            return wan.encode_video(vae, pixels)

    return cached(store, key, compute)


def reference_image(store: Store, uri: str) -> Image.Image:
    with store.local_copy(store.key_of(uri)) as local, Image.open(local) as image:
        return image.convert("RGB")


def i2v_condition(store: Store, spec: wan.WanSpec, ref_uri: str, size: tuple[int, int, int],
                  device: torch.device) -> torch.Tensor:
    width, height, frames = size
    vae_id = identity(spec.model, spec.kind, spec.dtype, "vae")
    key = encoded_key("cond", image=sha256_of(store, ref_uri), vae=vae_id, width=width,
                      height=height, frames=frames)

    def compute() -> torch.Tensor:
        image = reference_image(store, ref_uri)
        with FROZEN.use(("vae", spec.model), lambda: load_vae(spec, device)) as vae:
            return wan.image_condition(vae, image, height, width, frames)

    return cached(store, key, compute)


def clip_embedding(store: Store, spec: wan.WanSpec, ref_uri: str,
                   device: torch.device) -> torch.Tensor:
    clip_id = identity(spec.model, spec.kind, spec.dtype, "image_encoder")
    key = encoded_key("clip", image=sha256_of(store, ref_uri), encoder=clip_id)

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
    tensors = {"prompt_embeds": read_tensor(store, text_key),
               "win": video_latent(store, spec, row["win"], row, size, device),
               "lose": video_latent(store, spec, row["lose"], row, size, device)}
    if spec.kind != "t2v":
        tensors["cond"] = i2v_condition(store, spec, row["ref_image"], size, device)
    if spec.kind == "i2v":
        tensors["image_embeds"] = clip_embedding(store, spec, row["ref_image"], device)
    if row.get("mask"):
        mask = load_safetensors(store.read_bytes(store.key_of(row["mask"])))["mask"]
        tensors["mask"] = resample_mask(mask, tuple(tensors["win"].shape))
    dtype = getattr(torch, cfg.save_dtype)
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    header = {k: (_SAFETENSORS_DTYPE[v.dtype], tuple(v.shape)) for k, v in tensors.items()}
    if problems := check_pair(header, model_config, need_mask=bool(row.get("mask"))):
        raise ValueError(f"pair {row['pair_id']} does not fit {cfg.model!r} ({cfg.kind}): "
                         + "; ".join(problems))
    uri = store.write_bytes(out_key, save_safetensors(tensors, metadata={"format": PAIRS_FORMAT}))
    width, height, frames = size
    return {"status": "ok", "reason": "", "latents": uri, "format": PAIRS_FORMAT,
            "latent_shape": list(tensors["win"].shape), "encode_width": width,
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
