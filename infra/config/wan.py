"""Facts about Wan models that configs name: kinds, hub ids, the frame and size rules.

One definition of each; models/wan.py imports them from here (this module imports no torch).
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import AfterValidator

# t2v (Wan2.1 text-to-video), i2v (Wan2.1 image-to-video, CLIP image tokens),
# i2v-2.2 (Wan2.2 image-to-video: first-frame latent only, no CLIP).
Kind = Literal["t2v", "i2v", "i2v-2.2"]
KINDS: tuple[str, ...] = get_args(Kind)

WAN21_I2V_14B_720P = "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"
WAN21_T2V_14B = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
WAN21_T2V_1_3B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
WAN22_I2V_A14B = "Wan-AI/Wan2.2-I2V-A14B-Diffusers"

# Text tokens per prompt (the pipelines' max_sequence_length). Wan2.1 I2V attention splits its
# context as [image tokens, 512 text tokens] (diffusers' WanAttnProcessor hard-codes 512), so
# text embeddings must keep this padded length.
TEXT_LEN = 512

# The modules that get a LoRA adapter by default: attention (incl. I2V's image K/V) and the FFN.
DEFAULT_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "ffn.net.0.proj", "ffn.net.2",
)

# The English negative prompt of diffusers' Wan examples (Wan's own default, translated).
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people "
    "in the background, walking backwards"
)


def is_wan_frames(n: int) -> bool:
    """Wan's VAE keeps frame 0 and packs the rest 4 to a latent frame: n = 4k + 1."""
    return n >= 1 and (n - 1) % 4 == 0


def check_frames(v: int | None) -> int | None:
    if v is not None and not is_wan_frames(v):
        raise ValueError(f"frames {v} must be 4k + 1 (Wan's VAE keeps frame 0 and packs the "
                         "rest 4 to a latent frame), e.g. 81, 49, 17, 5")
    return v


def check_edge(v: int | None) -> int | None:
    if v is not None and v % 16:
        raise ValueError(f"short_edge {v} must be a multiple of 16 (VAE 8x and patch 2x)")
    return v


# Frame counts and sizes a Wan model can take (None = the GT clip's own).
WanFrames = Annotated[int | None, AfterValidator(check_frames)]
WanEdge = Annotated[int | None, AfterValidator(check_edge)]

# Weight dtypes a config may name (torch dtype names).
Dtype = Literal["float32", "bfloat16", "float16"]
