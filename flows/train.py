"""train flow: a LoRA adapter from a committed pairs dataset (Reg-DPO by default), its metrics
log, TensorBoard events and the paper's Fig. 2 panels, all under the stage's output dir.

The output dir is the stage key (config, input pairs digest, code), so a re-run with the same
inputs reuses the committed adapter, and a killed run started again resumes from its last
checkpoint (tasks.train). With `nproc > 1` the loop runs as `torchrun --nproc-per-node N -m
tasks.train` in a child process on this machine (one process per GPU, or N CPU processes on
gloo), laid out by train.parallel; its output streams into the flow's log. With `nnodes > 1`
the same flow runs once on every machine (`node_rank` 0..N-1), each launching torchrun with a
c10d rendezvous at `rdzv` (HOST:PORT, the same on every node); node 0 plots, publishes and
commits the stage, the other nodes return once their processes are done.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact,
                               create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import NO_CACHE

from flows.dag import STAGES, round_entry
from flows.stage import StageRun, artifact_key, flow_run_id, flow_run_name
from infra.config import TrainConfig
from infra.plots import fig2_panels
from infra.stage import output_digest, stage_dir
from infra.store import Store

STAGE = STAGES["train"]
REPO = Path(__file__).resolve().parents[1]
LOG_TAIL = 60  # lines of the launch's output a failure quotes


def pairs_dir(st: Store, run: str, cfg: TrainConfig, pairs: str | None,
              round: int | None = None) -> str:
    """The store key of the pairs dataset: `pairs` (URI or key), else train.data, else the
    run's committed precompute stage (a Dual-IPO round's: precompute.r<round>)."""
    if pairs:
        return st.key_of(pairs)
    if cfg.data:
        return cfg.data
    entry = ((st.read_run(run) or {}).get("stages") or {}).get(round_entry("precompute", round))
    if entry is None:
        raise LookupError(
            f"run {run!r} has no pairs to train on in {st.url}: no committed 'precompute' stage "
            "and no train.data; run the precompute stage first, or pass `pairs` (the URI of a "
            "committed pairs dataset, i.e. a precompute stage's output dir)")
    return stage_dir("precompute", entry["key"])


def _run_precompute(st: Store, run: str, round: int | None = None) -> str | None:
    entry = ((st.read_run(run) or {}).get("stages") or {}).get(round_entry("precompute", round))
    return stage_dir("precompute", entry["key"]) if entry else None


@task(name="train-loop", cache_policy=NO_CACHE)
def train_adapter(cfg: TrainConfig, store_url: str, out: str, nproc: int = 1,
                  run_name: str = "train", rendezvous: Rendezvous | None = None) -> dict:
    """Train (or resume) into `out`, in this process or `nproc` torchrun ones (on each of the
    rendezvous' nodes); counts and keys. The trainer's progress line (every train.log_every
    steps) and its warnings reach this task's log, and a progress artifact follows the steps."""
    watch = TrainingProgress(run_name, cfg.steps)
    if nproc == 1 and rendezvous is None:
        from tasks.train import train as train_loop

        with forward_logs("regdpo", get_run_logger()):
            return train_loop(cfg, Store(store_url), out, run_name, watch.update)
    return torchrun(cfg, store_url, out, nproc, run_name, watch.update, rendezvous)


class TrainingProgress:
    """A Prefect progress artifact (0–100 %) with the last progress line's numbers."""

    def __init__(self, run_name: str, steps: int):
        self.run_name = run_name
        self.id = create_progress_artifact(0.0, description=f"training {run_name}: {steps} steps")

    def update(self, p: dict) -> None:
        """`p`: the trainer's progress record (step, total, s_per_step, eta_s, loss terms)."""
        from tqdm import tqdm

        from tasks.train import BRIEF

        eta = "?" if p.get("eta_s") is None else tqdm.format_interval(p["eta_s"])
        terms = ", ".join(f"{label} {p[k]:.4g}" for k, label in BRIEF.items()
                          if isinstance(p.get(k), (int, float)))
        update_progress_artifact(self.id, 100.0 * p["step"] / max(p["total"], 1), description=(
            f"training {self.run_name}: step {p['step']}/{p['total']}, "
            f"{p.get('s_per_step', math.nan):.3g} s/step, ETA {eta} | {terms}"))


class _Forward(logging.Handler):
    def __init__(self, target: logging.LoggerAdapter | logging.Logger):
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.log(record.levelno, "%s", record.getMessage())


@contextmanager
def forward_logs(name: str, target: logging.LoggerAdapter | logging.Logger):
    """Records of logger `name` (INFO and up) re-logged on `target` (a Prefect run logger:
    the UI and the console) while the block runs."""
    source, handler = logging.getLogger(name), _Forward(target)
    level, propagate = source.level, source.propagate
    source.setLevel(logging.INFO)
    source.propagate = False  # the run logger prints it: once on the console, not twice
    source.addHandler(handler)
    try:
        yield
    finally:
        source.removeHandler(handler)
        source.setLevel(level)
        source.propagate = propagate


def check_nodes(nnodes: int, node_rank: int, rdzv: str | None) -> None:
    """A multi-node launch's own arguments, or a ValueError that names the fix."""
    if nnodes < 1:
        raise ValueError(f"nnodes must be >= 1 (machines in the training job), got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank {node_rank} is not in 0..{nnodes - 1} (nnodes {nnodes})")
    if nnodes == 1:
        if rdzv or node_rank:
            raise ValueError("rdzv/node_rank are for multi-node training: give nnodes > 1 too")
        return
    host, sep, port = (rdzv or "").rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"rdzv {rdzv!r}: give HOST:PORT of the rendezvous, the same on every "
                         "node (a host all nodes reach, e.g. node 0's address, and a free port)")


