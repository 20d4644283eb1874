"""Negatives-stage throughput over a bare diffusers pipeline call, side by side in one run.

bare  = load the Wan pipeline (load_pipeline: text encoder included) and call it once per GT
        clip with the same settings and inputs (reference frame, prompt, negative prompt,
        size, frames, steps, guidance, seed), output as numpy frames: what a user would write.
stage = the `negatives` flow on the same clips (Prefect tasks, prompt embeddings through the
        store, the generator without its text encoder, renormalization of every output to
        the GT spec through normalize_file, probes, store writes, committed rows).

Prints seconds per clip for both, the ratio (target <= 1.10), and what renormalizing alone
costs per clip. A tiny random-weight Wan build on CPU stands in for the 14B model, so the
ratio is an upper bound: the model's share only grows with the real one.

    python benchmarks/generate.py [--kind i2v] [--clips 4] [--steps 20] [--short-edge 64] \\
        [--frames 81] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from prefect import flow  # noqa: E402

from gt_clips import commit_gt_run  # noqa: E402
from infra.config import GeneratorConfig, NegativesConfig, NormalizeConfig  # noqa: E402
from infra.stage import input_manifest  # noqa: E402
from infra.store import Store  # noqa: E402
from models.tiny import build_tiny  # noqa: E402
from models.wan import WanSpec, load_pipeline  # noqa: E402
from tasks.negatives import generation_size, item_seed, renormalize  # noqa: E402


def bare(gen: GeneratorConfig, clips: list[dict], store: Store) -> tuple[float, list]:
    """Seconds for load + one pipeline call per clip, and the outputs (uint8 frames)."""
    start = time.perf_counter()
    pipe = load_pipeline(WanSpec(gen.kind, gen.model, gen.dtype))
    pipe.set_progress_bar_config(disable=True)
    outputs = []
    for clip in clips:
        width, height, frames = generation_size(clip, gen)
        kwargs = dict(prompt=clip["prompt"], negative_prompt=gen.negative_prompt, height=height,
                      width=width, num_frames=frames, num_inference_steps=gen.steps,
                      guidance_scale=gen.guidance, output_type="np",
                      generator=torch.Generator().manual_seed(item_seed(0, clip["id"], gen.name)))
        if gen.kind != "t2v":
            with store.local_copy(store.key_of(clip["ref_image"])) as ref, Image.open(ref) as im:
                kwargs["image"] = im.convert("RGB")
        outputs.append((pipe(**kwargs).frames[0] * 255).round().clip(0, 255).astype("uint8"))
    return time.perf_counter() - start, outputs


@flow(name="warm-up")
def warm_up() -> None:
    """Start Prefect's ephemeral API before timing (a deployed stage finds it running)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="i2v", choices=["t2v", "i2v", "i2v-2.2"])
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--short-edge", type=int, default=64, help="GT and generation short edge")
    ap.add_argument("--frames", type=int, default=81, help="GT and generated frames")
    ap.add_argument("--workers", type=int, default=2, help="negatives.workers: renormalizing "
                    "and uploading one clip overlap the next clip's inference")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from flows.negatives import negatives

    with tempfile.TemporaryDirectory(prefix="regdpo-bench-gen-") as tmp:
        url = f"file://{tmp}/store"
        model = build_tiny(args.kind, Path(tmp) / "tiny")
        commit_gt_run(url, "bench", n=args.clips, frames=args.frames, short_edge=args.short_edge)
        store = Store(url)
        rows, success = input_manifest(store, "bench", "normalize")
        gen = GeneratorConfig(name="tiny", model=model, kind=args.kind, dtype="float32",
                              steps=args.steps)
        warm_up()

        bare_s, outputs = bare(gen, rows, store)
        start = time.perf_counter()
        entry = negatives("bench", NegativesConfig(generators=[gen], workers=args.workers), url)
        stage_s = time.perf_counter() - start
        assert entry["counts"]["ok"] == args.clips, entry["counts"]

        gt = NormalizeConfig.model_validate(success["config"])
        start = time.perf_counter()
        for clip, frames in zip(rows, outputs):
            renormalize(frames, clip, gt, os.path.join(tmp, "renorm.mp4"))
        renorm_s = time.perf_counter() - start

    n = args.clips
    print(f"{args.kind}, {n} clips, {args.steps} steps, {args.frames} frames, short edge "
          f"{args.short_edge} px, {args.workers} workers, torch on 1 CPU thread, tiny random-weight Wan")
    print(f"  bare diffusers pipeline  {bare_s / n:7.3f} s/clip")
    print(f"  negatives stage          {stage_s / n:7.3f} s/clip")
    print(f"    of which renormalize   {renorm_s / n:7.3f} s/clip (ffmpeg to the GT spec + probe)")
    print(f"  ratio stage / bare       {stage_s / bare_s:7.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
