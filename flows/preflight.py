"""Checks a run passes before its first stage starts: everything that can be known from the
config alone and would otherwise surface minutes (at scale, hours) into the run. Every problem
is listed at once, each naming the config key and how to fix it.

- acquire has something to acquire;
- clips will have a prompt: sources that cannot carry captions (folders, URL lists, s3://
  prefixes, a manifest without a caption column) need `normalize.caption.model`;
- the trackers of `train.report_to` are installed (wandb and mlflow come with an extra);
- a cluster runner can run: prefect-dask is installed and the scheduler at `runner.address`
  answers (the config itself refuses a store the cluster's workers cannot reach);
- the stages that resize video have an ffmpeg with the zscale filter (libzimg);
- every model a stage will load is here (a local folder with its layout, or a hub id in the
  HF cache; online, on the hub): the negatives generators, the model that precomputes and
  trains, the evaluated base, the captioner, VBench's environment and weights, and for a
  Dual-IPO run the policy that samples and the critic (`ipo.critique.critic.model`).

Nothing here downloads or loads weights.
"""

from __future__ import annotations

import io
import os
from urllib.parse import urlsplit

import pandas as pd
import pyarrow.parquet as pq

from flows.dag import STAGES
from flows.runner import runner_problems
from infra.config import ManifestSource, RunConfig
from infra.store import open_url
from infra.video import ffmpeg_problem

# The stages whose ffmpeg resizes video (infra.video.RESIZE): the analysis frames, the GT
# clips, the generated clips brought to a GT clip's spec, and the critic's frames.
VIDEO_STAGES = {"filter", "normalize", "negatives", "evaluate", "sample", "critique", "refine"}


