"""Evaluate (paper §4.1, A.6): test videos for the base model and each trained adapter with the
same seeds, normalized to the GT spec; scored by VBench (its own environment, a subprocess) on
the paper's six dimensions and/or by weight-free proxy metrics (always labelled "proxy").

Plain functions, no Prefect: flows/evaluate.py maps them over items and commits the stage.

- Test prompts: rows of the run's committed `pairs` manifest with split == "test" (held-out GT
  clips: prompt, ref = frame-0 PNG URI, width/height of the GT clip).
- Models: "base" (the frozen model, LoRA disabled), the run's trained adapter (labelled by its
  loss kind, e.g. "regdpo"), and any extra adapters the config names.
- One video per (prompt, model, seed), generated at the GT aspect bucket, then brought to the
  exact GT size, fps and frames by infra.gtspec.renormalize (normalize_file, the one
  normalize path), as the GT-Pair negatives are.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
from infra.config import GenerateConfig, NormalizeConfig, ProxyConfig, VBenchConfig
from infra.store import Store, digest, safe_part
from infra.gtspec import NormalizeReject, renormalize, size_in_bucket
from infra.video import decode_frames, nearest_bucket, probe
from tasks import vbench_runner

# ---------------------------------------------------------------------------------------
# Test prompts and models
# ---------------------------------------------------------------------------------------


def held_out_prompts(rows: list[dict], max_prompts: int | None = None) -> list[dict]:
    """The held-out test prompts of a pairs manifest, one per GT clip (first row wins), with the
    GT clip's spec (tasks.pairs GT_COLUMNS: bucket, width, height, fps, frames) where present."""
    seen: dict[str, dict] = {}
    for r in rows:
        if r.get("split") != "test" or r.get("status", "ok") != "ok":
            continue
        pid = str(r.get("prompt_id") or r.get("gt_id") or r["id"])
        seen.setdefault(pid, {"prompt_id": pid, "prompt": r["prompt"],
                              "ref": r.get("ref") or r.get("ref_image"),
                              "width": int(r["width"]), "height": int(r["height"]),
                              **{k: r[k] for k in ("bucket", "fps", "frames") if r.get(k)}})
    tests = list(seen.values())[:max_prompts] if max_prompts else list(seen.values())
    if not tests:
        raise LookupError("the pairs manifest has no rows with split == 'test': the evaluate "
                          "stage needs held-out GT clips (set the pairs stage's test split)")
    return tests


def adapter_label(train_config: dict) -> str:
    """The trained adapter's name in the tables: its loss kind (regdpo, dpo, sft, ...)."""
    return safe_part(str((train_config.get("loss") or {}).get("kind") or "trained"))


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------

_LOCK = threading.Lock()  # one pipeline per process; adapters switch per video


@lru_cache(maxsize=1)
def _pipeline(kind: str, model: str, dtype: str, device: str):
    from models.wan import WanSpec, load_pipeline

    return load_pipeline(WanSpec(kind, model, dtype)).to(device)


def _select_model(pipe, store: Store, label: str, adapter: str | None) -> None:
    """Base = all LoRA disabled; an adapter is loaded once under its label, then selected."""
    if adapter is None:
        if pipe.get_list_adapters():
            pipe.disable_lora()
        return
    # Named by label and URI: a re-trained adapter under the same label is a new adapter.
    name = f"{label}-{digest(adapter, 8)}"
    loaded = {a for names in pipe.get_list_adapters().values() for a in names}
    if name not in loaded:
        with _adapter_file(store, adapter) as path:
            pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path),
                                   adapter_name=name)
    pipe.enable_lora()
    pipe.set_adapters([name])


def release_pipeline() -> None:
    """Free the generation pipeline (all its weights) once the stage's videos are made."""
    from models.runtime import free_memory

    with _LOCK:
        _pipeline.cache_clear()
    free_memory()


