"""The GT spec and the way back to it: normalize_file makes a GT clip (normalize) and proves it;
analyze_and_normalize makes the same bytes from the decode that feeds the filter's analysis (the
fused curation pass), left for normalize's item as a prepared clip; renormalize brings generated
frames (negatives, evaluate) to a GT clip's exact spec through the same code. Sizes in a bucket
(generation, encoding) come from one function, size_in_bucket."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import TypeVar

import ffmpeg
import numpy as np

from infra.config import NormalizeConfig
from infra.store import Store
from infra.video import (Geometry, VideoInfo, analysis_output, bucket_geometry, buffered,
                         global_args, gt_encoder, gt_outputs, item_cores, probe, source,
                         stream_decode, stream_encoding, stream_ffmpeg, write_video)

T = TypeVar("T")


# The analysis frames the fused pass holds before analysing them (infra.video.buffered): a 5 s
# 1080p30 source is 58 MB at the default 256 px; longer ones are analysed as they come beyond.
ANALYSIS_AHEAD = 256 * 2**20
# x264's presets with a lookahead of 30 frames or more (x264's preset table: fast 30, medium 40,
# slow 50, slower/veryslow/placebo 60). Only with one is x264 the fused pass's longest chain,
# starved while its lookahead fills and encoding for a while after the decode is done; with
# ultrafast/superfast (none) the decode is the longest chain, and holding the analysis back
# only puts it after the decode (measured: 1.2-1.6 s -> 1.6-1.8 s per toy clip).
DEEP_LOOKAHEAD = ("fast", "medium", "slow", "slower", "veryslow", "placebo")


class NormalizeReject(ValueError):
    """The clip cannot meet the GT spec; the message is the reason."""


def normalize_file(src: str, info: VideoInfo, cfg: NormalizeConfig, out_video: str, out_ref: str) -> dict:
    """Encode `src` to the GT spec at `out_video` (+ frame-0 PNG) and prove it by probing."""
    geo = gt_geometry(info, cfg)
    with gt_pass(source(src).video, geo, cfg, out_video, out_ref):
        pass
    return prove(out_video, geo, cfg)


@contextlib.contextmanager
def gt_pass(decoded, geo: Geometry, cfg: NormalizeConfig, out_video: str, out_ref: str,
            analysis: tuple | None = None, timeout: float = 600.0) -> Iterator[Iterator[np.ndarray]]:
    """Make the GT clip of `decoded` (an ffmpeg-python stream of the source) by the end of
    the block; with `analysis` (analysis_output's (node, w, h) on the same decode), the block
    gets its frames as they come. On one core (infra.video.item_cores) one ffmpeg decodes,
    filters and encodes; on more, a second ffmpeg encodes (stream_encoding), so x264 runs
    beside the decode and the filters instead of after them on ffmpeg 5.1's one
    filter-and-encode thread, and the frames end before the encode does. The same bytes
    either way."""
    frames, w, h = analysis or (None, 0, 0)

    def args(encoder_pipe: str | None = None) -> list[str]:
        outputs = gt_outputs(decoded, out_video, out_ref, geo, cfg.fps, cfg.frames, cfg.crf,
                             cfg.preset, encoder_pipe)
        return global_args(ffmpeg.merge_outputs(*([frames] if frames is not None else []),
                                                *outputs), "-y")

    if item_cores() < 2:
        decode = stream_ffmpeg(args(), w, h, timeout)
        try:
            yield decode
            for _ in decode:  # a block that did not read them all: the decode runs out
                pass
        finally:
            decode.close()
    else:
        with stream_encoding(args, gt_encoder(out_video, cfg.frames, cfg.crf, cfg.preset),
                             w, h, timeout) as decode:
            yield decode


def gt_geometry(info: VideoInfo, cfg: NormalizeConfig) -> Geometry:
    """The GT crop and size of a source, or NormalizeReject when it is too short to resample
    to `cfg.frames` at `cfg.fps` (known from the probe: no encode is spent on it)."""
    available = math.floor(info.duration * cfg.fps + 1e-6)
    if available < cfg.frames:
        raise NormalizeReject(f"too short: {info.duration:.2f} s gives {available} frames at "
                              f"{cfg.fps:g} fps, need {cfg.frames}")
    return bucket_geometry(info.display_width, info.display_height, cfg.buckets, cfg.short_edge)


def prove(out_video: str, geo: Geometry, cfg: NormalizeConfig) -> dict:
    """The encoded clip's spec, checked against the GT spec: frames by packet count (ffprobe
    reads the container, no decode), size, pixel format, rate, no rotation."""
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


def analyze_and_normalize(src: str, info: VideoInfo, short_edge: int, cfg: NormalizeConfig,
                          out_video: str, out_ref: str, analyze: Callable[[Iterator[np.ndarray]], T],
                          timeout: float = 600.0) -> tuple[T, dict | NormalizeReject]:
    """One decode of `src` feeding both the filter's analysis (`analyze` consumes stream_decode's
    frames: every frame at `short_edge`, uint8 RGB, as they are decoded) and the GT encode
    (normalize_file's bytes), through one ffmpeg decode with a split graph (gt_pass). Returns (what
    `analyze` returned, the proven GT spec), or the NormalizeReject instead of the spec when
    the clip cannot meet it; ffmpeg errors raise."""
    try:
        geo = gt_geometry(info, cfg)
    except NormalizeReject as e:
        return analyze(stream_decode(src, info, short_edge, timeout)), e
    decoded = source(src).video.split()
    with gt_pass(decoded[1], geo, cfg, out_video, out_ref,
                 analysis_output(decoded[0], info, short_edge), timeout) as frames:
        # With its own encoder process and a deep lookahead, x264 is the pass's longest chain.
        # The decode runs ahead of it (infra.video.stream_encoding's relay) and ends well
        # before the encode; the analysis waits for the decode (up to ANALYSIS_AHEAD of
        # frames) and runs beside the rest of the encode, on the core the decode left.
        # Streamed instead, it slows the decode and x264 beside it (measured on the 4
        # benchmark clips: 14.1 s against 12.4 s).
        tail = item_cores() >= 2 and cfg.preset in DEEP_LOOKAHEAD
        result = analyze(buffered(frames, ANALYSIS_AHEAD) if tail else frames)
    try:
        return result, prove(out_video, geo, cfg)
    except NormalizeReject as e:
        return result, e


# -- a GT clip made ahead of its normalize item (by the fused curation pass) ----------------
PREPARED = "prepared.json"


def put_prepared(store: Store, item_dir: str, video: str, ref: str, spec: dict) -> None:
    """Leave a GT clip and its spec in a normalize item's dir, for that item to commit without
    decoding again. The spec file goes last: until it exists, nothing here is used."""
    files = {name: store.put_file(local, f"{item_dir}/{name}")
             for name, local in (("gt.mp4", video), ("ref.png", ref))}
    receipts = store.take_receipts(lambda k: k in files.values())
    store.write_json(f"{item_dir}/{PREPARED}", {"spec": spec, "artifacts": receipts})


def find_prepared(store: Store, item_dir: str) -> dict | None:
    """{"spec", "artifacts"} of a GT clip prepared in `item_dir` (artifacts: the receipts of
    its files), or None when there is none or a file no longer matches its receipt."""
    key = f"{item_dir}/{PREPARED}"
    if not store.exists(key):
        return None
    prepared = store.read_json(key)
    sizes = store.sizes(item_dir)
    if any(sizes.get(a["key"]) != a["size"] for a in prepared["artifacts"]):
        return None  # torn or replaced: the item encodes again
    return prepared


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