class PreflightError(ValueError):
    """The run cannot succeed as configured; raised before any stage runs."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("the run cannot start:\n" + "\n".join(f"  - {p}" for p in problems))


def preflight(config: RunConfig, stages: list[str]) -> None:
    """Raise PreflightError listing every problem of running `stages` with `config`."""
    problems = []
    if "acquire" in stages:
        problems += _sources(config)
    if "normalize" in stages:
        problems += _captions(config, "acquire" in stages)
    if "train" in stages:
        problems += _trackers(config)
    if any(STAGES[s].cluster for s in stages):
        problems += runner_problems(config.runner)
    if set(stages) & VIDEO_STAGES and (problem := ffmpeg_problem()):
        problems.append(problem)
    problems += _models(config, stages)
    if problems:
        raise PreflightError(problems)


def _sources(config: RunConfig) -> list[str]:
    if config.acquire.sources:
        return []
    return ["acquire.sources is empty: nothing to acquire. List folders, .txt URL lists, s3:// "
            "prefixes or CSV/Parquet manifests ({manifest: ..., video_column: ..., "
            "caption_column: ...})"]


def _captions(config: RunConfig, acquiring: bool) -> list[str]:
    if config.normalize.caption.model or not acquiring:
        return []
    bare = [_label(s) for s in config.acquire.sources if not _carries_captions(s)]
    if not bare:
        return []
    return [f"acquire source(s) {', '.join(bare)} carry no captions and normalize.caption.model "
            "is not set, so every clip from them would be rejected at normalize: set "
            "normalize.caption.model (a VLM by hub id or local folder), or give a CSV/Parquet "
            "manifest with a caption column"]


def _label(source: str | ManifestSource) -> str:
    return repr(source.manifest if isinstance(source, ManifestSource) else source)


def _carries_captions(source: str | ManifestSource) -> bool:
    """A manifest with its caption column can; folders, URLs, URL lists and prefixes cannot.
    A manifest that cannot be read here is left to acquire (it rejects it with the reason)."""
    if isinstance(source, str):
        if not source.lower().split("?")[0].endswith((".csv", ".parquet")):
            return False
        source = ManifestSource(manifest=source)
    if not source.caption_column:
        return False
    if urlsplit(source.manifest).scheme in ("http", "https"):
        return True  # its header costs a download; acquire reads it
    try:
        return source.caption_column in _columns(source.manifest)
    except (OSError, ValueError):
        return True


def _columns(manifest: str) -> list[str]:
    with open_url(manifest, "rb") as f:
        if manifest.lower().endswith(".parquet"):
            return list(pq.ParquetFile(f).schema_arrow.names)
        head = f.read(1 << 16)
    return list(pd.read_csv(io.BytesIO(head), nrows=0, dtype=str).columns)


def _trackers(config: RunConfig) -> list[str]:
    from infra.tracking import EXTRA, PACKAGES, missing_packages

    if config.train is None or not (missing := missing_packages(config.train.report_to)):
        return []
    return [f"train.report_to lists {missing} but the package(s) "
            f"{[PACKAGES[m] for m in missing]} are not installed: {EXTRA}, or drop them from "
            "train.report_to (tensorboard needs nothing extra)"]


def _models(config: RunConfig, stages: list[str]) -> list[str]:
    """Each model module is imported only when a stage needs it: a curate-only run (a CPU
    worker) would otherwise import torch, diffusers and transformers, 5 s, for nothing."""
    wanted: dict[tuple[str, str], list[str]] = {}  # (model, kind) -> the keys that name it
    if "negatives" in stages:
        for i, gen in enumerate(config.negatives.generators):
            wanted.setdefault((gen.model, gen.kind), []).append(f"negatives.generators[{i}].model")
    train = config.train
    if "precompute" in stages and train is not None:
        pre = config.precompute
        wanted.setdefault((pre.model or train.model, pre.kind or train.kind), []).append(
            "precompute.model" if pre.model else "train.model (precompute)")
    if "train" in stages and train is not None:
        wanted.setdefault((train.model, train.kind), []).append("train.model")
    ipo = config.ipo
    if "sample" in stages and ipo is not None and train is not None:
        wanted.setdefault((train.model, train.kind), []).append("train.model (ipo.sample)")
    ev = config.evaluate
    if "evaluate" in stages and ev is not None:
        model, kind = ev.model or (train.model if train else None), ev.kind or (train.kind if train else None)
        if model and kind:
            wanted.setdefault((model, kind), []).append("evaluate.model" if ev.model else
                                                        "train.model (evaluate)")
    problems = []
    if wanted:
        from models import wan
    for (model, kind), keys in wanted.items():
        if why := wan.check_available(wan.WanSpec(kind=kind, model=model)):
            problems.append(f"{', '.join(keys)}: {why}")
    if "critique" in stages and ipo is not None:
        from models import critic

        if why := critic.check_available(ipo.critique.critic.model):
            problems.append(f"ipo.critique.critic.model: {why}")
        from infra.critic_seed import SeedDataError, read_seed_pairs

        for key, path in (("ipo.srpo.seed_data", ipo.srpo.seed_data),
                          ("ipo.critique.human_labels", ipo.critique.human_labels)):
            try:
                missing = [v for p in (read_seed_pairs(path) if path else [])
                           for v in (p.video_a, p.video_b) if "://" not in v and
                           not os.path.isfile(v)]
            except (OSError, SeedDataError) as e:
                problems.append(f"{key}: {e}")
                continue
            if missing:
                problems.append(f"{key} {path!r}: {len(missing)} video(s) missing, e.g. "
                                f"{missing[0]!r}; put them where the file names them")
    caption = config.normalize.caption.model
    if "normalize" in stages and caption:
        from models import captioner

        if why := captioner.check_available(caption):
            problems.append(f"normalize.caption.model: {why}")
    if "evaluate" in stages and ev is not None and "vbench" in ev.evaluators:
        from tasks.evaluate import VBenchSetupError, check_vbench

        try:
            check_vbench(ev.vbench)
        except VBenchSetupError as e:
            problems.append(f"evaluate.vbench: {e}")
    return problems
