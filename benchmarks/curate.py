"""Curation wall time per clip over its floor, measured side by side in one run.

floor(clip) = one ffmpeg decode of the source + one encode of the 81-frame output (same
x264 preset/crf as normalize), measured before and after the timed run (the median of the
two). Curation = the `curate` flow (acquire -> filter -> normalize, Prefect tasks, store
writes, probes) over the same clips, one worker, started as `regdpo run` starts it (on the
ephemeral API, without flow heartbeats), and its fixed cost per run (Prefect API calls
around each stage; printed as "outside the stages"). Both sides are per clip over the same
clips: the ratio is curation's total over the floors' total (clips differ: x264 takes
1.6 s on one default clip and 4.1 s on another, so a median floor against a mean
curation would not compare like with like). Prints the ratio (target <= 1.3x) and the
per-stage seconds.

    python benchmarks/curate.py [--clips 4] [--size 1920x1080] [--preset medium]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from infra.config import RunConfig  # noqa: E402
from infra.stage import stage_dir  # noqa: E402
from infra.store import Store  # noqa: E402
from infra.video import FFMPEG, X264_THREADS, bucket_geometry, probe  # noqa: E402
from tasks.toy_data import SECONDS, Clip, make_clip  # noqa: E402


def timed(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - t


def make_sources(out: Path, n: int, size: str, fps: int) -> list[Path]:
    """Moving 'camera' clips re-encoded like real footage (x264 'fast', not lavfi's ultrafast)."""
    w, h = (int(x) for x in size.split("x"))
    paths = []
    for i in range(n):
        raw = out / f"raw{i}.mp4"
        make_clip(Clip(f"bench{i}", "clean", w, h, fps), raw)
        dst = out / f"clip{i}.mp4"
        subprocess.run([FFMPEG, "-v", "error", "-y", "-i", f"file:{raw}", "-c:v", "libx264", "-preset", "fast",
                        "-crf", "18", "-pix_fmt", "yuv420p", f"file:{dst}"], check=True)
        raw.unlink()
        paths.append(dst)
    return paths


def floor_seconds(src: Path, preset: str, crf: int, tmp: Path) -> float:
    info = probe(src)
    geo = bucket_geometry(info.display_width, info.display_height, ["16:9", "9:16", "3:4", "1:1"], 720)
    raw = tmp / "out.yuv"
    subprocess.run([FFMPEG, "-v", "error", "-y", "-i", f"file:{src}", "-vf",
                    f"fps=16,crop={geo.crop_w}:{geo.crop_h},scale={geo.out_w}:{geo.out_h}",
                    "-frames:v", "81", "-pix_fmt", "yuv420p", "-f", "rawvideo", f"file:{raw}"], check=True)
    decode = timed([FFMPEG, "-v", "error", "-i", f"file:{src}", "-f", "null", "-"])
    encode = timed([FFMPEG, "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s",
                    f"{geo.out_w}x{geo.out_h}", "-r", "16", "-i", f"file:{raw}", "-c:v", "libx264",
                    "-threads", str(X264_THREADS), "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p", f"file:{tmp / 'out.mp4'}"])
    return decode + encode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--crf", type=int, default=18)
    args = ap.parse_args()

    from flows.pipeline import curate
    from flows.stage import heartbeats_if_watched

    with tempfile.TemporaryDirectory(prefix="regdpo-bench-") as tmp_:
        tmp = Path(tmp_)
        print(f"making {args.clips} {args.size}@{args.fps} clips of {SECONDS} s ...", flush=True)
        clips = make_sources(tmp, args.clips, args.size, args.fps)
        with open(tmp / "captions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["video", "caption"])
            w.writerows([(p.name, f"benchmark clip {i}") for i, p in enumerate(clips)])

        def config(store: str, sources: list) -> RunConfig:
            return RunConfig.model_validate({
                "name": "bench", "store": store,
                "acquire": {"sources": sources, "workers": 1},
                "filter": {"workers": 1},
                "normalize": {"preset": args.preset, "crf": args.crf, "workers": 1},
            })

        # Warm-up, outside the timing: one clip through every stage into a store of its own, so
        # the one-time costs of a process (Prefect's ephemeral API, the stage modules' imports,
        # the OCR model's load and first inference) are not charged to the clips. A cluster
        # worker pays them once for millions of clips.
        with open(tmp / "warm.csv", "w", newline="") as f:
            csv.writer(f).writerows([["video", "caption"], [clips[0].name, "warm-up"]])
        with heartbeats_if_watched():  # as `regdpo run` starts a flow
            curate(run="warmup", config=config(f"file://{tmp}/warm", [{"manifest": str(tmp / "warm.csv")}]))

        before = [floor_seconds(c, args.preset, args.crf, tmp) for c in clips]
        store = f"file://{tmp}/store"
        t = time.perf_counter()
        with heartbeats_if_watched():
            curate(run="bench", config=config(store, [{"manifest": str(tmp / "captions.csv")}]))
        total = time.perf_counter() - t
        after = [floor_seconds(c, args.preset, args.crf, tmp) for c in clips]  # both sides of the run

        st = Store(store)
        index = st.read_run("bench")
        per_stage = {s: st.read_success(stage_dir(s, e["key"]))["seconds"] for s, e in index["stages"].items()}
        ok = index["stages"]["normalize"]["counts"]["ok"]
        floors = [statistics.median(pair) for pair in zip(before, after)]
        floor = sum(floors) / len(clips)
        per_clip = total / len(clips)
        print(f"clips: {len(clips)} ({ok} normalized), floor per clip: {floor:.2f} s "
              f"(each clip's median of 2: {', '.join(f'{x:.2f}' for x in floors)})")
        print(f"curation per clip: {per_clip:.2f} s  (stages: " +
              ", ".join(f"{k} {v / len(clips):.2f} s" for k, v in per_stage.items()) + ")")
        # Outside the stages' own seconds: the flow's and subflows' starts and ends (Prefect
        # API calls).
        print(f"outside the stages: {total - sum(per_stage.values()):.2f} s a run "
              f"({(total - sum(per_stage.values())) / len(clips):.2f} s per clip)")
        print(f"ratio curation / floor: {per_clip / floor:.2f}x  (target <= 1.3x)")


if __name__ == "__main__":
    main()
