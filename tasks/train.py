"""The train stage: Reg-DPO (and DPO/SFT/region/KTO) LoRA post-training of a Wan transformer on
pre-encoded latent pairs, in one process or many (torchrun; infra.distributed). Read top to
bottom: config, pair data, one step, loop.

The step (DESIGN "Training: losses (exact)"; equation numbers from Reg-DPO, paper 001):
  per pair ONE timestep t and ONE noise ε, shared by win and lose; flow matching
      x_t = (1 − σ_t) z + σ_t ε,   y = ε − z
  e = mean (y − v(x_t, t, c))² per sample, from the policy (base + LoRA, with grad) and the
  reference (the same module with the adapter disabled, no grad); the loss is
  losses.preference_loss on the four errors (Eq. 2 for DPO, Eq. 6 for Reg-DPO, whose gradient
  is Eq. 5).

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
import random
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import WanTransformer3DModel
from pydantic import Field, field_validator, model_validator
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from infra.checkpoint import CheckpointConfig, Checkpointer, save_final_adapter
from infra.config import Section, yaml_load
from infra.distributed import Layout, check_grid, shutdown
from infra.parallel import ParallelConfig, autocast, pair_forward, parallelize
from infra.store import Store, digest, join_key
from losses import PreferenceLoss, flow_error, masked_error, preference_loss
from models.wan import (
    DEFAULT_TARGETS,
    TEXT_LEN,
    WAN21_I2V_14B_720P,
    Kind,
    WanSpec,
    add_lora,
    load_transformer,
    lora_parameters,
    reference_mode,
    training_scheduler,
)

logger = logging.getLogger("regdpo.train")
Metrics = dict[str, Any]

# ---------------------------------------------------------------------------------------
# Config: the `train` section
# ---------------------------------------------------------------------------------------


class LoraSection(Section):
    """The adapter that trains (paper §4.1: rank 16, alpha 32)."""

    rank: int = Field(16, ge=1, description="LoRA rank r")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r")
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1,
                               description="module-path suffixes that get an adapter")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")


class OptimizerConfig(Section):
    """AdamW over the LoRA weights only, warmup then a constant or cosine schedule."""

    lr: float = Field(5e-6, gt=0, description="peak learning rate (paper §4.1: 5e-6)")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-2, ge=0, description="AdamW's decoupled weight decay")
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear warmup from lr/warmup_steps to lr")
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor, a fraction of lr")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the total norm; None = off")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"AdamW betas must lie in [0, 1); got {v}")
        return v


class TrainConfig(Section):
    """The train stage: which model, which pairs, which loss, and how to step."""

    model: str = Field(WAN21_I2V_14B_720P, description="hub id or local diffusers folder")
    kind: Kind = "i2v"
    dtype: str = Field("bfloat16", description="dtype of the frozen base weights")
    data: str | None = Field(None, description="store key of the committed pairs dataset "
                             "(the precompute stage's output dir)")
    loss: PreferenceLoss = PreferenceLoss()
    lora: LoraSection = LoraSection()
    optimizer: OptimizerConfig = OptimizerConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(1, ge=1, description="pairs per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    seed: int = Field(0, ge=0, description="LoRA init, data order (shuffle seed), noise")
    shuffle: bool = True
    shift: float | None = Field(None, gt=0, description="flow shift; None = the model's own")
    collapse_window: int = Field(50, ge=2, description="steps the collapse guard looks back")
    collapse_fraction: float = Field(0.1, gt=0, lt=1, description="warn when DGR is below this "
                                     "fraction of its start value and both gaps rose")
    device: str | None = Field(None, description="torch device; None = cuda if available "
                               "(cuda:LOCAL_RANK under torchrun)")
    local_dir: str | None = Field(None, description="scratch dir for TensorBoard; None = temp")
    log_sync_s: float = Field(30.0, ge=0, description="upload metrics.jsonl at most this often "
                              "(and at every checkpoint and the end); 0 = every step")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        WanSpec(self.kind, self.model, self.dtype)  # kind and dtype names
        if self.kind == "i2v-2.2":
            raise ValueError("kind 'i2v-2.2' is not trainable yet: Wan2.2's two experts split "
                             "the timesteps at boundary_ratio and the trainer trains one "
                             "transformer; use a Wan2.1 model (t2v or i2v)")
        if self.loss.nll_lambda > 0:
            raise ValueError("train.loss.nll_lambda > 0 needs real-video batches (Dual-IPO), "
                             "which the pairs trainer does not draw; set it to 0")
        return self


def check_launch(cfg: TrainConfig, nproc: int) -> int:
    """The data-parallel degree of `nproc` processes under train.parallel, or a ValueError that
    names the fix; checked before a launch and again by each rank."""
    p = cfg.parallel
    dp = check_grid(nproc, p.pair_degree, p.context_parallel)
    if cfg.batch_size % dp:
        raise ValueError(f"train.batch_size {cfg.batch_size} does not split over the {dp} "
                         f"data-parallel groups of {nproc} processes: make it a multiple of "
                         f"{dp}, or use fewer processes / more context_parallel ranks")
    return dp


# Fields that change no number of the run: a resume may differ in them.
_RUN_CONTROL = ("checkpoint", "device", "local_dir", "log_sync_s")


def config_digest(cfg: TrainConfig, data_sha256: str) -> tuple[str, dict[str, Any]]:
    """(digest, the config it covers): every field that shapes the loss curve, plus the data."""
    config = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _RUN_CONTROL}
    config["data_sha256"] = data_sha256
    return digest(config), config


# ---------------------------------------------------------------------------------------
# Pair data: the format the precompute stage writes (DESIGN "Negatives and pairs")
# ---------------------------------------------------------------------------------------
#
# A committed stage output (manifest.parquet with rows id, status, reason, latents = the URI
# of the pair's file; _SUCCESS.json last). Per pair one safetensors file:
#   win, lose      [C=16, F, H, W]   VAE latents of the preferred / rejected video (normalized)
#   prompt_embeds  [512, text_dim]   UMT5 output, zero-padded to Wan's 512 text tokens
#   cond           [20, F, H, W]     I2V only: 4 first-frame mask channels, then the 16-channel
#                                    latent of the zero-padded first frame (WanImageToVideo order)
#   image_embeds   [N, image_dim]    Wan2.1 I2V only: CLIP penultimate hidden states (N = 257)
#   mask           [1, F, H, W]      optional LocalDPO region (1 = corrupted) at latent size
# Floats are float32/bfloat16/float16; the mask may also be bool/uint8.

PAIRS_FORMAT = "regdpo.pairs.v1"
_FLOATS = {"F32", "F16", "BF16"}
_DTYPES = {"win": _FLOATS, "lose": _FLOATS, "prompt_embeds": _FLOATS, "cond": _FLOATS,
           "image_embeds": _FLOATS, "mask": _FLOATS | {"BOOL", "U8"}}
_MAX_HEADER = 1 << 24  # a safetensors header is a few hundred bytes per tensor


class PairDataError(ValueError):
    """Pairs that do not fit the model or cannot be read; raised before any step."""


def random_pair(model_config: dict[str, Any], frames: int, height: int, width: int,
                generator: torch.Generator, mask: bool = False,
                image_tokens: int = 17) -> dict[str, Tensor]:
    """One pair of random tensors in the pairs format, shaped for `model_config`."""
    c, c_in = model_config["out_channels"], model_config["in_channels"]
    latent = (c, frames, height, width)
    pair = {"win": torch.randn(latent, generator=generator),
            "lose": torch.randn(latent, generator=generator),
            "prompt_embeds": torch.randn(TEXT_LEN, model_config["text_dim"], generator=generator)}
    if c_in > c:
        pair["cond"] = torch.randn((c_in - c, frames, height, width), generator=generator)
    if model_config.get("image_dim"):
        pair["image_embeds"] = torch.randn(image_tokens, model_config["image_dim"],
                                           generator=generator)
    if mask:
        pair["mask"] = (torch.rand((1, frames, height, width), generator=generator) < 0.5).float()
    return pair


def write_pairs(store: Store, stage_dir: str, pairs: dict[str, dict[str, Tensor]]) -> str:
    """Write pair files, then commit the manifest (last); returns the stage dir's URI."""
    rows = []
    for pair_id, tensors in pairs.items():
        key = f"{stage_dir}/pairs/{pair_id}.safetensors"
        data = save_safetensors({k: v.contiguous() for k, v in tensors.items()})
        uri = store.write_bytes(key, data)
        rows.append({"id": pair_id, "status": "ok", "reason": "", "latents": uri})
    store.commit_manifest(stage_dir, rows, {"format": PAIRS_FORMAT, "pairs": len(rows)})
    return store.uri(stage_dir)


