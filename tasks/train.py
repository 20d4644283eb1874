"""The train stage: Reg-DPO (and DPO/SFT/region/KTO) LoRA post-training of a Wan transformer on
pre-encoded latent pairs, in one process or many (torchrun; infra.distributed). Read top to
bottom: config, pair data, one step, loop.

The step (docs/architecture.md, "Training: losses (exact)"; equation numbers from Reg-DPO, paper 001):
  per pair ONE timestep t and ONE noise ε, shared by win and lose; flow matching
      x_t = (1 − σ_t) z + σ_t ε,   y = ε − z
  e = mean (y − v(x_t, t, c))² per sample, from the policy (base + LoRA, with grad) and the
  reference (the same module with the adapter disabled, no grad); the loss is
  losses.preference_loss on the four errors (Eq. 2 for DPO, Eq. 6 for Reg-DPO, whose gradient
  is Eq. 5).
Dual-IPO (docs/architecture.md): KTO on pointwise rows (one video, its own (t, ε), its label;
losses.pointwise_loss), and NLL terms λ·mean e_θ on real clips drawn with each micro-batch
and/or on the winners.

Timesteps: an index is drawn uniformly from the training scheduler's 1000 timesteps
(diffusers' FlowMatchEulerDiscreteScheduler with Wan's shift, models.wan.training_scheduler) and
σ_t is the scheduler's sigma at that index — diffusers' flow-matching training scripts with
weighting_scheme="none". The shift therefore already skews the draws toward high noise, as in
Wan's own training; no extra density (logit-normal) is applied on top.

Randomness: a pair's (t, ε) come from a generator seeded by (seed, epoch, position in the epoch),
not from a global stream. The numbers of a pair thus do not depend on how pairs are grouped into
micro-batches or steps (accumulation 2×1 equals a batch of 2) nor on a restart; the global RNGs
(LoRA dropout) are still checkpointed for an exact resume. The same holds across processes:
every rank draws the micro-batch's slots from the same cursor and loads its dp slice of them.

Processes: `torchrun --nproc-per-node N -m tasks.train ...` runs the same loop on N ranks laid out
by train.parallel (FSDP, context, pair and data parallelism); every rank computes, rank 0 alone
writes checkpoints, logs and the adapter (Layout.main_only), and every rank reads a resume.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import WanTransformer3DModel
from torch import Tensor

from infra import sharded_load
from infra.activations import apply_block_plan, measure_profile, optimizer_bytes
from infra.checkpoint import (ADAPTER_FILE, Checkpointer, load_adapter, read_adapter,
                              save_final_adapter)
from infra.config import OptimizerConfig, TrainConfig, yaml_load
from infra.config.train import RUN_CONTROL
from infra.distributed import Layout, check_grid, shutdown
from infra.memory_plan import GiB, BudgetTooSmall, MemoryPlan, plan_memory
from infra.pairs_format import PairsDataset
from infra.progress import Progress
from infra.parallel import autocast, pair_forward, parallelize
from infra.store import Store, digest, join_key
from infra.tracking import make_trackers, scalars
from losses import flow_error, masked_error, pointwise_loss, preference_loss
from models.wan import (
    REFERENCE_ADAPTER,
    WanSpec,
    transformer_config,
    add_lora,
    add_reference_adapter,
    load_transformer,
    lora_parameters,
    reference_mode,
    training_scheduler,
)

logger = logging.getLogger("regdpo.train")
Metrics = dict[str, Any]

def check_launch(cfg: TrainConfig, nproc: int) -> int:
    """The data-parallel degree of `nproc` processes under train.parallel, or a ValueError that
    names the fix; checked before a launch and again by each rank."""
    p = cfg.parallel
    dp = check_grid(nproc, p.pair_degree, p.context_parallel.degree)
    if cfg.batch_size % dp:
        raise ValueError(f"train.batch_size {cfg.batch_size} does not split over the {dp} "
                         f"data-parallel groups of {nproc} processes: make it a multiple of "
                         f"{dp}, or use fewer processes / more context_parallel ranks")
    return dp


def config_digest(cfg: TrainConfig, data_sha256: str,
                  adapter_sha256: str | None = None) -> tuple[str, dict[str, Any]]:
    """(digest, the config it covers): every field that shapes the loss curve, plus the data
    and, when the policy starts from train.init_adapter, that adapter's sha256 (its identity:
    the weights, not the key they sit at)."""
    config = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RUN_CONTROL}
    config["data_sha256"] = data_sha256
    if adapter_sha256 is not None:
        config["init_adapter_sha256"] = adapter_sha256
    return digest(config), config


# ---------------------------------------------------------------------------------------
# Pair data: the regdpo.pairs.v1 files of infra/pairs_format.py
# ---------------------------------------------------------------------------------------


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@dataclass
class DataCursor:
    """Where the run is in the data: the epoch's shuffle is a function of (seed, epoch)."""

    seed: int
    epoch: int = 0
    position: int = 0

    def take(self, n: int, size: int) -> list[tuple[int, int]]:
        """The next n (epoch, position) slots. An epoch's remainder smaller than n is dropped,
        so every micro-batch has n pairs."""
        if self.position + n > size:
            self.epoch, self.position = self.epoch + 1, 0
        slots = [(self.epoch, self.position + i) for i in range(n)]
        self.position += n
        return slots


