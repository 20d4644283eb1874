"""Config of the train stage: the loss (exact math in losses/), LoRA, AdamW, layout, checkpoints."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from infra.config.base import ConfigError, Section
from infra.config.wan import DEFAULT_TARGETS, WAN21_I2V_14B_720P, Dtype, Kind

LossKind = Literal["dpo", "regdpo", "sft", "region", "kto"]
# The loss constants take numbers only: "500" or true for β is a mistake, not a value.
Number = Annotated[float, Field(strict=True)]


class LossConfig(Section):
    """The `train.loss` section: which objective, and its constants (losses.preference_loss)."""

    kind: LossKind = Field("regdpo", description="dpo (Eq. 2), regdpo (Eq. 6), sft (e_θ^w only), "
                           "region (DPO on masked errors, LocalDPO), kto (Diffusion-KTO on single "
                           "samples: winners desirable, losers undesirable)")
    beta: Number = Field(500.0, gt=0, description="preference strength β; the losses use b = β/2 "
                        "(Diffusion-DPO), so DGR ≤ β/2 (the paper uses 500)")
    r: Number | Literal["dgr"] = Field("dgr", description="Reg-DPO's SFT weight (Eq. 5/6): a "
                                      "constant ≥ 0, or \"dgr\" for the dynamic r = k·DGR")
    k: Number = Field(1.0, ge=0, description="multiplier of the dynamic weight r = k·DGR (the "
                     "paper's default is 1; it tried 1/5 to 2)")
    nll_lambda: Number = Field(0.0, ge=0, description="Dual-IPO's NLL regulariser λ: adds "
                              "λ·mean(e_θ) on real videos; 0 turns it off")
    kto_desirable_weight: Number = Field(1.0, ge=0, description="KTO's λ_D, the weight of "
                                        "desirable samples")
    kto_undesirable_weight: Number = Field(1.0, ge=0, description="KTO's λ_U, the weight of "
                                          "undesirable samples")
    kto_on: Literal["pointwise", "pairs"] = Field(
        "pointwise", description="what kind kto trains on (other kinds ignore it): the "
        "pointwise rows of train.data (one video each with its critic label, Dual-IPO) or the "
        "pairs (winners desirable, losers undesirable)")
    nll_on: Literal["real", "winners", "both"] = Field(
        "real", description="with nll_lambda > 0, the NLL term's data (Dual-IPO): real = the "
        "real (GT) clips of train.data, winners = the pairs' winners (kto: the desirable "
        "samples), both = one λ·mean term for each")

    @field_validator("r")
    @classmethod
    def _r(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and v < 0:
            raise ValueError(f'train.loss.r must be a number ≥ 0 or "dgr" (r = k·DGR); got {v!r}')
        return v


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


class ContextParallelSection(Section):
    """The `train.parallel.context_parallel` section: one sample's video tokens split over
    ulysses × ring ranks (diffusers' ContextParallelConfig degrees). A plain number N in the YAML
    is read as {ulysses: N} (the layout's old int form)."""

    ulysses: int = Field(1, ge=1, description="Ulysses degree: all-to-all that trades the "
                         "sequence split for a head split around attention; must divide the "
                         "attention heads (Wan2.1: 12 for 1.3B, 40 for 14B)")
    ring: int = Field(1, ge=1, description="ring degree: K/V chunks passed around the ring, "
                      "softmax merged by log-sum-exp; needs an attention kernel that returns it "
                      "(flash-attn, or cuDNN SDPA in bf16)")
    implementation: Literal["auto", "diffusers", "gather"] = Field(
        "auto", description="diffusers = the library's Ulysses/ring attention (CUDA: its "
        "enable_parallelism needs an accelerator); gather = ours, every rank gathers the full "
        "K/V of a block (any device, gloo included; ulysses × ring is then just the degree); "
        "auto = diffusers on CUDA, gather elsewhere")

    @model_validator(mode="before")
    @classmethod
    def _degree(cls, v: object) -> object:
        if isinstance(v, bool):
            raise ValueError("train.parallel.context_parallel takes {ulysses: N, ring: M} or a "
                             f"number of ranks; got {v!r}")
        return {"ulysses": v} if isinstance(v, int) else v

    @property
    def degree(self) -> int:
        """Ranks that share one sample's tokens."""
        return self.ulysses * self.ring


class ParallelConfig(Section):
    """The `train.parallel` section: how one training step is laid out in memory."""

    pair_batch: bool = Field(
        True, description="win and lose of a pair go through one forward as a batch of 2; "
        "off = two separate forwards (same numbers, less peak activation sharing)")
    gradient_checkpointing: bool = Field(
        False, description="recompute each transformer block's activations in backward")
    checkpoint_every: int = Field(
        1, ge=1, description="with gradient_checkpointing: recompute every k-th block only "
        "(1 = all blocks; larger trades memory for less recompute)")
    offload_activations: bool = Field(
        False, description="the blocks that are not recomputed keep the tensors autograd saves "
        "in pinned host memory (copied asynchronously, back for backward; parameters stay), "
        "so device memory holds ~ what a recomputed block keeps, without the recompute; with "
        "memory_budget_gb, only as many blocks as the budget needs. CUDA only in effect: on "
        "CPU host memory is the device's")
    memory_budget_gb: float | None = Field(
        None, gt=0, description="device memory one rank may use (GiB, everything: weights, "
        "optimizer state, activations; the process's RSS on CPU). Set, the trainer measures "
        "probe steps at 1 and 2 latent frames (every block storing, then every block "
        "recomputing), scales them linearly to the data's frames, and picks the fewest blocks "
        "to take off the device: offloaded first with offload_activations, else recomputed "
        "(infra/memory_plan.py); gradient_checkpointing and checkpoint_every are then "
        "ignored. Fails before the first step, naming the smallest budget, when recomputing "
        "every block does not fit. null = no planning")
    bf16: bool = Field(True, description="bfloat16 autocast; applies on CUDA only")
    fsdp: bool = Field(
        False, description="FSDP2: shard the frozen base weights over all ranks (fully_shard "
        "per block, then the root); the LoRA weights stay whole on every rank")
    context_parallel: ContextParallelSection = Field(
        default_factory=lambda: ContextParallelSection(),
        description="ranks that split one sample's video tokens (sequence axis): "
        "{ulysses: N, ring: M}; a plain number N means {ulysses: N}")
    pair_parallel: bool = Field(
        False, description="win side on one rank, lose side on its partner, exchanging only "
        "the per-sample errors (needs an even number of processes)")
    attention: Literal["auto", "sdpa", "flash"] = Field(
        "auto", description="attention kernel: flash = the flash-attn package (`pip install "
        ".[gpu]`, CUDA only); sdpa = torch's scaled_dot_product_attention; auto = flash when "
        "installed and on CUDA, else sdpa")

    @property
    def pair_degree(self) -> int:
        return 2 if self.pair_parallel else 1


class CheckpointConfig(Section):
    """The `train.checkpoint` section. Not part of the config digest: it changes no numbers."""

    every: int = Field(100, ge=1, description="write a checkpoint every N optimizer steps")
    resume: bool = Field(True, description="continue from the output's latest checkpoint if any")



class TrainConfig(Section):
    """The train stage: which model, which pairs, which loss, and how to step."""

    model: str = Field(WAN21_I2V_14B_720P, description="hub id or local diffusers folder")
    kind: Kind = "i2v"
    dtype: Dtype = Field("bfloat16", description="dtype of the frozen base weights")
    data: str | None = Field(None, description="store key of the committed pairs dataset "
                             "(the precompute stage's output dir)")
    loss: LossConfig = LossConfig()
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
    log_sync_s: float = Field(30.0, ge=0, description="upload metrics.jsonl and the trackers' "
                              "files at most this often (and at every checkpoint and the end); "
                              "0 = every step")
    log_every: int = Field(10, ge=1, description="one progress line (step/total, loss, L_dpo, "
                           "DGR, gaps, s/step, ETA) in the log and the Prefect UI every N steps")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"], description="experiment trackers (any subset); "
        "wandb runs offline unless WANDB_MODE is set, mlflow into a local file store unless "
        "MLFLOW_TRACKING_URI is set; wandb/mlflow need `pip install 'regdpo[tracking]'`")
    init_adapter: str | None = Field(
        None, description="store key of a LoRA adapter the policy starts from (a train stage's "
        "adapter dir or its pytorch_lora_weights.safetensors; Dual-IPO: the previous round's); "
        "it must have train.lora's rank and targets. None = a fresh adapter (B = 0)")
    reference: Literal["base", "previous"] = Field(
        "previous", description="the frozen reference of the DPO/KTO gaps: base = the base "
        "model (adapters disabled); previous = base + train.init_adapter, the policy that "
        "sampled this round's data (a second, frozen adapter), which is the base when "
        "init_adapter is None. Default previous: iterative DPO measures each round against the "
        "policy it starts from, so the gaps start at 0 every round")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.kind == "i2v-2.2":
            raise ValueError("kind 'i2v-2.2' is not trainable yet: Wan2.2's two experts split "
                             "the timesteps at boundary_ratio and the trainer trains one "
                             "transformer; use a Wan2.1 model (t2v or i2v)")
        if self.parallel.pair_parallel and self.single_videos():
            raise ValueError(f"train.parallel.pair_parallel puts a pair's two sides on two "
                             f"ranks, but this config also trains on single videos "
                             f"({', '.join(self.single_videos())}), which have no second side; "
                             "set train.parallel.pair_parallel: false")
        return self

    def row_kinds(self) -> dict[str, str]:
        """The row kinds of train.data this config trains on -> the keys that ask for them."""
        loss, kinds = self.loss, {}
        if loss.kind != "kto" or loss.kto_on == "pairs":
            kinds["pair"] = f"train.loss.kind: {loss.kind}" + (
                ", kto_on: pairs" if loss.kind == "kto" else "")
        else:
            kinds["pointwise"] = "train.loss.kind: kto, kto_on: pointwise"
        if loss.nll_lambda > 0 and loss.nll_on in ("real", "both"):
            kinds["real"] = f"train.loss.nll_lambda > 0, nll_on: {loss.nll_on}"
        return kinds

    def single_videos(self) -> list[str]:
        """The single-video row kinds (pointwise, real) this config trains on."""
        return [k for k in self.row_kinds() if k != "pair"]

    def check_rows(self, counts: dict[str, int], where: str) -> None:
        """Refuse a dataset (`where`, with `counts` ok rows per kind) that lacks a kind this
        config trains on; the error names the keys and the fix."""
        fixes = {
            "pair": "add pairs (the pairs stage), or train KTO on pointwise rows "
                    "(train.loss.kind: kto, kto_on: pointwise)",
            "pointwise": "add pointwise rows (the pairs stage's scored mode), or set "
                         "train.loss.kto_on: pairs to train KTO on the pairs' winners and losers",
            "real": "add real clips (rows of kind 'real'), or set train.loss.nll_on: winners, "
                    "or train.loss.nll_lambda: 0",
        }
        missing = [f"{why} needs rows of kind {kind!r}; {fixes[kind]}"
                   for kind, why in self.row_kinds().items() if not counts.get(kind)]
        if missing:
            have = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no usable rows"
            raise ConfigError(f"train.data {where} has {have}: " + "; ".join(missing))


# Fields that change no number of the run: a resume (and the stage key) may differ in them.
RUN_CONTROL = ("checkpoint", "device", "local_dir", "log_sync_s", "log_every", "report_to")