@dataclass(frozen=True)
class Rendezvous:
    """A multi-node launch: `nnodes` machines meet at `endpoint` (HOST:PORT, c10d); `id` is the
    same on every node (the run and stage key) so two jobs on one endpoint never mix."""

    nnodes: int
    endpoint: str
    id: str

    def args(self) -> list[str]:
        # c10d assigns ranks itself (torchrun ignores --node-rank with it): node_rank only
        # decides which flow run commits the stage.
        return ["--nnodes", str(self.nnodes), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", self.endpoint, "--rdzv-id", self.id]


def torchrun(cfg: TrainConfig, store_url: str, out: str, nproc: int, run_name: str = "train",
             on_progress: Callable[[dict], None] | None = None,
             rendezvous: Rendezvous | None = None) -> dict:
    """`torchrun --standalone --nproc-per-node N -m tasks.train` (an argument list, no shell;
    with a rendezvous, `--nnodes M --rdzv-backend c10d ...` instead of `--standalone`), every
    output line logged as it comes (WARNING lines as warnings); rank 0's progress lines go to
    `on_progress`, this node's result line is returned, or a RuntimeError quotes the tail of
    the output."""
    from tasks.train import PROGRESS_PREFIX, RESULT_PREFIX

    logger = get_run_logger()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    tail: deque[str] = deque(maxlen=LOG_TAIL)
    result = None
    with tempfile.TemporaryDirectory(prefix="regdpo-torchrun-") as tmp:
        config = Path(tmp) / "train.json"
        config.write_text(cfg.model_dump_json())
        launch = rendezvous.args() if rendezvous else ["--standalone"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch,
               "--nproc-per-node", str(nproc), "-m", "tasks.train", str(config),
               "--store", store_url, "--out", out, "--run-name", run_name]
        logger.info("launching %d training processes%s: %s", nproc, f" on each of "
                    f"{rendezvous.nnodes} nodes" if rendezvous else "", " ".join(cmd))
        with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.startswith(RESULT_PREFIX):
                    result = json.loads(line.removeprefix(RESULT_PREFIX))
                    continue
                if line.startswith(PROGRESS_PREFIX):
                    if on_progress:
                        on_progress(json.loads(line.removeprefix(PROGRESS_PREFIX)))
                    continue
                tail.append(line)
                logger.log(logging.WARNING if line.startswith(("WARNING ", "ERROR "))
                           else logging.INFO, "%s", line)
            code = proc.wait()
    if code != 0 or result is None:
        raise RuntimeError(
            f"training with {nproc} processes (torchrun{' ' + ' '.join(rendezvous.args()) if rendezvous else ''}) "
            f"failed with exit code {code}"
            + ("" if code else " and no result line") + f"; the last {len(tail)} lines of its "
            "output:\n" + "\n".join(tail))
    return result


@task(name="fig2-plot", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def plot_fig2(store_url: str, metrics_uri: str, png_key: str, title: str) -> str:
    """The Fig. 2 panels of the metrics log as a PNG in the store; returns its key."""
    st = Store(store_url)
    rows = [json.loads(line) for line in st.read_bytes(st.key_of(metrics_uri)).decode().splitlines()
            if line.strip()]
    with tempfile.TemporaryDirectory(prefix="regdpo-fig2-") as tmp:
        return st.put_file(fig2_panels(rows, Path(tmp) / "fig2.png", title), png_key)


def collapse_note(rows: list[dict]) -> str:
    """The collapse guard's verdict for the report: empty when it never fired."""
    fired = [r for r in rows if r.get("collapse")]
    if not fired:
        return ""
    first, last = fired[0], fired[-1]
    return (f"**⚠ Collapse signature** (paper Fig. 2: DGR → 0 while win_gap and lose_gap both "
            f"rise) on {len(fired)} step(s), first at step {first['step']} (DGR {first['dgr']:.4g}),"
            f" last at step {last['step']} (DGR {last['dgr']:.4g}, win_gap {last['win_gap']:.3g}, "
            f"lose_gap {last['lose_gap']:.3g}). Consider Reg-DPO (`train.loss.kind: regdpo`, "
            "`r: dgr`) or a smaller learning rate.\n\n")


def publish(run: str, st: Store, outputs: dict, rows: list[dict]) -> None:
    """Markdown report, a link to the plot, and the last step's metrics as a table."""
    outputs = {k: st.uri(v) if k in ("adapter", "metrics", "tensorboard", "fig2") else v
               for k, v in outputs.items()}  # full URIs for the reader; rows keep keys
    slug = artifact_key(run, "train")
    last = rows[-1] if rows else {}
    create_markdown_artifact(
        key=slug + "-report",
        markdown=(f"# train: run `{run}`\n\n{collapse_note(rows)}"
                  f"{outputs['steps']} steps, {outputs['skipped']} skipped (non-finite)\n\n"
                  f"- adapter (diffusers `load_lora_weights`): {outputs['adapter']}\n"
                  f"- metrics (JSONL, one line per step): {outputs['metrics']}\n"
                  f"- TensorBoard: `tensorboard --logdir {outputs['tensorboard']}`\n"
                  f"- Fig. 2 panels: {outputs['fig2']}\n"),
        description=f"train stage of run {run}")
    create_link_artifact(key=slug + "-fig2", link=outputs["fig2"], link_text="Fig. 2 panels (PNG)",
                         description=f"DGR, r, DGR + r, win_gap, lose_gap, s, L_dpo of run {run}")
    create_table_artifact(key=slug + "-last-step",
                          table=[{"metric": k, "value": v} for k, v in last.items()],
                          description=f"metrics of the last step of run {run}")


@flow(name="train", flow_run_name=flow_run_name("train"), log_prints=True)
def train(run: str = "toy", config: TrainConfig | dict | None = None,
          store: str = "file://./artifacts",
          overrides: list[str] | None = None, pairs: str | None = None, nproc: int = 1,
          nnodes: int = 1, node_rank: int = 0, rdzv: str | None = None,
          round: int | None = None) -> dict:
    """LoRA post-training (Reg-DPO, DPO, SFT, region, KTO) on a committed pairs dataset;
    `nproc` processes on this machine (torchrun), laid out by the config's `parallel` section.

    Args:
        run: the run's name (runs/<run>/ in the store); its other stages' outputs are read
            from the run index.
        config: this stage's section; empty = the section the run last used (recorded in
            the run index), not the real-model defaults.
        store: artifact store URL (file://... or s3://bucket/prefix; credentials come from
            the environment).
        overrides: `--set`-style changes applied on top, e.g. ["train.steps=60"];
            validated before any work.
        pairs: a pairs dataset (store key or URI) instead of the run's precompute output.
        nproc: processes (GPUs) on this machine; > 1 launches torchrun.
        nnodes: machines in the training job; > 1 runs this flow once on each of them, with
            the same run, config and store (a shared one: s3:// or a shared file path).
        node_rank: this machine's index, 0..nnodes-1; node 0 commits the stage.
        rdzv: HOST:PORT of the c10d rendezvous when nnodes > 1, the same on every node
            (e.g. node 0's address and a free port).
        round: a Dual-IPO round: trains on precompute.r<round>, records train.r<round>
            (train.init_adapter, set by flows/ipo.py, is the previous round's adapter).
    """
    from tasks.train import check_launch, config_digest

    if nproc < 1:
        raise ValueError(f"nproc must be >= 1 (processes on this machine), got {nproc}")
    check_nodes(nnodes, node_rank, rdzv)
    s = StageRun(STAGE, run, config, store, overrides, round=round)
    st = s.store
    check_launch(s.cfg, nproc * nnodes)  # a layout that cannot fit fails before any work
    data = pairs_dir(st, run, s.cfg, pairs, round)
    cfg = s.cfg = s.cfg.model_copy(update={"data": data})
    data_success = st.read_success(data)  # raises, naming the dir, if the pairs never committed
    from models.runtime import weight_identity  # the base weights, not just their name

    from infra.checkpoint import read_adapter  # the start adapter's bytes, not just its key

    weights = weight_identity(cfg.model, cfg.kind, cfg.dtype, "transformer")
    adapter = read_adapter(st, cfg.init_adapter)[1] if cfg.init_adapter else None
    settings = config_digest(cfg, data_success["manifest_sha256"], adapter)[1] | {
        "weights": weights}
    if entry := s.reuse(settings, [output_digest(data_success)]):
        row = st.read_manifest(s.out)[0].to_pylist()[0]
        return entry | {k: row[k] for k in ("adapter", "metrics", "tensorboard", "fig2")}
    rendezvous = Rendezvous(nnodes, rdzv, f"{run}-{s.key}") if nnodes > 1 else None
    outputs = train_adapter(cfg, st.url, s.out, nproc, f"{run}-{cfg.loss.kind}", rendezvous)
    if node_rank:  # node 0 plots, publishes and commits; this node's processes are done
        return {"counts": {}, "manifest": "", "node_rank": node_rank, "steps": outputs["steps"],
                **{k: outputs[k] for k in ("adapter", "metrics", "tensorboard")}}
    title = f"run {run}: {cfg.loss.kind}, β={cfg.loss.beta}, r={cfg.loss.r}"
    outputs["fig2"] = plot_fig2(st.url, outputs["metrics"], f"{s.out}/fig2.png", title)
    rows = [json.loads(line) for line in st.read_bytes(outputs["metrics"]).decode()
            .splitlines() if line.strip()]
    if note := collapse_note(rows):
        get_run_logger().warning(note.replace("**", ""))
    publish(run, st, outputs, rows)
    # The adapter is the stage's result: recorded with its size and digest, checked on reuse.
    st.record_stored(outputs["adapter"])
    row = {"id": "adapter", "status": "ok", "reason": "", **outputs,
           "artifacts": st.take_receipts(lambda k: k == outputs["adapter"]),
           "collapse_steps": sum(bool(r.get("collapse")) for r in rows), "flow_run": flow_run_id()}
    # Named "precompute" when it is the run's own pre-encoded pairs (the report checks staleness).
    source = "precompute" if data == _run_precompute(st, run, round) else "pairs_dataset"
    entry = s.commit([row], {source: data_success["manifest"]})
    return entry | {k: outputs[k] for k in ("adapter", "metrics", "tensorboard", "fig2")}