@dataclass
class VideoBatch:
    """B single videos stacked (Dual-IPO's pointwise rows, or the real clips of the NLL
    term), each with its own (t, ε)."""

    latent: Tensor  # [B, C, F, H, W]
    prompt_embeds: Tensor  # [B, 512, D]
    noise: Tensor  # ε, [B, C, F, H, W]
    sigma: Tensor  # σ_t, [B]
    timestep: Tensor  # t, [B]
    desirable: Tensor | None = None  # [B] bool, pointwise rows only
    cond: Tensor | None = None
    image_embeds: Tensor | None = None
    mask: Tensor | None = None  # never set: the region loss is a pair loss
    real: "VideoBatch | None" = None  # the real clips drawn with this micro-batch (NLL)

    @property
    def size(self) -> int:
        return self.latent.shape[0]


@dataclass
class PairBatch:
    """B pairs stacked, with each pair's shared (t, ε)."""

    win: Tensor  # [B, C, F, H, W]
    lose: Tensor
    prompt_embeds: Tensor  # [B, 512, D]
    noise: Tensor  # ε, [B, C, F, H, W]
    sigma: Tensor  # σ_t, [B]
    timestep: Tensor  # t, [B]
    cond: Tensor | None = None
    image_embeds: Tensor | None = None
    mask: Tensor | None = None
    real: VideoBatch | None = None  # the real clips drawn with this micro-batch (NLL)

    @property
    def size(self) -> int:
        return self.win.shape[0]


# ---------------------------------------------------------------------------------------
# Logging: JSONL + TensorBoard, and the collapse guard
# ---------------------------------------------------------------------------------------


@dataclass
class CollapseGuard:
    """The paper's failure signature (§3.2, Fig. 2): DGR → 0 while win_gap and lose_gap both
    rise. Fires when the mean DGR over the window's late half is below `fraction` of the first
    DGR seen and both gaps' late-half means are above 0: the policy fits the winners and the
    losers worse than the reference does. The gaps start at 0 (the LoRA starts as the identity),
    so above 0 is risen from their start; comparing the window's late half with its early half
    instead is a coin flip once a gap plateaus (per-step gaps are noisy, one t per pair) and
    fired on Reg-DPO runs whose win_gap stays below 0 (experiments/dpo_vs_regdpo.py)."""

    window: int
    fraction: float
    dgr_start: float | None = None
    history: list[list[float]] = field(default_factory=list)  # [dgr, win_gap, lose_gap]

    def update(self, metrics: Metrics) -> bool:
        values = [metrics.get(k) for k in ("dgr", "win_gap", "lose_gap")]
        if any(v is None or not math.isfinite(v) for v in values):
            return False  # KTO has no DGR; a skipped step says nothing
        self.dgr_start = values[0] if self.dgr_start is None else self.dgr_start
        self.history = (self.history + [values])[-self.window:]
        if len(self.history) < self.window:
            return False
        half = self.window // 2
        late = [sum(col) / half for col in zip(*self.history[-half:])]
        dgr_fell = late[0] < self.fraction * self.dgr_start
        return dgr_fell and late[1] > 0 and late[2] > 0


