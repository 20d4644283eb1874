"""Curate throughput on the Dask cluster runner at 1 and 2 workers, side by side in one run.

For each worker count: a LocalCluster of that many worker processes (1 thread each), started
and warmed (imports, OCR model) before the clock, reached by address as an existing cluster
would be; then the `curate` flow (acquire -> filter -> normalize at the paper's GT spec) over
the same clips into a fresh store. Prints clips per minute for each, with the cores the run
kept busy on average (all its processes), and, last,

    parallel efficiency <throughput at 2 / (2 x throughput at 1)>    (target on 2 cores: >= 0.8)

    python benchmarks/curate_scale.py [--clips 12] [--size 1920x1080] [--preset medium]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from infra.config import RunConfig  # noqa: E402
from tasks.toy_data import Clip, make_clip  # noqa: E402


def make_sources(out: Path, n: int, size: str, fps: int, first: int = 0) -> Path:
    """n distinct moving clips and their captions manifest."""
    w, h = (int(x) for x in size.split("x"))
    manifest = out / f"clips{first}.csv"
    with manifest.open("w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["video", "caption"])
        for i in range(first, first + n):
            make_clip(Clip(f"scale{i}", "clean", w, h, fps), out / f"scale{i}.mp4")
            rows.writerow([f"scale{i}.mp4", f"benchmark clip {i}"])
    return manifest


def config(store: str, manifest: Path, address: str, preset: str) -> RunConfig:
    return RunConfig.model_validate({
        "name": "scale", "store": store,
        # One machine: the store's folder is every worker's (what shared_store declares).
        "runner": {"kind": "dask", "address": address, "shared_store": True},
        "acquire": {"sources": [{"manifest": str(manifest), "video_root": str(manifest.parent)}]},
        "normalize": {"preset": preset},
    })


def clips_per_minute(workers: int, tmp: Path, clips: Path, warm: Path, preset: str) -> float:
    from distributed import Client, LocalCluster

    from flows.pipeline import curate
    from flows.stage import heartbeats_if_watched

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(lambda: [__import__(m) for m in ("tasks.acquire", "tasks.filter",
                                                    "tasks.normalize")])
        # Warm-up: one clip per worker through every stage (OCR and codecs load on first use).
        with heartbeats_if_watched():  # as `regdpo run` starts a flow
            curate(run="scale", config=config(f"file://{tmp}/warm{workers}", warm,
                                              cluster.scheduler_address, preset))
        n = sum(1 for _ in csv.DictReader(clips.open()))
        cpu, t = cpu_seconds(), time.perf_counter()
        with heartbeats_if_watched():
            result = curate(run="scale", config=config(f"file://{tmp}/store{workers}", clips,
                                                       cluster.scheduler_address, preset))
        seconds, cpu = time.perf_counter() - t, cpu_seconds() - cpu
    ok = result["normalize"]["counts"]["ok"]
    assert ok == n, f"{ok} of {n} clips normalized: {result}"
    rate = 60 * n / seconds
    # Cores busy on average: every process of the run (this one with the flow and the Dask
    # scheduler, the workers and their ffmpegs, Prefect's API server). One worker thread is
    # one core in Dask's model, but its item's analysis runs beside its ffmpeg, and the flow
    # and the API run beside both: on 2 cores, efficiency <= 2 / (2 x cores busy at 1 worker).
    print(f"{workers} worker(s): {n} clips in {seconds:.1f} s = {rate:.2f} clips/min "
          f"({cpu / seconds:.2f} of {os.cpu_count()} cores busy)", flush=True)
    return rate


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its descendants, live or exited (an exited
    process's time is in its parent's children_* once the parent has waited for it)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--preset", default="medium", help="normalize's x264 preset (its default)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="regdpo-scale-") as tmp_:
        tmp = Path(tmp_)
        print(f"making {args.clips} {args.size}@{args.fps} clips (+2 for warm-up) ...", flush=True)
        clips = make_sources(tmp, args.clips, args.size, args.fps)
        warm = make_sources(tmp, 2, args.size, args.fps, first=args.clips)
        print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
        one = clips_per_minute(1, tmp, clips, warm, args.preset)
        two = clips_per_minute(2, tmp, clips, warm, args.preset)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        print(f"clips/min: 1 worker {one:.2f}, 2 workers {two:.2f}")
        print(f"parallel efficiency {two / (2 * one):.2f}")


if __name__ == "__main__":
    main()