def write_random_pairs(store: Store, stage_dir: str, model_config: dict[str, Any], n: int, *,
                       frames: int = 2, height: int = 4, width: int = 4, mask: bool = False,
                       seed: int = 0) -> str:
    """A random pairs dataset for tests and demos, until the precompute stage writes real ones."""
    g = torch.Generator().manual_seed(seed)
    pairs = {f"pair-{i:06d}": random_pair(model_config, frames, height, width, g, mask)
             for i in range(n)}
    return write_pairs(store, stage_dir, pairs)


def check_pair(tensors: dict[str, tuple[str, tuple[int, ...]]], model: dict[str, Any],
               need_mask: bool) -> list[str]:
    """What is wrong with one pair's tensors (name -> (dtype, shape)) for this transformer."""
    c, c_in, text_dim = model["out_channels"], model["in_channels"], model["text_dim"]
    image_dim, (pt, ph, pw) = model.get("image_dim"), model["patch_size"]
    required = {"win", "lose", "prompt_embeds"} | ({"cond"} if c_in > c else set())
    required |= ({"image_embeds"} if image_dim else set()) | ({"mask"} if need_mask else set())
    problems = [f"missing tensor {name!r}" for name in sorted(required - tensors.keys())]
    for name in sorted(tensors.keys() - _DTYPES.keys()):
        problems.append(f"unknown tensor {name!r} (the format has {sorted(_DTYPES)})")
    for name in ({"cond"} if c_in == c else set()) | (set() if image_dim else {"image_embeds"}):
        if name in tensors:
            problems.append(f"has {name!r}, which this model (in_channels={c_in}, "
                            f"image_dim={image_dim}) does not take: wrong kind?")
    for name, (dtype, _) in tensors.items():
        if name in _DTYPES and dtype not in _DTYPES[name]:
            problems.append(f"{name} has dtype {dtype}, expected one of {sorted(_DTYPES[name])}")
    if problems:
        return problems
    win = tensors["win"][1]
    if len(win) != 4 or win[0] != c:
        return [f"win has shape {list(win)}, expected [{c}, F, H, W] ({c} latent channels)"]
    _, f, h, w = win
    if f % pt or h % ph or w % pw:
        problems.append(f"latent F×H×W = {f}×{h}×{w} is not divisible by the patch "
                        f"{pt}×{ph}×{pw}")
    expected = {"lose": (c, f, h, w), "prompt_embeds": (TEXT_LEN, text_dim),
                "cond": (c_in - c, f, h, w), "mask": (1, f, h, w)}
    if image_dim and "image_embeds" in tensors:
        expected["image_embeds"] = (tensors["image_embeds"][1][0], image_dim)
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name][1]) != shape:
            problems.append(f"{name} has shape {list(tensors[name][1])}, expected {list(shape)}")
    return problems


