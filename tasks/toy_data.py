"""Toy clips from ffmpeg's lavfi sources: clean moving scenes, one clip of every rejection
kind, hostile inputs, and the critic's seed pairs (a clean clip against a degraded copy). The
demo and the tests curate these instead of downloaded data."""

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


def _scene(w: int, h: int, fps: int, seed: int, label: str = "",
           background: str | None = None) -> str:
    """A moving scene: two flat-coloured boxes swinging over drifting colour gradients
    (ffmpeg's `gradients` source unless `background` names another source graph).

    Flat shapes on smooth gradients have clear motion edges and nothing text-like, so the
    clean clips pass the text detector as real footage without captions would.
    """
    bw, bh, cw, ch = even(w * 0.3), even(h * 0.3), even(w * 0.16), even(h * 0.22)
    hue = (seed * 37) % 360
    background = background or f"gradients=s={w}x{h}:r={fps}:speed=0.02:seed={seed}:n=5"
    return (
        f"{background}[bg{label}];"
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


# ---------------------------------------------------------------------------------------
# The critic's toy seed data (regdpo.critic-seed.v1): a clean clip against a degraded copy
# ---------------------------------------------------------------------------------------

SEED_SIZE, SEED_FPS, SEED_SECONDS = (160, 90), 16, 1.5  # small and short: the critic is slow


@dataclass(frozen=True)
class Degradation:
    """What a real ffmpeg filter chain does to a clip, as a human labeller would write it."""

    filters: str  # appended to the clean scene's graph
    rationale: str  # {clean} / {bad} become "video A" / "video B"
    notes: dict[str, str]  # infra.critic_seed.NOTES column -> note, same placeholders


DEGRADATIONS = {
    "noise_blur": Degradation(
        "noise=alls=70:allf=t,boxblur=3:1",
        "{bad} is buried in heavy flickering noise and blur; {clean} shows the same scene "
        "sharp and clean, so {clean} is better.",
        {"subject_consistency": "the boxes in {bad} dissolve into the noise from frame to frame",
         "aesthetic_quality": "{bad} is grainy and soft; {clean} is crisp"}),
    "stutter": Degradation(
        "fps=3,fps=16",
        "{bad} stutters: it holds each frame and then jumps; {clean} moves smoothly, so {clean} "
        "is better.",
        {"motion_smoothness": "{bad} jumps a few times a second; {clean} glides"}),
    "pixelate": Degradation(
        "scale=20:12,scale=160:90:flags=neighbor",
        "{bad} is reduced to a few big blocks; {clean} shows the boxes and gradients in detail, "
        "so {clean} is better.",
        {"prompt_alignment": "the boxes are hard to make out in {bad}",
         "aesthetic_quality": "{bad} is blocky"}),
    "washed_out": Degradation(
        "eq=contrast=0.25:brightness=0.3:saturation=0.15",
        "{bad} is washed out to a grey haze; {clean} has its full colour and contrast, so "
        "{clean} is better.",
        {"prompt_alignment": "the colours the prompt asks for are gone in {bad}",
         "aesthetic_quality": "{bad} is flat and grey"}),
    "freeze": Degradation(
        "trim=duration=0.4,tpad=stop_mode=clone:stop_duration=2",
        "{bad} freezes on one frame after the first moments; in {clean} the boxes keep "
        "swinging, so {clean} is better.",
        {"prompt_alignment": "the boxes stop swinging in {bad}",
         "motion_smoothness": "{bad} stands still; {clean} moves throughout"}),
    "negate": Degradation(
        "negate",
        "{bad} has inverted colours, like a film negative; {clean} shows the scene as "
        "described, so {clean} is better.",
        {"prompt_alignment": "the colours of {bad} do not match the prompt",
         "aesthetic_quality": "{bad} looks harsh and unnatural"}),
    "shake": Degradation(
        "crop=136:76:x='12+12*sin(n*2.1)':y='7+7*cos(n*2.9)',scale=160:90",
        "{bad} shakes from frame to frame as if the camera were unsteady; {clean} is steady, so "
        "{clean} is better.",
        {"subject_consistency": "the boxes jump around in {bad}",
         "motion_smoothness": "{bad} jitters every frame"}),
    "dark": Degradation(
        "eq=brightness=-0.4:gamma=0.5,noise=alls=20:allf=t",
        "{bad} is nearly black and noisy; {clean} is well lit, so {clean} is better.",
        {"aesthetic_quality": "{bad} is too dark to see the boxes well"}),
}

# (scene seed, degradation, prompt): seed.csv's 6 pairs and heldout.csv's 4 (other scenes).
SEED_LABELS = [
    (3, "noise_blur", "Two coloured boxes swing over drifting colour gradients."),
    (8, "stutter", "A small box and a large box glide across a soft gradient."),
    (14, "pixelate", "Bright boxes sway over a shifting colourful background."),
    (21, "washed_out", "Two vivid boxes move over glowing gradients."),
    (27, "freeze", "Two boxes keep swinging over a drifting background."),
    (33, "negate", "Coloured boxes swing over warm drifting gradients."),
]
HELDOUT_LABELS = [
    (41, "shake", "Two boxes swing over a calm gradient background."),
    (46, "dark", "Bright boxes glide over light colour gradients."),
    (52, "noise_blur", "A pair of boxes swings over smooth gradients."),
    (58, "stutter", "Two boxes move smoothly across drifting colours."),
]


def _waves(w: int, h: int, seed: int) -> str:
    """Drifting colour waves computed per pixel: the same frames on every run (ffmpeg's
    `gradients` source draws its colours at random whatever its seed)."""
    wave = "128+90*sin({}/{}+T*{}+{})"
    return (f"nullsrc=s={w}x{h}:r={SEED_FPS},geq=r='{wave.format('X', 23, 0.9, seed)}'"
            f":g='{wave.format('Y', 17, 0.6, 2 * seed)}':b='{wave.format('(X+Y)', 29, 0.4, 3 * seed)}'")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _seed_rows(labels: list[tuple[int, str, str]], split: str, videos: Path) -> list[dict]:
    """Encode each label's clean and degraded clip; the clean one is video_a on even rows and
    video_b on odd ones, so the human's preference is balanced between a and b."""
    from infra.critic_seed import NOTES

    w, h = SEED_SIZE
    rows = []
    for i, (seed, kind, prompt) in enumerate(labels):
        pair_id = f"{split}-{i}-{kind}"
        scene, degradation = _scene(w, h, SEED_FPS, seed, background=_waves(w, h, seed)), DEGRADATIONS[kind]
        clean, bad = f"videos/{pair_id}-clean.mp4", f"videos/{pair_id}-{kind}.mp4"
        _encode(scene, videos.parent / clean, SEED_SECONDS)
        _encode(f"{scene},{degradation.filters}", videos.parent / bad, SEED_SECONDS)
        clean_side = "a" if i % 2 == 0 else "b"
        names = {"clean": f"video {clean_side.upper()}",
                 "bad": f"video {'B' if clean_side == 'a' else 'A'}"}
        rows.append({"id": pair_id, "prompt": prompt,
                     "video_a": clean if clean_side == "a" else bad,
                     "video_b": bad if clean_side == "a" else clean,
                     "preferred": clean_side,
                     "rationale": _sentence(degradation.rationale.format(**names)),
                     **{n: _sentence(degradation.notes.get(n, "").format(**names)) for n in NOTES}})
    return rows


def make_critic_seed(out: str | os.PathLike) -> Path:
    """critic-seed/seed.csv (6 pairs) and heldout.csv (4 pairs, other scenes) in
    regdpo.critic-seed.v1 (infra/critic_seed.py), videos in critic-seed/videos/: each pair a
    clean toy clip against a copy degraded by a real ffmpeg filter (noise and blur, stutter,
    pixelation, ...), the clean one preferred, with a rationale and per-dimension notes on
    what the degradation did. Returns the critic-seed folder."""
    from infra.critic_seed import NOTES, REQUIRED

    root = Path(out) / "critic-seed"
    (root / "videos").mkdir(parents=True, exist_ok=True)
    for name, labels in (("seed", SEED_LABELS), ("heldout", HELDOUT_LABELS)):
        rows = _seed_rows(labels, name, root / "videos")
        with open(root / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", *REQUIRED, *NOTES])
            writer.writeheader()
            writer.writerows(rows)
    return root


def make_toy_models(out: str | os.PathLike) -> Path:
    """models/tiny-blip (captioner), models/tiny-wan-i2v and tiny-wan-t2v (random-weight
    Wan2.1 I2V and T2V in the diffusers layout) and models/tiny-critic (a tiny Qwen2-VL critic
    taught the answer format, models.tiny.build_tiny_critic(answers=True): well-formed chains,
    uninformed verdicts): what configs/toy.yaml and toy-ipo.yaml load instead of real weights."""
    from models.tiny import build_tiny, build_tiny_captioner, build_tiny_critic

    models = Path(out) / "models"
    build_tiny_captioner(models / "tiny-blip")
    build_tiny("i2v", models / "tiny-wan-i2v")
    build_tiny("t2v", models / "tiny-wan-t2v")
    build_tiny_critic(models / "tiny-critic", answers=True)
    return models


def make_toy_data(out: str | os.PathLike, edge_cases: bool = True) -> Path:
    """Write clips/ (clean + one of each rejection kind), captions.csv, edge/ cases and the
    critic's seed data (critic-seed/)."""
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
    make_critic_seed(out)
    return out