METRICS_FILE, TENSORBOARD_DIR = "metrics.jsonl", "tensorboard"
PROGRESS_PREFIX = "regdpo-train-progress: "  # the line flows.train reads back from torchrun


def _jsonable(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricsLog:
    """Every step: one JSON line in a local `metrics.jsonl` and the `train.report_to` trackers
    (infra/tracking.py) in a local dir. The JSONL and the trackers' files are uploaded to
    `<out>/` (each file replaced whole, so readers never see a torn line) at most every `sync_s`
    seconds, at checkpoints and at the end — re-uploading growing files every step would be
    quadratic I/O in the training loop."""

    def __init__(self, store: Store, out: str, cfg: TrainConfig, run_name: str):
        self.store, self.out, self.key = store, out, f"{out}/{METRICS_FILE}"
        self.sync_s, self.synced_at = cfg.log_sync_s, 0.0
        self.temporary = cfg.local_dir is None
        self.local = Path(cfg.local_dir or tempfile.mkdtemp(prefix="regdpo-train-"))
        self.path, self.last = self.local / METRICS_FILE, {}
        hparams = cfg.model_dump(mode="json", exclude=set(RUN_CONTROL) | {"data"})
        self.trackers = make_trackers(cfg.report_to, self.local, run_name, hparams)

    def start(self, step: int) -> None:
        """Continue the log after `step`: lines a killed run wrote past its checkpoint go."""
        lines = []
        if step and self.store.exists(self.key):
            lines = [ln for ln in self.store.read_bytes(self.key).decode().splitlines()
                     if ln.strip() and json.loads(ln)["step"] <= step]
        self.local.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(ln + "\n" for ln in lines))
        for t in self.trackers:
            t.start(step)

    def write(self, step: int, metrics: Metrics) -> None:
        line = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        self.last = scalars(line)
        for t in self.trackers:
            t.log(step, self.last)
        if time.monotonic() - self.synced_at >= self.sync_s:
            self.sync()

    def sync(self) -> str:
        """The JSONL and every tracker's files into the store, as they are now."""
        self.store.put_file(self.path, self.key)
        for t in self.trackers:
            t.flush()
            root = self.local / t.dir
            for path in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []:
                self.store.put_file(path, f"{self.out}/{t.dir}/{path.relative_to(root).as_posix()}")
        self.synced_at = time.monotonic()
        return f"{self.out}/{TENSORBOARD_DIR}"

    def close(self) -> None:
        for t in self.trackers:
            t.close(self.last)
        self.synced_at = 0.0
        self.sync()
        if self.temporary:  # everything is in the store now
            shutil.rmtree(self.local, ignore_errors=True)


# The metrics of the progress line, in its order (the ones a loss does not log are left out).
BRIEF = {"loss": "loss", "dpo_loss": "L_dpo", "sft_term": "L_sft", "kto_loss": "L_kto",
         "nll_term": "L_nll", "dgr": "DGR", "win_gap": "win_gap", "lose_gap": "lose_gap"}


def _brief(metrics: Metrics) -> str:
    return ", ".join(f"{label} {metrics[k]:.4g}" for k, label in BRIEF.items()
                     if isinstance(metrics.get(k), (int, float)))


