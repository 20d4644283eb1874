"""The GT spec and the way back to it: normalize_file makes a GT clip (normalize) and proves it;
renormalize brings generated frames (negatives, evaluate) to a GT clip's exact spec through the
same code. Sizes in a bucket (generation, encoding) come from one function, size_in_bucket."""

from __future__ import annotations

import math
import os
import tempfile
from fractions import Fraction

import numpy as np

from infra.config import NormalizeConfig
from infra.video import VideoInfo, bucket_geometry, normalize_args, probe, run_ffmpeg, write_video


class NormalizeReject(ValueError):
    """The clip cannot meet the GT spec; the message is the reason."""


def normalize_file(src: str, info: VideoInfo, cfg: NormalizeConfig, out_video: str, out_ref: str) -> dict:
    """Encode `src` to the GT spec at `out_video` (+ frame-0 PNG) and prove it by probing."""
    # Frames available after resampling to cfg.fps: reject before spending an encode.
    available = math.floor(info.duration * cfg.fps + 1e-6)
    if available < cfg.frames:
        raise NormalizeReject(f"too short: {info.duration:.2f} s gives {available} frames at "
                              f"{cfg.fps:g} fps, need {cfg.frames}")
    geo = bucket_geometry(info.display_width, info.display_height, cfg.buckets, cfg.short_edge)
    run_ffmpeg(normalize_args(src, out_video, out_ref, geo, cfg.fps, cfg.frames, cfg.crf, cfg.preset))
    out = probe(out_video, count_frames=True)
    if out.nb_frames != cfg.frames:
        raise NormalizeReject(f"too short: only {out.nb_frames} frames at {cfg.fps:g} fps, need {cfg.frames}")
    spec = (out.width, out.height, out.pix_fmt, round(out.fps, 3), out.rotation)
    want = (geo.out_w, geo.out_h, "yuv420p", round(cfg.fps, 3), 0)
    if spec != want:
        raise RuntimeError(f"normalized output {spec} does not match the GT spec {want}")
    return {"bucket": geo.bucket, "width": out.width, "height": out.height, "fps": out.fps,
            "frames": out.nb_frames, "pix_fmt": out.pix_fmt,
            "crop": f"{geo.crop_w}x{geo.crop_h}+{geo.crop_x}+{geo.crop_y}"}


def renormalize(frames: np.ndarray, clip: dict, gt: NormalizeConfig, out_video: str) -> dict:
    """Bring generated frames to the GT clip's exact spec through normalize_file and prove it.

    The frames span the GT clip's duration (frames / fps): at the GT frame count that is the GT
    frame rate; fewer generated frames (a cheap toy setting) are held longer."""
    rate = Fraction(len(frames)) * Fraction(gt.fps).limit_denominator(1001) / clip["frames"]
    spec = gt.model_copy(update={"buckets": [clip["bucket"]],
                                 "short_edge": min(clip["width"], clip["height"])})
    with tempfile.TemporaryDirectory(prefix="regdpo-neg-") as tmp:
        raw = os.path.join(tmp, "generated.mp4")  # lossless RGB
        write_video(frames, rate, raw, "rgb24", ["-c:v", "libx264rgb", "-crf", "0",
                                                 "-preset", "ultrafast"])
        out = normalize_file(raw, probe(raw), spec, out_video, os.path.join(tmp, "ref.png"))
    got = (out["width"], out["height"], out["frames"], out["bucket"])
    want = (clip["width"], clip["height"], clip["frames"], clip["bucket"])
    if got != want:
        raise RuntimeError(f"renormalized negative {got} does not match its GT clip {want}")
    return out


def size_in_bucket(clip: dict, short_edge: int | None, frames: int | None) -> tuple[int, int, int]:
    """(width, height, frames) for work on a GT clip: its own size, or `short_edge` in its
    bucket (multiples of 16, as the VAE and patch grid need); its own frame count, or `frames`."""
    n = frames or clip["frames"]
    if short_edge is None:
        return clip["width"], clip["height"], n
    geo = bucket_geometry(clip["width"], clip["height"], [clip["bucket"]], short_edge)
    return geo.out_w, geo.out_h, n