@dataclass(frozen=True)
class PairsDataset:
    """The ok rows of a committed pairs manifest; tensors are read one pair at a time."""

    store: Store
    ids: list[str]
    keys: list[str]
    sha256: str

    @classmethod
    def open(cls, store: Store, stage_dir: str) -> "PairsDataset":
        table, success = store.read_manifest(stage_dir)
        rows = [r for r in table.to_pylist() if r.get("status") == "ok"]
        if not rows or "latents" not in table.column_names:
            raise PairDataError(f"{store.uri(stage_dir)} lists no usable pairs (rows with status "
                                "'ok' and a 'latents' URI); run the precompute stage first")
        return cls(store, [r["id"] for r in rows], [store.key_of(r["latents"]) for r in rows],
                   success["manifest_sha256"])

    def __len__(self) -> int:
        return len(self.ids)

    def _where(self, i: int) -> str:
        return f"pair {self.ids[i]!r} ({self.store.uri(self.keys[i])})"

    def header(self, i: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (dtype, shape) from the file's safetensors header, without reading tensors."""
        with self.store.fs.open(self.store.path(self.keys[i]), "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= _MAX_HEADER:
                raise ValueError("not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}

    def validate(self, model: dict[str, Any], *, need_mask: bool, batch_size: int) -> None:
        """Check every pair's header against the transformer config; one error listing all."""
        problems: list[str] = []
        first: tuple[str, dict] | None = None  # (id, shapes) of the first readable pair
        for i in range(len(self)):
            try:
                tensors = self.header(i)
            except FileNotFoundError:
                problems.append(f"{self._where(i)}: latent file is missing")
                continue
            except (OSError, ValueError, KeyError, TypeError) as e:
                problems.append(f"{self._where(i)}: unreadable as safetensors ({e!r})")
                continue
            found = check_pair(tensors, model, need_mask)
            shapes = {k: s for k, (_, s) in tensors.items()}
            if not found and batch_size > 1 and first and first[1] != shapes:
                found = [f"shapes {shapes} differ from {first[0]!r}'s {first[1]}; "
                         "batch_size > 1 stacks pairs, so all must share one shape"]
            first = first or (self.ids[i], shapes)
            problems += [f"{self._where(i)}: {p}" for p in found]
        if batch_size > len(self):
            problems.append(f"batch_size {batch_size} > the {len(self)} pairs of the dataset")
        if problems:
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise PairDataError(f"{len(problems)} problem(s) with the pairs for this model:\n  "
                                + "\n  ".join(problems[:10]) + more)

    def load(self, i: int) -> dict[str, Tensor]:
        try:
            data = self.store.read_bytes(self.keys[i])
        except FileNotFoundError:
            raise PairDataError(f"{self._where(i)}: latent file is missing") from None
        return {k: v.float() for k, v in load_safetensors(data).items()}


def transformer_config(spec: WanSpec) -> dict[str, Any]:
    """The transformer's config.json, read without loading (up to 14B of) weights."""
    try:
        return dict(WanTransformer3DModel.load_config(spec.model, subfolder="transformer"))
    except OSError:
        load_transformer(spec)  # raises models.wan's error: what is missing and how to get it
        raise


# ---------------------------------------------------------------------------------------
# Data order and per-pair noise
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
    DGR seen and both gaps' late-half means exceed their early-half means."""

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
        early = [sum(col) / half for col in zip(*self.history[:half])]
        late = [sum(col) / half for col in zip(*self.history[-half:])]
        dgr_fell = late[0] < self.fraction * self.dgr_start
        return dgr_fell and late[1] > early[1] and late[2] > early[2]


METRICS_FILE, TENSORBOARD_DIR = "metrics.jsonl", "tensorboard"


def _jsonable(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricsLog:
    """Every step: one JSON line in a local `metrics.jsonl` and TensorBoard scalars in a local
    dir. The JSONL is uploaded to `<out>/metrics.jsonl` (replaced whole, so readers never see a
    torn line) at most every `sync_s` seconds, at checkpoints and at the end — re-uploading a
    growing file every step would be quadratic I/O in the training loop."""

    def __init__(self, store: Store, out: str, local_dir: str | None, sync_s: float = 30.0):
        self.store, self.key = store, f"{out}/{METRICS_FILE}"
        self.tb_key = f"{out}/{TENSORBOARD_DIR}"
        self.sync_s, self.synced_at = sync_s, 0.0
        self.temporary = local_dir is None
        self.local = Path(local_dir or tempfile.mkdtemp(prefix="regdpo-train-"))
        self.path, self.writer = self.local / "metrics.jsonl", None

    def start(self, step: int) -> None:
        """Continue the log after `step`: lines a killed run wrote past its checkpoint go."""
        from torch.utils.tensorboard import SummaryWriter

        lines = []
        if step and self.store.exists(self.key):
            lines = [ln for ln in self.store.read_bytes(self.key).decode().splitlines()
                     if ln.strip() and json.loads(ln)["step"] <= step]
        self.local.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(ln + "\n" for ln in lines))
        # purge_step: TensorBoard drops the killed run's events from this step on.
        self.writer = SummaryWriter(str(self.local / "tensorboard"), purge_step=step + 1)

    def write(self, step: int, metrics: Metrics) -> None:
        line = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        if time.monotonic() - self.synced_at >= self.sync_s:
            self.sync_metrics()
        for name, value in line.items():
            if isinstance(value, (int, float)) and name != "step":  # bools plot as 0/1
                self.writer.add_scalar(f"train/{name}", float(value), step)

    def sync_metrics(self) -> None:
        self.store.put_file(self.path, self.key)
        self.synced_at = time.monotonic()

    def sync_tensorboard(self) -> str:
        self.sync_metrics()
        self.writer.flush()
        for path in sorted((self.local / "tensorboard").iterdir()):
            self.store.put_file(path, f"{self.tb_key}/{path.name}")
        return self.store.uri(self.tb_key)

    def close(self) -> None:
        self.sync_tensorboard()
        self.writer.close()
        if self.temporary:  # everything is in the store now
            shutil.rmtree(self.local, ignore_errors=True)


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
    """Reg-DPO on a LoRA policy whose reference is the same module with the adapter disabled.

    Subclasses change the objective by overriding `forward_backward_step`, never the loop.
    Everything that can fail on the inputs (config, resume digest, pair files) fails in
    __init__, before any step.
    """

    def __init__(self, cfg: TrainConfig, store: Store, out: str, layout: Layout | None = None):
        if not cfg.data:
            raise ValueError("train.data is not set: give the store key of the pairs dataset "
                             "(the precompute stage's output dir)")
        self.cfg, self.store, self.out = cfg, store, join_key(out)
        p = cfg.parallel
        self.layout = layout or Layout.from_env(p.pair_degree, p.context_parallel, cfg.device)
        self.device = self.layout.device
        check_launch(cfg, self.layout.world)
        self.dataset = PairsDataset.open(store, cfg.data)
        self.checkpointer = Checkpointer(store, f"{self.out}/checkpoints",
                                         *config_digest(cfg, self.dataset.sha256))
        if cfg.checkpoint.resume:
            self.checkpointer.latest_step()  # a checkpoint of another config fails here
        spec = WanSpec(cfg.kind, cfg.model, cfg.dtype)
        self.dataset.validate(transformer_config(spec), need_mask=cfg.loss.kind == "region",
                              batch_size=cfg.batch_size)
        seed_everything(cfg.seed)
        self.transformer = self._build_policy(spec)
        scheduler = training_scheduler(spec, cfg.shift)
        self.sigmas, self.timesteps = scheduler.sigmas.float(), scheduler.timesteps.float()
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(lora_parameters(self.transformer), lr=o.lr,
                                           betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(lr_factor, cfg=o, total_steps=cfg.steps))
        self.cursor = DataCursor(seed=cfg.seed)
        self._epoch_order: tuple[int, list[int]] = (-1, [])
        self.guard = CollapseGuard(cfg.collapse_window, cfg.collapse_fraction)
        # Only the main rank writes; elsewhere these sinks swallow every call.
        self.log = self.layout.main_only(
            lambda: MetricsLog(store, self.out, cfg.local_dir, cfg.log_sync_s))
        self.saver = self.layout.main_only(lambda: self.checkpointer)
        self.step, self.skipped = 0, 0

    def _build_policy(self, spec: WanSpec) -> WanTransformer3DModel:
        transformer = load_transformer(spec)
        lora = self.cfg.lora
        add_lora(transformer, rank=lora.rank, alpha=lora.alpha, targets=lora.targets,
                 dropout=lora.dropout)
        return parallelize(transformer.to(self.device), self.cfg.parallel, self.layout)

    # -- data ----------------------------------------------------------------------------

    def _order(self, epoch: int) -> list[int]:
        """The epoch's permutation of the pairs, a function of (shuffle seed, epoch) only."""
        if self._epoch_order[0] != epoch:
            g = torch.Generator().manual_seed(_seed(self.cursor.seed, "order", epoch))
            order = (torch.randperm(len(self.dataset), generator=g).tolist() if self.cfg.shuffle
                     else list(range(len(self.dataset))))
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def next_batch(self) -> PairBatch:
        """This rank's share of the next micro-batch (its dp slice), each pair with its own
        (t, ε) drawn from its own seed."""
        slots = self.cursor.take(self.cfg.batch_size, len(self.dataset))
        share = len(slots) // self.layout.dp
        slots = slots[self.layout.local("dp") * share:][:share]
        pairs = [self.dataset.load(self._order(epoch)[pos]) for epoch, pos in slots]
        sigma, timestep, noise = [], [], []
        for (epoch, pos), pair in zip(slots, pairs):
            g = torch.Generator().manual_seed(_seed(self.cursor.seed, "noise", epoch, pos))
            i = int(torch.randint(len(self.timesteps), (1,), generator=g))
            sigma.append(self.sigmas[i])
            timestep.append(self.timesteps[i])
            noise.append(torch.randn(pair["win"].shape, generator=g))
        stacked = {k: torch.stack([p[k] for p in pairs]).to(self.device) for k in pairs[0]}
        return PairBatch(**stacked, noise=torch.stack(noise).to(self.device),
                         sigma=torch.stack(sigma).to(self.device),
                         timestep=torch.stack(timestep).to(self.device))

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
        if self.cfg.loss.kind == "region":  # LocalDPO: errors over the corrupted region only
            return masked_error(pred, y, tile(batch.mask))
        return flow_error(pred, y)

    def forward_backward_step(self, batch: PairBatch, scale: float) -> Metrics:
        """One micro-batch: noise both sides with the pair's shared (t, ε), the reference and
        policy errors, the preference loss (Eq. 2 / Eq. 6), backward of loss·scale."""
        sigma = batch.sigma.view(-1, 1, 1, 1, 1)
        win = ((1 - sigma) * batch.win + sigma * batch.noise, batch.noise - batch.win)
        lose = ((1 - sigma) * batch.lose + sigma * batch.noise, batch.noise - batch.lose)
        errors, parallel = partial(self.errors, batch), (self.cfg.parallel, self.layout)
        with torch.no_grad(), reference_mode(self.transformer):
            ref_w, ref_l = pair_forward(errors, win, lose, *parallel)
        err_w, err_l = pair_forward(errors, win, lose, *parallel)
        loss, metrics = preference_loss(self.cfg.loss, err_w, err_l, ref_w, ref_l)
        (loss * scale).backward()
        return metrics

    def train_step(self) -> Metrics:
        """grad_accum micro-batches, clip, then an AdamW update unless loss or grads are
        non-finite (then the update is skipped and counted; the LR schedule still advances)."""
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        n = self.cfg.grad_accum
        # The loss is a mean over pairs, so 1/n per micro-batch makes n×B equal one batch of n·B.
        parts = [self.forward_backward_step(self.next_batch(), 1 / n) for _ in range(n)]
        metrics = self.layout.mean_metrics({k: sum(p[k] for p in parts) / n for k in parts[0]})
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
        every = self.cfg.checkpoint.every
        while self.step < self.cfg.steps:
            metrics = self.train_step()
            self.step += 1
            metrics["collapse"] = self.guard.update(metrics)
            if metrics["collapse"]:
                logger.warning("step %d: collapse signature — DGR %.4g is below %g of its start "
                               "%.4g while win_gap and lose_gap both rose (paper Fig. 2)",
                               self.step, metrics["dgr"], self.cfg.collapse_fraction,
                               self.guard.dgr_start)
            self.log.write(self.step, {"epoch": self.cursor.epoch, **metrics})
            if self.step % every == 0 or self.step == self.cfg.steps:
                self.save_checkpoint()
        adapter = self.layout.main_only(lambda: save_final_adapter(
            self.store, self.transformer, f"{self.out}/adapter"))
        self.log.close()
        self.layout.barrier()  # all written before any rank returns (and, say, resumes)
        return {"steps": self.step, "skipped": self.skipped, "adapter": adapter,
                "metrics": self.store.uri(f"{self.out}/{METRICS_FILE}"),
                "tensorboard": self.store.uri(f"{self.out}/{TENSORBOARD_DIR}")}

    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "skipped": self.skipped, "cursor": asdict(self.cursor),
                "guard": asdict(self.guard)}

    def save_checkpoint(self) -> str:
        self.log.sync_tensorboard()  # and the JSONL: both in the store up to this step
        return self.saver.save(self.step, self.transformer, self.optimizer,
                               self.lr_scheduler, self.trainer_state())

    def resume(self) -> None:
        """Continue from the latest checkpoint, if any and allowed; else start at step 0."""
        if self.cfg.checkpoint.resume and self.checkpointer.latest_step() is not None:
            state = self.checkpointer.load(self.transformer, self.optimizer, self.lr_scheduler)
            self.step, self.skipped = state["step"], state["skipped"]
            self.cursor = DataCursor(**state["cursor"])
            self.guard = CollapseGuard(**state["guard"])
            logger.info("resumed from step %d", self.step)
        self.log.start(self.step)


def train(cfg: TrainConfig, store: Store, out: str) -> dict[str, Any]:
    """Train into `out` (a store prefix); returns small values: counts and URIs."""
    return Trainer(cfg, store, out).train()


RESULT_PREFIX = "regdpo-train-result: "  # the line flows.train reads back from a torchrun launch


def main(argv: list[str] | None = None) -> None:
    """python -m tasks.train TRAIN.yaml --store URL --out PREFIX (the `train` section alone);
    under torchrun, one process per rank."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config", help="YAML/JSON file with the train section")
    parser.add_argument("--store", required=True, help="artifact store URL")
    parser.add_argument("--out", required=True, help="store prefix for checkpoints and logs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = TrainConfig.model_validate(yaml_load(Path(args.config).read_text()) or {})
    try:
        trainer = Trainer(cfg, Store(args.store), args.out)
        result = trainer.train()
        if trainer.layout.is_main:  # the launch's one answer
            print(RESULT_PREFIX + json.dumps(result), flush=True)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