def _peak_mem_mib(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak of this step, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------


def lr_factor(step: int, cfg: OptimizerConfig, total_steps: int) -> float:
    """LambdaLR factor of the `step`-th update: linear warmup, then constant or cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class Trainer:
    """Reg-DPO on a LoRA policy whose reference is the same module with the adapter disabled
    (Dual-IPO: DPO or KTO, plus NLL terms; the policy may start from a previous round's
    adapter, and the reference may be that policy, a second frozen adapter).

    Subclasses change the objective by overriding `forward_backward_step`, never the loop.
    Everything that can fail on the inputs (config, resume digest, pair files) fails in
    __init__, before any step.
    """

    def __init__(self, cfg: TrainConfig, store: Store, out: str, layout: Layout | None = None,
                 run_name: str = "train",
                 on_progress: Callable[[dict[str, Any]], None] | None = None):
        if not cfg.data:
            raise ValueError("train.data is not set: give the store key of the pairs dataset "
                             "(the precompute stage's output dir)")
        self.cfg, self.store, self.out = cfg, store, join_key(out)
        p = cfg.parallel
        self.layout = layout or Layout.from_env(p.pair_degree, p.context_parallel.degree,
                                                cfg.device)
        self.device = self.layout.device
        check_launch(cfg, self.layout.world)
        self.dataset, self.real = self._open_data()
        self.init_adapter = read_adapter(store, cfg.init_adapter) if cfg.init_adapter else None
        self.checkpointer = Checkpointer(store, f"{self.out}/checkpoints", *config_digest(
            cfg, self.dataset.sha256, self.init_adapter and self.init_adapter[1]))
        if cfg.checkpoint.resume:
            self.checkpointer.latest_step()  # a checkpoint of another config fails here
        spec = WanSpec(cfg.kind, cfg.model, cfg.dtype)
        self.dataset.validate(transformer_config(spec), need_mask=cfg.loss.kind == "region",
                              batch_size=cfg.batch_size)
        if self.real is not None:
            self.real.validate(transformer_config(spec), need_mask=False,
                               batch_size=cfg.batch_size)
        seed_everything(cfg.seed)
        self.transformer = self._build_policy(spec)
        scheduler = training_scheduler(spec, cfg.shift)
        self.sigmas, self.timesteps = scheduler.sigmas.float(), scheduler.timesteps.float()
        self.memory_plan = self._plan_memory() if cfg.parallel.memory_budget_gb else None
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(lora_parameters(self.transformer), lr=o.lr,
                                           betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(lr_factor, cfg=o, total_steps=cfg.steps))
        self.cursor = DataCursor(seed=cfg.seed)
        self.real_cursor = DataCursor(seed=cfg.seed)
        self._orders: dict[str, tuple[int, list[int]]] = {}  # tag -> (epoch, its permutation)
        self.guard = CollapseGuard(cfg.collapse_window, cfg.collapse_fraction)
        # Only the main rank writes; elsewhere these sinks swallow every call.
        self.log = self.layout.main_only(lambda: MetricsLog(store, self.out, cfg, run_name))
        self.on_progress = on_progress if self.layout.is_main else None
        self.saver = self.layout.main_only(lambda: self.checkpointer)
        self.step, self.skipped = 0, 0

    def _build_policy(self, spec: WanSpec) -> WanTransformer3DModel:
        if sharded_load.applies(self.cfg.parallel, self.layout):  # FSDP: each rank its shard
            return sharded_load.load_policy(spec, self.cfg.lora, self.cfg.parallel, self.layout,
                                            adapt=self._start_from_adapter)
        transformer = load_transformer(spec)
        lora = self.cfg.lora
        add_lora(transformer, rank=lora.rank, alpha=lora.alpha, targets=lora.targets,
                 dropout=lora.dropout)
        self._start_from_adapter(transformer)
        return parallelize(transformer.to(self.device), self.cfg.parallel, self.layout)

    def _open_data(self) -> tuple[PairsDataset, PairsDataset | None]:
        """(the rows the preference term trains on, the real clips of the NLL term or None),
        after checking train.data has every row kind the config needs (train.loss)."""
        found = PairsDataset.open_kinds(self.store, self.cfg.data)
        self.cfg.check_rows({k: len(d) for k, d in found.items()}, self.store.uri(self.cfg.data))
        kinds = self.cfg.row_kinds()
        main = found["pair" if "pair" in kinds else "pointwise"]
        return main, found["real"] if "real" in kinds else None

    def _start_from_adapter(self, transformer: WanTransformer3DModel) -> None:
        """Dual-IPO round r: the policy starts from train.init_adapter (round r−1's adapter);
        with train.reference: previous, the same weights also go into a second, frozen adapter
        that reference_mode activates. Without init_adapter the reference is the base."""
        if self.init_adapter is None:
            return
        data, sha = self.init_adapter
        source = f"train.init_adapter {self.cfg.init_adapter} (sha256 {sha[:12]})"
        load_adapter(transformer, data, source)
        if self.cfg.reference == "previous":
            add_reference_adapter(transformer)
            load_adapter(transformer, data, source, adapter=REFERENCE_ADAPTER)

    def _plan_memory(self) -> MemoryPlan:
        """train.parallel.memory_budget_gb: probe steps at 1 and 2 latent frames of the first
        pair, then the per-block plan for the data's frames with the least recompute
        (infra/memory_plan.py), applied to the policy. The probes leave no trace: gradients
        dropped, RNG restored, the data cursor untouched."""
        p, lora = self.cfg.parallel, lora_parameters(self.transformer)
        if self.dataset.kind != "pair":
            raise ValueError(f"train.parallel.memory_budget_gb plans from pairs, and this run "
                             f"trains on {self.dataset.kind} rows (train.loss.kto_on: pointwise): "
                             "set gradient_checkpointing / checkpoint_every / offload_activations "
                             "by hand, or unset memory_budget_gb")
        pair = self.dataset.load(0)
        frames = pair["win"].shape[1]
        share = self.cfg.batch_size // self.layout.dp

        def step(f: int) -> None:
            g = torch.Generator().manual_seed(0)
            crop = {k: v[:, :f] if v.dim() == 4 else v for k, v in pair.items()}  # [C, F, H, W]
            batch = PairBatch(
                **{k: v.expand(share, *v.shape).to(self.device) for k, v in crop.items()},
                noise=torch.randn(share, *crop["win"].shape, generator=g).to(self.device),
                sigma=self.sigmas[:1].expand(share).to(self.device),
                timestep=self.timesteps[:1].expand(share).to(self.device))
            self.forward_backward_step(batch, 1.0)
            for param in lora:
                param.grad = None

        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            profile = measure_profile(self.transformer, self.device, step,
                                      frames=(1, 2) if frames > 1 else (1,), extra=optimizer_bytes(lora),
                                      agree=self.layout.max_values)
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 / ranks_here
        try:
            plan = plan_memory(profile, p.memory_budget_gb * GiB, frames,
                               offload=p.offload_activations, host_bytes=host)
        except BudgetTooSmall as e:
            raise ValueError(f"train.parallel.memory_budget_gb = {p.memory_budget_gb}: {e}. "
                             "Raise the budget, train on fewer frames, or add ranks "
                             "(fsdp, context_parallel)") from None
        apply_block_plan(self.transformer, plan.recompute, plan.offload)
        logger.info("memory plan: %s", plan.describe())
        return plan

    # -- data ----------------------------------------------------------------------------

    def _order(self, epoch: int, real: bool = False) -> list[int]:
        """The epoch's permutation of the pairs (or pointwise rows; `real`: of the real clips),
        a function of (shuffle seed, epoch) only."""
        tag, n = ("real-order", len(self.real)) if real else ("order", len(self.dataset))
        if self._orders.get(tag, (-1,))[0] != epoch:
            g = torch.Generator().manual_seed(_seed(self.cursor.seed, tag, epoch))
            order = (torch.randperm(n, generator=g).tolist() if self.cfg.shuffle
                     else list(range(n)))
            self._orders[tag] = (epoch, order)
        return self._orders[tag][1]

    def next_batch(self) -> PairBatch | VideoBatch:
        """This rank's share of the next micro-batch (its dp slice), each row with its own
        (t, ε) drawn from its own seed: pairs (or pointwise rows), and as many real clips
        from their own cursor when the NLL term is on real videos."""
        batch = self._draw(self.dataset, self.cursor, "noise", self._order)
        if self.real is not None:
            batch.real = self._draw(self.real, self.real_cursor, "real-noise",
                                    partial(self._order, real=True))
        return batch

    def _draw(self, dataset: PairsDataset, cursor: DataCursor, tag: str,
              order: Callable[[int], list[int]]) -> PairBatch | VideoBatch:
        slots = cursor.take(self.cfg.batch_size, len(dataset))
        share = len(slots) // self.layout.dp
        slots = slots[self.layout.local("dp") * share:][:share]
        rows = [order(epoch)[pos] for epoch, pos in slots]
        items = [dataset.load(i) for i in rows]
        sigma, timestep, noise = [], [], []
        for (epoch, pos), item in zip(slots, items):
            g = torch.Generator().manual_seed(_seed(cursor.seed, tag, epoch, pos))
            i = int(torch.randint(len(self.timesteps), (1,), generator=g))
            sigma.append(self.sigmas[i])
            timestep.append(self.timesteps[i])
            noise.append(torch.randn(item[dataset.latents[0]].shape, generator=g))
        stacked = {k: torch.stack([p[k] for p in items]).to(self.device) for k in items[0]}
        drawn = dict(noise=torch.stack(noise).to(self.device),
                     sigma=torch.stack(sigma).to(self.device),
                     timestep=torch.stack(timestep).to(self.device))
        if dataset.kind == "pair":
            return PairBatch(**stacked, **drawn)
        desirable = (torch.tensor([dataset.desirable[i] for i in rows], device=self.device)
                     if dataset.kind == "pointwise" else None)
        return VideoBatch(**stacked, **drawn, desirable=desirable)

    # -- one step ------------------------------------------------------------------------

    def errors(self, batch: PairBatch, x_t: Tensor, y: Tensor) -> Tensor:
        """Per-sample flow-matching errors of the transformer (policy or reference, whichever
        is active) on k·B noisy latents, the pairs' conditioning tiled k times."""
        k = x_t.shape[0] // batch.size

        def tile(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat(k, *[1] * (t.dim() - 1))

        hidden = x_t if batch.cond is None else torch.cat([x_t, tile(batch.cond)], dim=1)
        dtype = self.transformer.dtype
        image = tile(batch.image_embeds)
        with autocast(self.cfg.parallel, self.device):
            pred = self.transformer(
                hidden_states=hidden.to(dtype), timestep=tile(batch.timestep),
                encoder_hidden_states=tile(batch.prompt_embeds).to(dtype),
                encoder_hidden_states_image=None if image is None else image.to(dtype),
                return_dict=False)[0]
        if self.cfg.loss.kind == "region" and batch.mask is not None:  # LocalDPO: errors
            # over the corrupted region only (a real clip of the NLL term has no region)
            return masked_error(pred, y, tile(batch.mask))
        return flow_error(pred, y)

    def forward_backward_step(self, batch: PairBatch | VideoBatch, scale: float) -> Metrics:
        """One micro-batch: noise both sides with the pair's shared (t, ε), the reference and
        policy errors, the preference loss (Eq. 2 / Eq. 6), backward of loss·scale. Pointwise
        rows: KTO on each video's errors; real clips (NLL term): the policy's errors only."""
        if isinstance(batch, VideoBatch):
            return self.pointwise_step(batch, scale)
        sigma = batch.sigma.view(-1, 1, 1, 1, 1)
        win = ((1 - sigma) * batch.win + sigma * batch.noise, batch.noise - batch.win)
        lose = ((1 - sigma) * batch.lose + sigma * batch.noise, batch.noise - batch.lose)
        errors, parallel = partial(self.errors, batch), (self.cfg.parallel, self.layout)
        with torch.no_grad(), reference_mode(self.transformer):
            ref_w, ref_l = pair_forward(errors, win, lose, *parallel)
        err_w, err_l = pair_forward(errors, win, lose, *parallel)
        loss, metrics = preference_loss(self.cfg.loss, err_w, err_l, ref_w, ref_l,
                                        err_real=self.real_errors(batch.real))
        (loss * scale).backward()
        return metrics

    def pointwise_step(self, batch: VideoBatch, scale: float) -> Metrics:
        """Diffusion-KTO on B labelled videos: reference and policy errors at each video's own
        (t, ε), losses.pointwise_loss (plus the NLL terms), backward of loss·scale."""
        noisy = self.noisy(batch)
        with torch.no_grad(), reference_mode(self.transformer):
            ref = self.errors(batch, *noisy)
        err = self.errors(batch, *noisy)
        loss, metrics = pointwise_loss(self.cfg.loss, err, ref, batch.desirable,
                                       err_real=self.real_errors(batch.real))
        (loss * scale).backward()
        return metrics

    def real_errors(self, real: VideoBatch | None) -> Tensor | None:
        """The policy's errors on the real clips of the NLL term (no reference: λ·mean e_θ)."""
        return None if real is None else self.errors(real, *self.noisy(real))

    @staticmethod
    def noisy(batch: VideoBatch) -> tuple[Tensor, Tensor]:
        """(x_t, y) of single videos: x_t = (1 − σ_t) z + σ_t ε, y = ε − z."""
        sigma = batch.sigma.view(-1, 1, 1, 1, 1)
        return (1 - sigma) * batch.latent + sigma * batch.noise, batch.noise - batch.latent

    def train_step(self) -> Metrics:
        """grad_accum micro-batches, clip, then an AdamW update unless loss or grads are
        non-finite (then the update is skipped and counted; the LR schedule still advances)."""
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        n = self.cfg.grad_accum
        # The loss is a mean over pairs, so 1/n per micro-batch makes n×B equal one batch of n·B.
        parts = [self.forward_backward_step(self.next_batch(), 1 / n) for _ in range(n)]
        # A metric a micro-batch lacks (KTO's reward_desirable without a desirable sample)
        # is the mean over those that have it.
        keys = dict.fromkeys(k for p in parts for k in p)
        metrics = self.layout.mean_metrics(
            {k: sum(p[k] for p in parts if k in p) / sum(k in p for p in parts) for k in keys})
        self.layout.reduce_gradients(lora_parameters(self.transformer))
        max_norm = self.cfg.optimizer.max_grad_norm or math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(lora_parameters(self.transformer),
                                                         max_norm))
        lr = self.lr_scheduler.get_last_lr()[0]
        finite = math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        else:
            self.skipped += 1
            logger.warning("step %d: non-finite loss %s or grad norm %s; update skipped "
                           "(%d so far)", self.step + 1, metrics["loss"], grad_norm, self.skipped)
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        return metrics | {"grad_norm": grad_norm, "lr": lr, "skipped": not finite,
                          "skipped_total": self.skipped, "step_time": time.perf_counter() - start,
                          "peak_mem": _peak_mem_mib(self.device)}

    # -- the loop ------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Resume, then loop { train_step; log; checkpoint } to cfg.steps; save the adapter."""
        self.resume()
        every, cfg = self.cfg.checkpoint.every, self.cfg
        progress = self.layout.main_only(lambda: Progress(
            cfg.steps, "train", None, unit="step", initial=self.step))
        while self.step < cfg.steps:
            metrics = self.train_step()
            self.step += 1
            metrics["collapse"] = self.guard.update(metrics)
            if metrics["collapse"]:
                logger.warning("step %d: collapse signature — DGR %.4g is below %g of its start "
                               "%.4g while win_gap and lose_gap both rose (paper Fig. 2)",
                               self.step, metrics["dgr"], cfg.collapse_fraction,
                               self.guard.dgr_start)
            self.log.write(self.step, {"epoch": self.cursor.epoch, **metrics})
            progress.update(1, _brief(metrics))
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.report_progress(progress, metrics)
            if self.step % every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        progress.close()
        self.layout.main_only(lambda: save_final_adapter(
            self.store, self.transformer, f"{self.out}/adapter"))
        # Every rank's answer (rank 0 wrote it): the launch reports from each node's first process.
        adapter = f"{self.out}/adapter/{ADAPTER_FILE}"
        self.log.close()
        self.layout.barrier()  # all written before any rank returns (and, say, resumes)
        return {"steps": self.step, "skipped": self.skipped, "adapter": adapter,
                "metrics": f"{self.out}/{METRICS_FILE}",
                "tensorboard": f"{self.out}/{TENSORBOARD_DIR}"}

    def report_progress(self, progress: Progress, metrics: Metrics) -> None:
        """The every-`log_every`-steps line (main rank): step/total, the loss terms, DGR, the
        gaps, s/step and ETA — to the log (Prefect's, through flows.train) and `on_progress`."""
        if not self.layout.is_main:
            return
        s_per_step = 1 / progress.rate if progress.rate > 0 else math.nan
        logger.info("step %d/%d: %s | %.3g s/step, ETA %s", self.step, self.cfg.steps,
                    _brief(metrics), s_per_step, progress.eta_text)
        if self.on_progress:
            self.on_progress({"step": self.step, "total": self.cfg.steps,
                              "s_per_step": s_per_step, "eta_s": progress.eta_s,
                              **{k: _jsonable(metrics.get(k)) for k in BRIEF if k in metrics}})

    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "skipped": self.skipped, "cursor": asdict(self.cursor),
                "real_cursor": asdict(self.real_cursor), "guard": asdict(self.guard)}

    def save_checkpoint(self) -> str:
        self.log.sync()  # the JSONL and the trackers: in the store up to this step
        return self.saver.save(self.step, self.transformer, self.optimizer,
                               self.lr_scheduler, self.trainer_state())

    def resume(self) -> None:
        """Continue from the latest checkpoint, if any and allowed; else start at step 0."""
        if self.cfg.checkpoint.resume and self.checkpointer.latest_step() is not None:
            state = self.checkpointer.load(self.transformer, self.optimizer, self.lr_scheduler)
            self.step, self.skipped = state["step"], state["skipped"]
            self.cursor = DataCursor(**state["cursor"])
            self.real_cursor = DataCursor(**state.get("real_cursor", asdict(self.real_cursor)))
            self.guard = CollapseGuard(**state["guard"])
            logger.info("resumed from step %d", self.step)
        self.log.start(self.step)


def train(cfg: TrainConfig, store: Store, out: str, run_name: str = "train",
          on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train into `out` (a store prefix); returns small values: counts and URIs. `run_name`
    names the trackers' run; `on_progress` gets the progress line's values every log_every."""
    return Trainer(cfg, store, out, run_name=run_name, on_progress=on_progress).train()


RESULT_PREFIX = "regdpo-train-result: "  # the line flows.train reads back from a torchrun launch


def main(argv: list[str] | None = None) -> None:
    """python -m tasks.train TRAIN.yaml --store URL --out PREFIX (the `train` section alone);
    under torchrun, one process per rank."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config", help="YAML/JSON file with the train section")
    parser.add_argument("--store", required=True, help="artifact store URL")
    parser.add_argument("--out", required=True, help="store prefix for checkpoints and logs")
    parser.add_argument("--run-name", default="train", help="the trackers' name of this run")
    args = parser.parse_args(argv)
    # The level leads each line: flows.train re-logs a launch's WARNING lines as warnings.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.model_validate(yaml_load(Path(args.config).read_text()) or {})
    try:
        trainer = Trainer(cfg, Store(args.store), args.out, run_name=args.run_name,
                          on_progress=lambda p: print(PROGRESS_PREFIX + json.dumps(p), flush=True))
        result = trainer.train()
        # The launch's answer, from each node's first process (after the final barrier, so the
        # adapter is in the store): rank 0 may be on any node of a c10d rendezvous.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(RESULT_PREFIX + json.dumps(result), flush=True)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
