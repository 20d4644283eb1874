"""A committed normalize stage of small GT clips, for the negatives/pairs/precompute tests.

The clips are ffmpeg lavfi scenes brought to the GT spec by tasks.normalize.normalize_file (the
stage's own code) and committed exactly as the normalize flow commits them, minus the
filtering that the curation tests already cover.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from infra.config import NormalizeConfig
from infra.stage import stage_dir
from infra.store import Store, digest
from infra.video import probe, run_ffmpeg
from infra.gtspec import normalize_file

PROMPTS = ["a red cat walks on the street", "a blue dog runs on the beach",
           "the man walks in the sky", "a woman runs on the street", "the video of a red sky"]
# (width, height): 16:9, 9:16 and 1:1 sources, so every bucket path is exercised.
SIZES = [(128, 72), (72, 128), (96, 96), (128, 72), (128, 72)]


def make_clip(path: Path, width: int, height: int, seconds: float, seed: int) -> None:
    graph = (f"testsrc2=s={width}x{height}:r=24,hue=h={seed * 47 % 360}:s=1.5,"
             f"rotate=a='t*{0.3 + seed * 0.1}':c=black")
    run_ffmpeg(["ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i", graph,
                "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt",
                "yuv420p", f"file:{path}"])


def commit_gt_run(store_url: str, run: str, n: int = 3, frames: int = 17,
                  short_edge: int = 32) -> list[dict]:
    """Commit `n` GT clips as the run's normalize stage; returns their rows."""
    st = Store(store_url)
    cfg = NormalizeConfig(frames=frames, short_edge=short_edge, preset="ultrafast")
    key = digest(["test-normalize", run, n, frames, short_edge])
    rows = []
    with tempfile.TemporaryDirectory(prefix="regdpo-gt-") as tmp:
        for i in range(n):
            src, video, ref = (os.path.join(tmp, f"{i}{ext}") for ext in (".mp4", "gt.mp4", ".png"))
            width, height = SIZES[i % len(SIZES)]
            make_clip(Path(src), width, height, frames / cfg.fps + 0.5, i)
            spec = normalize_file(src, probe(src), cfg, video, ref)
            clip_id = digest([run, i], 16)
            out = f"items/normalize/{clip_id}"
            rows.append({"id": clip_id, "source": src, "status": "ok", "reason": "", **spec,
                         "video": st.put_file(video, f"{out}/gt.mp4"),
                         "ref_image": st.put_file(ref, f"{out}/ref.png"),
                         "prompt": PROMPTS[i % len(PROMPTS)], "prompt_source": "source"})
    record = st.commit_manifest(stage_dir("normalize", key), rows,
                                {"stage": "normalize", "config": cfg.model_dump()})
    st.update_run(run, "normalize", {"key": key, "manifest": record["manifest"],
                                     "counts": {"ok": n}, "config": cfg.model_dump()})
    return rows
