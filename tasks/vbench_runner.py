"""VBench inside its own environment (scripts/vbench_env.sh), called by tasks.evaluate as a
subprocess with an argument list. Standard library only at import time: the training env
imports this module for the weight table; the vbench env runs it as a script.

    python tasks/vbench_runner.py check    --cache-dir DIR --dimensions d1,d2
    python tasks/vbench_runner.py evaluate --job JOB.json --out RESULTS.json
    python tasks/vbench_runner.py random-weights --cache-dir DIR --dimensions d1,d2   # tests only

`evaluate` runs vbench 0.1.5's own `VBench.evaluate(mode="custom_input", local=True)` once per
model over that model's videos and returns vbench's aggregate and per-video values. With
`local=True` vbench reads every checkpoint from VBENCH_CACHE_DIR and would `wget`/`git clone`
what is missing; `check` runs first so that never happens (an offline machine would hang or
fail mid-run instead of saying what to fetch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# Where vbench 0.1.5 reads each dimension's files (vbench/utils.py init_submodules with
# local=True, and the modules it calls), relative to VBENCH_CACHE_DIR, and where they come from.
_CLIP = "https://openaipublic.azureedge.net/clip/models"
WEIGHTS: dict[str, list[tuple[str, str]]] = {
    "subject_consistency": [
        ("dino_model/facebookresearch_dino_main/hubconf.py",
         "git clone https://github.com/facebookresearch/dino <cache>/dino_model/facebookresearch_dino_main"),
        ("dino_model/dino_vitbase16_pretrain.pth",
         "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
    ],
    "background_consistency": [
        ("clip_model/ViT-B-32.pt",
         f"{_CLIP}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt"),
    ],
    "motion_smoothness": [
        ("amt_model/amt-s.pth", "https://huggingface.co/lalala125/AMT/resolve/main/amt-s.pth"),
    ],
    "dynamic_degree": [
        ("raft_model/models/raft-things.pth",
         "https://dl.dropboxusercontent.com/s/4j4z58wuv8o0mfz/models.zip (unzip into <cache>/raft_model/)"),
    ],
    "aesthetic_quality": [
        ("clip_model/ViT-L-14.pt",
         f"{_CLIP}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt"),
        ("aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
         "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_l_14_linear.pth"),
    ],
    "imaging_quality": [
        ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",
         "https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/musiq_spaq_ckpt-358bb6af.pth"),
    ],
    "temporal_flickering": [],  # pixel MAE between frames: no model
}
# vbench's imaging_quality reports per-video MUSIQ scores on 0-100 and divides the aggregate.
PER_VIDEO_SCALE = {"imaging_quality": 0.01}


def missing(cache_dir: str | os.PathLike, dimensions: list[str]) -> list[dict]:
    """Every file the dimensions need that is not in the cache: [{dimension, path, source}]."""
    unknown = [d for d in dimensions if d not in WEIGHTS]
    if unknown:
        raise ValueError(f"VBench dimension(s) {unknown} are not supported here; "
                         f"choose from {sorted(WEIGHTS)}")
    cache = Path(cache_dir).expanduser()
    return [{"dimension": d, "path": str(cache / rel), "source": src}
            for d in dimensions for rel, src in WEIGHTS[d] if not (cache / rel).is_file()]


def missing_message(files: list[dict], cache_dir: str) -> str:
    lines = [f"VBench weights missing from the cache dir {cache_dir} (evaluate.vbench.cache_dir); "
             "nothing was generated or evaluated. Fetch each file on a machine with network and "
             "put it at the path shown:"]
    for f in files:
        lines.append(f"  - {f['dimension']}: {f['path']}\n      from {f['source']}")
    lines.append("Or drop those dimensions from evaluate.vbench.dimensions, or use "
                 "evaluate.evaluators: [proxy] for a weight-free (proxy, not VBench) look.")
    return "\n".join(lines)


def _torch_home(cache_dir: Path, workdir: Path) -> Path:
    """A TORCH_HOME whose hub cache holds the DINO weights from the vbench cache dir.

    DINO's hubconf loads them with torch.hub.load_state_dict_from_url, which looks in
    $TORCH_HOME/hub/checkpoints and downloads when absent; vbench's own check looks in
    <cache>/dino_model. A link makes the one file serve both, offline."""
    home = workdir / "torch"
    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    src = cache_dir / "dino_model" / "dino_vitbase16_pretrain.pth"
    if src.is_file() and not (ckpt / src.name).exists():
        (ckpt / src.name).symlink_to(src)
    return home


def evaluate(job: dict) -> dict:
    """Run vbench per model; returns {model: {dim: {"score": aggregate, "videos": {name: v}}}}."""
    cache = Path(job["cache_dir"]).expanduser().resolve()
    dims = list(job["dimensions"])
    if files := missing(cache, dims):
        raise SystemExit(missing_message(files, str(cache)))
    work = Path(job["workdir"]).resolve()
    os.environ["VBENCH_CACHE_DIR"] = str(cache)  # read by vbench.utils at import
    os.environ["TORCH_HOME"] = str(_torch_home(cache, work))
    import torch
    from vbench import VBench

    device = job.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    full_info = str(Path(sys.modules["vbench"].__file__).parent / "VBench_full_info.json")
    results = {}
    for model, videos in job["groups"].items():
        folder = work / "videos" / model
        folder.mkdir(parents=True, exist_ok=True)
        for v in videos:  # names are the caller's safe item names, never data
            link = folder / f"{v['name']}.mp4"
            if not link.exists():
                link.symlink_to(Path(v["path"]).resolve())
        out = work / "results" / model
        bench = VBench(device, full_info, str(out))
        bench.evaluate(videos_path=str(folder), name=model, dimension_list=dims, local=True,
                       mode="custom_input",
                       prompt_list={f"{v['name']}.mp4": v["prompt"] for v in videos})
        raw = json.loads((out / f"{model}_eval_results.json").read_text())
        results[model] = {d: _dimension(d, raw[d]) for d in dims}
    return {"device": device, "vbench": _version(), "results": results}


def _dimension(dim: str, raw: list) -> dict:
    score, per_video = raw
    scale = PER_VIDEO_SCALE.get(dim, 1.0)
    return {"score": float(score),
            "videos": {Path(v["video_path"]).stem: float(v["video_results"]) * scale for v in per_video}}


def _version() -> str:
    from importlib.metadata import version

    return version("vbench")


def random_weights(cache_dir: str, dimensions: list[str]) -> list[str]:
    """TESTS ONLY: random-weight checkpoints of vbench's own model classes at the cache paths,
    so the subprocess path runs end to end without downloading anything. Scores made with
    them mean nothing."""
    import torch

    cache = Path(cache_dir).expanduser()
    made = []
    for dim in dimensions:
        for rel, state in _random_states(dim):
            path = cache / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(state, torch.jit.ScriptModule):
                torch.jit.save(state, str(path))
            else:
                torch.save(state, path)
            made.append(str(path))
    return made


def _random_states(dim: str):
    import torch

    torch.manual_seed(0)
    if dim == "dynamic_degree":
        from easydict import EasyDict
        from vbench.third_party.RAFT.core.raft import RAFT

        args = EasyDict(small=False, mixed_precision=False, alternate_corr=False)
        yield "raft_model/models/raft-things.pth", RAFT(args).state_dict()
    elif dim == "motion_smoothness":
        from omegaconf import OmegaConf
        from vbench.third_party.amt.utils.build_utils import build_from_cfg

        cfg = Path(sys.modules["vbench"].__file__).parent / "third_party/amt/cfgs/AMT-S.yaml"
        yield "amt_model/amt-s.pth", {"state_dict": build_from_cfg(OmegaConf.load(cfg).network).state_dict()}
    elif dim in ("background_consistency", "aesthetic_quality"):
        # A small CLIP (openai-clip's own class), saved as TorchScript like OpenAI's files:
        # clip.load reads a plain state dict only after a failed jit load has used up the file.
        from clip.model import CLIP

        embed = 768 if dim == "aesthetic_quality" else 64
        model = CLIP(embed_dim=embed, image_resolution=224, vision_layers=2, vision_width=64,
                     vision_patch_size=32, context_length=77, vocab_size=49408,
                     transformer_width=64, transformer_heads=2, transformer_layers=1)
        name = "ViT-L-14.pt" if dim == "aesthetic_quality" else "ViT-B-32.pt"
        example = (torch.zeros(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long))
        yield f"clip_model/{name}", torch.jit.trace(model.eval(), example)
        if dim == "aesthetic_quality":
            yield ("aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
                   torch.nn.Linear(768, 1).state_dict())
    elif dim == "imaging_quality":
        from pyiqa.archs.musiq_arch import MUSIQ

        yield "pyiqa_model/musiq_spaq_ckpt-358bb6af.pth", MUSIQ(pretrained=False).state_dict()
    elif dim != "temporal_flickering":
        raise SystemExit(f"no random-weight build for {dim!r} (subject_consistency needs the "
                         "facebookresearch/dino code, which is not a PyPI package)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("check", "random-weights"):
        s = sub.add_parser(name)
        s.add_argument("--cache-dir", required=True)
        s.add_argument("--dimensions", required=True, help="comma-separated")
    s = sub.add_parser("evaluate")
    s.add_argument("--job", required=True, help="JSON: cache_dir, dimensions, workdir, groups")
    s.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "check":
        print(json.dumps(missing(args.cache_dir, args.dimensions.split(","))))
    elif args.cmd == "random-weights":
        print(json.dumps(random_weights(args.cache_dir, args.dimensions.split(","))))
    else:
        result = evaluate(json.loads(Path(args.job).read_text()))
        tmp = Path(tempfile.mkstemp(dir=Path(args.out).parent, prefix=".tmp-")[1])
        tmp.write_text(json.dumps(result))
        tmp.replace(args.out)  # the caller sees the results whole or not at all
    return 0


if __name__ == "__main__":
    sys.exit(main())