def _adapter_file(store: Store, ref: str):
    """A local path of an adapter: a store key or store URI (the trained one), or a local file
    or file:// URL named in the config."""
    from contextlib import nullcontext

    path = ref[len("file://"):] if ref.startswith("file://") and not ref.startswith(store.url + "/") \
        else ref
    if "://" not in path and Path(path).is_file():
        return nullcontext(path)
    try:
        key = store.key_of(ref)
    except ValueError:
        key = None
    if key is None or not store.exists(key):
        raise FileNotFoundError(f"adapter {ref!r} is neither in the store {store.url} nor a local "
                                "file: give the key or URI of a pytorch_lora_weights.safetensors")
    return store.local_copy(key)


def sample_frames(pipe, kind: str, prompt: str, image, seed: int, width: int, height: int,
                  frames: int, cfg: GenerateConfig) -> np.ndarray:
    """One video from the Wan pipeline: uint8 RGB [F, H, W, 3]."""
    from models.wan import generate_video

    return generate_video(pipe, prompt, seed, (width, height, frames),
                          steps=cfg.num_inference_steps, guidance=cfg.guidance_scale,
                          negative_prompt=cfg.negative_prompt,
                          image=image if kind != "t2v" else None)


def generate_one(store: Store, payload: dict, out_dir: str) -> dict:
    """Generate, bring to the GT clip's exact spec, store one test video; returns its row."""
    from PIL import Image

    t, m = payload["test"], payload["model"]
    cfg = GenerateConfig.model_validate(payload["generate"])
    norm = NormalizeConfig.model_validate(payload["normalize"])
    spec, seed = payload["spec"], payload["seed"]
    row = {"id": payload["id"], "prompt_id": t["prompt_id"], "prompt": t["prompt"], "ref": t["ref"],
           "model": m["label"], "adapter": m["adapter"], "seed": seed}
    bucket = t.get("bucket") or nearest_bucket(t["width"] / t["height"], norm.buckets)[0]
    clip = {"width": t["width"], "height": t["height"], "bucket": bucket,
            "frames": t.get("frames") or norm.frames}
    gw, gh, _ = size_in_bucket(clip, cfg.short_edge, None)
    frames_n = cfg.num_frames or clip["frames"]
    started = time.time()
    image = None
    if spec["kind"] != "t2v":
        if not t["ref"]:
            return row | {"status": "rejected", "reason": "I2V test prompt has no ref image"}
        with store.local_copy(store.key_of(t["ref"])) as ref, Image.open(ref) as im:
            image = im.convert("RGB")
    with _LOCK:
        pipe = _pipeline(spec["kind"], spec["model"], spec["dtype"], spec["device"])
        _select_model(pipe, store, m["label"], m["adapter"])
        frames = sample_frames(pipe, spec["kind"], t["prompt"], image, seed, gw, gh, frames_n,
                               cfg)
    gt = norm.model_copy(update={"fps": t.get("fps") or norm.fps})
    with tempfile.TemporaryDirectory(prefix="regdpo-eval-") as tmp:
        video = os.path.join(tmp, "video.mp4")
        try:
            out = renormalize(frames, clip, gt, video)
        except (NormalizeReject, RuntimeError) as e:
            return row | {"status": "rejected", "reason": f"generated video misses the GT spec: {e}"}
        key = store.put_file(video, f"{out_dir}/video.mp4")
    return row | {"status": "ok", "reason": "", "video": key, "width": out["width"],
                  "height": out["height"], "fps": out["fps"], "frames": out["frames"],
                  "gen_width": gw, "gen_height": gh, "gen_frames": frames_n,
                  "gen_seconds": round(time.time() - started, 2)}


# ---------------------------------------------------------------------------------------
# Proxy metrics: weight-free stand-ins for the six dimensions (NOT VBench)
# ---------------------------------------------------------------------------------------

PROXY_PREFIX = "proxy_"


