"""Toy clips from ffmpeg's lavfi sources: clean moving scenes, one clip of every rejection
kind, and hostile inputs. The demo and the tests curate these instead of downloaded data."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from infra.video import FFMPEG, run_ffmpeg

SECONDS = 5.5  # inside the paper's 5-6 s window; 16 fps x 5.5 s = 88 >= 81 frames


@dataclass(frozen=True)
class Clip:
    name: str
    kind: str  # clean | static | cuts | flash | fade | text | slideshow | short | small | fps
    width: int
    height: int
    fps: int
    caption: str | None = None


def _scene(w: int, h: int, fps: int, seed: int, label: str = "") -> str:
    """A moving scene: two flat-coloured boxes swinging over drifting colour gradients.

    Flat shapes on smooth gradients have clear motion edges and nothing text-like, so the
    clean clips pass the text detector as real footage without captions would.
    """
    bw, bh, cw, ch = even(w * 0.3), even(h * 0.3), even(w * 0.16), even(h * 0.22)
    hue = (seed * 37) % 360
    return (
        f"gradients=s={w}x{h}:r={fps}:speed=0.02:seed={seed}:n=5[bg{label}];"
        f"color=c=0xE8D040:s={bw}x{bh}:r={fps},hue=h={hue}[a{label}];"
        f"color=c=0x3050C8:s={cw}x{ch}:r={fps},hue=h={hue}[b{label}];"
        f"[bg{label}][a{label}]overlay=x='(W-w)/2+(W-w)/2*sin(t*1.7+{seed})'"
        f":y='(H-h)/2+(H-h)/2*cos(t*1.3+{seed})'[m{label}];"
        f"[m{label}][b{label}]overlay=x='(W-w)/2+(W-w)/2*cos(t*1.1+{seed})'"
        f":y='(H-h)/2+(H-h)/2*sin(t*2.1+{seed})'"
    )


def even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def _encode(graph: str, dst: Path, seconds: float, extra: list[str] | None = None) -> None:
    args = [FFMPEG, "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i", graph, "-t", f"{seconds}",
            "-c:v", "libx264", "-preset", "ultrafast", "-crf", "20", "-pix_fmt", "yuv420p",
            *(extra or []), f"file:{dst}"]
    run_ffmpeg(args)


CLEAN = [
    Clip("clean_landscape_30fps", "clean", 1280, 720, 30, "A test pattern sweeps across drifting colour gradients."),
    Clip("clean_portrait_24fps", "clean", 720, 1280, 24, "A bright pattern swings over a portrait gradient."),
    Clip("clean_3x4_25fps", "clean", 768, 1024, 25, "Colour bars glide over a soft 3:4 background."),
    Clip("clean_square_30fps", "clean", 720, 720, 30, None),  # no caption: the captioner writes one
    Clip("clean_small_16x9_25fps", "clean", 960, 540, 25, "A pattern moves over shifting gradients."),
]
REJECTS = [
    Clip("reject_static", "static", 1280, 720, 30, "Static colour bars."),
    Clip("reject_cuts", "cuts", 1280, 720, 30, "Four different scenes cut together."),
    Clip("reject_flash", "flash", 1280, 720, 30, "A moving pattern with camera flashes."),
    Clip("reject_fade", "fade", 1280, 720, 30, "A moving pattern fading in and out of black."),
    Clip("reject_text", "text", 1280, 720, 30, "A moving pattern under large burned-in captions."),
    Clip("reject_slideshow", "slideshow", 1280, 720, 30, "A slideshow of still images."),
    Clip("reject_short", "short", 1280, 720, 30, "A two-second clip."),
    Clip("reject_small", "small", 320, 180, 30, "A tiny clip."),
    Clip("reject_fps", "fps", 1280, 720, 10, "A ten frames per second clip."),
]


def make_clip(clip: Clip, dst: Path) -> Path:
    w, h, fps = clip.width, clip.height, clip.fps
    seed = sum(map(ord, clip.name)) % 97
    if clip.kind in ("clean", "small", "fps", "short"):
        _encode(_scene(w, h, fps, seed), dst, 2.0 if clip.kind == "short" else SECONDS)
    elif clip.kind == "static":
        _encode(f"smptehdbars=s={w}x{h}:r={fps}", dst, SECONDS)
    elif clip.kind == "cuts":
        parts = [_scene(w, h, fps, seed + 11 * i, str(i)) + f",trim=duration={SECONDS / 4}[s{i}]"
                 for i in range(4)]
        _encode(";".join(parts) + ";[s0][s1][s2][s3]concat=n=4:v=1:a=0", dst, SECONDS)
    elif clip.kind == "flash":
        flashes = "+".join(f"between(t,{t},{t + 0.07})" for t in (1.2, 2.6, 4.1))
        _encode(_scene(w, h, fps, seed) + f",eq=brightness=0.8:enable='{flashes}'", dst, SECONDS)
    elif clip.kind == "fade":
        _encode(_scene(w, h, fps, seed) + ",fade=t=in:st=0:d=1,fade=t=out:st=4.0:d=0.8", dst, SECONDS)
    elif clip.kind == "text":
        text = ",".join(
            f"drawtext=font=Sans:text='{line}':fontsize={h // 9}:fontcolor=white"
            f":box=1:boxcolor=black@0.6:x=(w-text_w)/2:y={y}*h"
            for line, y in (("BREAKING NEWS TODAY", 0.08), ("SUBSCRIBE AND SHARE", 0.72),
                            ("LIVE COVERAGE 24/7", 0.85))
        )
        _encode(_scene(w, h, fps, seed) + "," + text, dst, SECONDS)
    elif clip.kind == "slideshow":
        stills = [f"gradients=s={w}x{h}:r={fps}:speed=0.00001:seed={seed + 7 * i}:n=4,trim=duration={SECONDS / 4}[p{i}]"
                  for i in range(4)]
        _encode(";".join(stills) + ";[p0][p1][p2][p3]concat=n=4:v=1:a=0", dst, SECONDS)
    else:
        raise ValueError(f"unknown toy clip kind {clip.kind!r}")
    return dst


def make_edge_cases(out: Path) -> dict[str, Path]:
    """Hostile and odd inputs that must each end as a row with a clear reason."""
    out.mkdir(parents=True, exist_ok=True)
    p = {name: out / name for name in (
        "empty.mp4", "truncated.mp4", "not_a_video.mp4", "audio_only.mp4", "three_frames.mp4",
        "huge_8k.mp4", "vfr.mp4", "tenbit.mp4", "odd_dims.mp4", "rotated_phone.mp4",
        "name with spaces ü ñ.mp4", "-dash; $(rm -rf x).mp4",
    )}
    p["empty.mp4"].write_bytes(b"")
    p["not_a_video.mp4"].write_text("this is a text file, not a video\n")
    scene = _scene(1280, 720, 30, 5)
    full = out / ".full_moov_at_end.mp4"
    _encode(scene, full, SECONDS)
    data = full.read_bytes()
    p["truncated.mp4"].write_bytes(data[: len(data) // 2])  # moov at the end: cut off
    full.unlink()
    run_ffmpeg([FFMPEG, "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i", "sine=f=440:d=5.5",
                "-c:a", "aac", f"file:{p['audio_only.mp4']}"])
    _encode(scene, p["three_frames.mp4"], 0.1)
    _encode("testsrc2=s=7680x4320:r=30", p["huge_8k.mp4"], 0.07)
    # Variable frame rate: drop an irregular subset of frames and keep the original timestamps.
    _encode(scene + ",select='not(eq(mod(n\\,7)\\,3))*not(eq(mod(n\\,5)\\,1))'", p["vfr.mp4"], SECONDS,
            ["-fps_mode", "vfr"])
    _encode(scene, p["tenbit.mp4"], SECONDS, ["-pix_fmt", "yuv420p10le"])
    _encode(_scene(1279, 719, 30, 3) + ",scale=1279:719", p["odd_dims.mp4"], SECONDS, ["-pix_fmt", "yuv444p"])
    # A phone video: coded landscape, displayed portrait through the rotation flag.
    coded = out / ".coded_landscape.mp4"
    _encode(_scene(1280, 720, 30, 9), coded, SECONDS)
    run_ffmpeg([FFMPEG, "-v", "error", "-nostdin", "-y", "-i", f"file:{coded}", "-c", "copy",
                "-metadata:s:v:0", "rotate=90", f"file:{p['rotated_phone.mp4']}"])
    coded.unlink()
    _encode(_scene(1280, 720, 25, 13), p["name with spaces ü ñ.mp4"], SECONDS)
    _encode(_scene(1280, 720, 25, 17), p["-dash; $(rm -rf x).mp4"], SECONDS)
    return p


def make_toy_models(out: str | os.PathLike) -> Path:
    """models/tiny-blip (captioner), models/tiny-wan-i2v and tiny-wan-t2v (random-weight
    Wan2.1 I2V and T2V in the diffusers layout) and models/tiny-critic (a random-weight
    Qwen2-VL critic): what configs/toy.yaml and toy-ipo.yaml load instead of real weights."""
    from models.tiny import build_tiny, build_tiny_captioner, build_tiny_critic

    models = Path(out) / "models"
    build_tiny_captioner(models / "tiny-blip")
    build_tiny("i2v", models / "tiny-wan-i2v")
    build_tiny("t2v", models / "tiny-wan-t2v")
    build_tiny_critic(models / "tiny-critic")
    return models


def make_toy_data(out: str | os.PathLike, edge_cases: bool = True) -> Path:
    """Write clips/ (clean + one of each rejection kind), captions.csv, and edge/ cases."""
    out = Path(out)
    clips = out / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    rows = []
    for clip in CLEAN + REJECTS:
        make_clip(clip, clips / f"{clip.name}.mp4")
        rows.append({"video": f"{clip.name}.mp4", "caption": clip.caption or "", "kind": clip.kind})
    # OpenVid-1M's CSV layout: a `video` column of names relative to the video folder + `caption`.
    with open(out / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["video", "caption", "kind"])
        writer.writeheader()
        writer.writerows(rows)
    if edge_cases:
        make_edge_cases(out / "edge")
    return out
