"""Where the fused curation pass spends its time, side by side in one run, on one clip.

For a 1080p30 source like benchmarks/curate.py's, three timings per repeat:
  floor     one ffmpeg decode of the source + one encode of the 81-frame GT output (as curate.py)
  fused/0   infra.gtspec.analyze_and_normalize with a consumer that only counts the frames:
            the one-decode ffmpeg graph alone (full-resolution decode, two scalers, the encode)
  fused     the same with the filter's real analysis (tasks.filter.scores_of)
and each ratio to the floor, then the analysis signals timed alone on the decoded frames. What
the stage adds around the fused pass (probe, store copies, Prefect) is curate.py's ratio minus
these.

    PYTHONPATH=. python benchmarks/curate_breakdown.py [--repeats 3] [--size 1920x1080]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from infra.config import FilterSignals, NormalizeConfig  # noqa: E402
from infra.gtspec import analyze_and_normalize, gt_geometry  # noqa: E402
from infra.video import FFMPEG, X264_THREADS, probe, stream_decode  # noqa: E402
from tasks import filter as F  # noqa: E402
from tasks.toy_data import Clip, make_clip  # noqa: E402


def timed(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--fps", type=int, default=30)
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.split("x"))
    sig, gt = FilterSignals(), NormalizeConfig()
    with tempfile.TemporaryDirectory(prefix="regdpo-breakdown-") as tmp:
        d = Path(tmp)
        make_clip(Clip("bench", "clean", w, h, args.fps), d / "raw.mp4")
        src = str(d / "clip.mp4")  # re-encoded like real footage, as curate.py's sources
        subprocess.run([FFMPEG, "-v", "error", "-y", "-i", f"file:{d / 'raw.mp4'}", "-c:v", "libx264",
                        "-preset", "fast", "-crf", "18", "-pix_fmt", "yuv420p", f"file:{src}"], check=True)
        info = probe(src)
        geo = gt_geometry(info, gt)
        yuv = d / "gt.yuv"
        subprocess.run([FFMPEG, "-v", "error", "-y", "-i", f"file:{src}", "-vf",
                        f"fps={gt.fps},crop={geo.crop_w}:{geo.crop_h},scale={geo.out_w}:{geo.out_h}",
                        "-frames:v", str(gt.frames), "-pix_fmt", "yuv420p", "-f", "rawvideo",
                        f"file:{yuv}"], check=True)
        F._ocr()  # the OCR engine loads once per process, not per clip
        for _ in range(args.repeats):
            decode = timed([FFMPEG, "-v", "error", "-i", f"file:{src}", "-f", "null", "-"])
            encode = timed([FFMPEG, "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "yuv420p",
                            "-s", f"{geo.out_w}x{geo.out_h}", "-r", str(gt.fps), "-i", f"file:{yuv}",
                            "-c:v", "libx264", "-threads", str(X264_THREADS), "-preset", gt.preset,
                            "-crf", str(gt.crf), "-pix_fmt", "yuv420p", f"file:{d / 'floor.mp4'}"])
            floor = decode + encode
            runs = {}
            for name, consume in (("fused/0", lambda frames: sum(1 for _ in frames)),
                                  ("fused", lambda frames: F.scores_of(frames, info, sig))):
                t = time.perf_counter()
                analyze_and_normalize(src, info, sig.short_edge, gt, str(d / "gt.mp4"),
                                      str(d / "ref.png"), consume)
                runs[name] = time.perf_counter() - t
            print(f"floor {floor:.2f} s (decode {decode:.2f} + encode {encode:.2f}) | "
                  + " | ".join(f"{k} {v:.2f} s = {v / floor:.2f}x" for k, v in runs.items()),
                  flush=True)
        frames = list(stream_decode(src, info, sig.short_edge))
        gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
        motion, cuts = F.Motion(info.fps, sig.motion_fps), F.Cuts(info.fps, sig.cut_threshold)
        tiny = np.stack(gray)[:, ::2, ::2]
        sampled = np.stack([frames[i] for i in np.linspace(0, len(frames) - 1,
                                                             sig.text_frames).round().astype(int)])
        parts = {"motion": lambda: [motion.add(g) for g in gray],
                 "cuts": lambda: [cuts.add(f) for f in frames],
                 "luma+still": lambda: (F.luma_scores(tiny, info.fps),
                                        F.still_scores(tiny, sig.still_diff)),
                 "text": lambda: F.text_scores(sampled, sig.text_side, sig.text_min_score)}
        took = {}
        for name, run in parts.items():
            t = time.perf_counter()
            run()
            took[name] = time.perf_counter() - t
        print(f"analysis alone on {len(frames)} frames at {frames[0].shape[1]}x{frames[0].shape[0]}: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in took.items())
              + f"; total {sum(took.values()):.2f} s")


if __name__ == "__main__":
    main()