def proxy_metrics(frames: np.ndarray, fps: float, flow_fps: float = 8.0) -> dict[str, float]:
    """Per-video proxy scores in [0, 1], higher is better, one per paper dimension.

    - subject / background consistency: VBench's scheme (mean of the similarity to the previous
      and to the first frame) with SSIM on the centre half / the border instead of DINO / CLIP;
    - motion smoothness: VBench's scheme (drop odd frames, re-create them by interpolation,
      (255 − MAE) / 255) with the average of the neighbours instead of AMT;
    - dynamic degree: VBench's test (top-5% flow magnitude > 6·side/256 on round(4·n/16) of
      ~8 fps frame pairs) with Farneback flow instead of RAFT; 1 = moving;
    - aesthetic quality: mean of colourfulness (Hasler & Süsstrunk) and exposure balance;
    - imaging quality: Laplacian-variance sharpness v / (v + 100) (noise also scores high).
    """
    import cv2

    gray = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]).astype(np.float32)
    centre = np.zeros(gray.shape[1:], bool)
    h, w = centre.shape
    centre[h // 4: h - h // 4, w // 4: w - w // 4] = True
    subj, bkgd = _consistency(gray, centre)
    return {
        f"{PROXY_PREFIX}subject_consistency": subj,
        f"{PROXY_PREFIX}background_consistency": bkgd,
        f"{PROXY_PREFIX}motion_smoothness": _smoothness(frames),
        f"{PROXY_PREFIX}dynamic_degree": _dynamic(gray, fps, flow_fps),
        f"{PROXY_PREFIX}aesthetic_quality": _aesthetic(frames),
        f"{PROXY_PREFIX}imaging_quality": _sharpness(gray),
    }


def _ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM (Wang et al. 2004: Gaussian window σ = 1.5, K1 = 0.01, K2 = 0.03) per pixel."""
    import cv2

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda x: cv2.GaussianBlur(x, (11, 11), 1.5)  # noqa: E731
    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma * ma, blur(b * b) - mb * mb, blur(a * b) - ma * mb
    return ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))


def _consistency(gray: np.ndarray, centre: np.ndarray) -> tuple[float, float]:
    if len(gray) < 2:
        return 1.0, 1.0
    subj, bkgd = [], []
    for i in range(1, len(gray)):
        prev, first = _ssim_map(gray[i - 1], gray[i]), _ssim_map(gray[0], gray[i])
        subj.append((max(0.0, prev[centre].mean()) + max(0.0, first[centre].mean())) / 2)
        bkgd.append((max(0.0, prev[~centre].mean()) + max(0.0, first[~centre].mean())) / 2)
    return float(np.mean(subj)), float(np.mean(bkgd))


def _smoothness(frames: np.ndarray) -> float:
    f = frames.astype(np.float32)
    odd = np.arange(1, len(f) - 1, 2)
    if not len(odd):
        return 1.0
    interp = (f[odd - 1] + f[odd + 1]) / 2
    return float((255.0 - np.abs(np.round(interp) - f[odd]).mean()) / 255.0)


def _dynamic(gray: np.ndarray, fps: float, flow_fps: float) -> float:
    import cv2

    step = max(1, round(fps / flow_fps))
    sampled = gray[::step].astype(np.uint8)
    thres = 6.0 * min(gray.shape[1:]) / 256.0
    need = round(4 * len(sampled) / 16.0)
    moving = 0
    for a, b in zip(sampled[:-1], sampled[1:]):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        mag = np.sqrt((flow ** 2).sum(-1)).ravel()
        top = np.sort(mag)[::-1][: max(1, int(mag.size * 0.05))]
        moving += top.mean() > thres
    return float(moving >= max(need, 1))


def _aesthetic(frames: np.ndarray) -> float:
    f = frames.astype(np.float32)
    rg = f[..., 0] - f[..., 1]
    yb = 0.5 * (f[..., 0] + f[..., 1]) - f[..., 2]
    axes = (1, 2)
    colourful = np.sqrt(rg.std(axes) ** 2 + yb.std(axes) ** 2) + 0.3 * np.sqrt(rg.mean(axes) ** 2 + yb.mean(axes) ** 2)
    luma = f.mean(-1).mean(axes) / 255.0
    exposure = 1.0 - np.abs(luma - 0.5) * 2
    return float(np.mean(0.5 * np.clip(colourful / 100.0, 0, 1) + 0.5 * exposure))


def _sharpness(gray: np.ndarray) -> float:
    import cv2

    v = np.mean([cv2.Laplacian(g, cv2.CV_32F).var() for g in gray])
    return float(v / (v + 100.0))


def proxy_one(store: Store, payload: dict) -> dict:
    """Proxy metrics of one stored video (decoded once at the analysis size)."""
    cfg = ProxyConfig.model_validate(payload["proxy"])
    with store.local_copy(store.key_of(payload["video"])) as path:
        info = probe(path)
        frames = decode_frames(path, info, cfg.short_edge)
    return {"id": payload["id"], "status": "ok", "reason": "",
            **proxy_metrics(frames, info.fps, cfg.flow_fps)}


# ---------------------------------------------------------------------------------------
# VBench: its own environment, called as a subprocess
# ---------------------------------------------------------------------------------------


class VBenchSetupError(RuntimeError):
    """The vbench environment or its weights are not there; raised before any work."""


def vbench_python(cfg: VBenchConfig) -> str:
    return str(Path(cfg.python).expanduser().absolute())


def check_vbench(cfg: VBenchConfig) -> None:
    """Fail before any work: the env exists and every weight file of every dimension is there."""
    python = vbench_python(cfg)
    if not os.access(python, os.X_OK):
        raise VBenchSetupError(
            f"the vbench environment's python {python} (evaluate.vbench.python) does not exist: "
            "create it with `make vbench-env` (scripts/vbench_env.sh), or set "
            "evaluate.evaluators: [proxy] for weight-free proxy metrics (not VBench)")
    cache = str(Path(cfg.cache_dir).expanduser())
    if files := vbench_runner.missing(cache, cfg.dimensions):
        raise VBenchSetupError(vbench_runner.missing_message(files, cache))


def run_vbench(groups: dict[str, list[dict]], cfg: VBenchConfig, workdir: str) -> dict:
    """VBench scores per model: {model: {dim: {"score", "videos": {name: value}}}}.

    `groups`: model -> [{name, path, prompt}] with local video paths."""
    job = {"cache_dir": str(Path(cfg.cache_dir).expanduser()), "dimensions": cfg.dimensions,
           "workdir": workdir, "device": cfg.device, "groups": groups}
    job_path, out_path = Path(workdir) / "job.json", Path(workdir) / "results.json"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": "", "PYTHONNOUSERSITE": "1"}
    cmd = [vbench_python(cfg), str(Path(vbench_runner.__file__).resolve()), "evaluate",
           "--job", str(job_path), "--out", str(out_path)]
    try:
        done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=cfg.timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"vbench ran longer than evaluate.vbench.timeout_s={cfg.timeout_s:g}") from None
    if done.returncode != 0 or not out_path.exists():
        tail = "\n".join((done.stderr or done.stdout or "").strip().splitlines()[-15:])
        raise RuntimeError(f"vbench failed (exit {done.returncode}):\n{tail}")
    return json.loads(out_path.read_text())


def mean_by_model(rows: list[dict], columns: list[str], models: list[str]) -> dict[str, dict[str, float]]:
    """Per model, the mean of each metric column over its ok videos (the table's values)."""
    out: dict[str, dict[str, float]] = {}
    for m in models:
        mine = [r for r in rows if r.get("model") == m and r.get("status") == "ok"]
        out[m] = {}
        for c in columns:
            vals = [r[c] for r in mine if isinstance(r.get(c), (int, float)) and math.isfinite(r[c])]
            if vals:
                out[m][c] = float(np.mean(vals))
    return out


def generate_item(store: Store, out_dir: str, payload: dict) -> dict:
    """The evaluate stage's item: one test video (prompt, model, seed) at the GT spec."""
    return generate_one(store, payload, out_dir)


def proxy_item(store: Store, out_dir: str, payload: dict) -> dict:
    """Proxy metrics of one test video (an item of its own: new proxy settings rescore only)."""
    return proxy_one(store, payload)
