"""Config of the evaluate stage (paper §4.1, A.6): sampling, VBench, proxy metrics."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from infra.config.base import Section
from infra.config.wan import Dtype, Kind, WanFrames
from infra.store import safe_part

BASE = "base"  # the frozen model's label in every table
Evaluator = Literal["vbench", "proxy"]

# The paper's six VBench dimensions, in its column order.
DIMENSIONS: tuple[str, ...] = (
    "subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree",
    "aesthetic_quality", "imaging_quality",
)
# Every dimension the vbench runner can score (tasks/vbench_runner.py WEIGHTS; a test keeps the
# two in step, since the runner runs in the vbench env and imports nothing of ours).
VBENCH_DIMENSIONS: tuple[str, ...] = DIMENSIONS + ("temporal_flickering",)

class GenerateConfig(Section):
    """How test videos are sampled. The model itself is the train stage's (same base)."""

    seeds: list[int] = Field([0], min_length=1, description="one video per prompt, model and seed; "
                             "every model gets the same seeds")
    num_inference_steps: int = Field(50, ge=1)
    guidance_scale: float = Field(5.0, ge=0)
    negative_prompt: str | None = None
    short_edge: int | None = Field(None, ge=16, description="generation size (short edge, px) at "
                                   "the GT bucket; None = the GT's own (the paper's 720p)")
    num_frames: WanFrames = Field(None, ge=1, description="frames to sample; None = the GT's "
                                  "frames (81); Wan needs 4k + 1")
    max_prompts: int | None = Field(None, ge=1, description="first N test prompts only (quick looks)")
    device: str | None = Field(None, description="torch device; None = cuda if available")
    dtype: Dtype | None = Field(None, description="None = the train stage's dtype")


class VBenchConfig(Section):
    """The real vbench package, in the env scripts/vbench_env.sh creates."""

    python: str = Field(".venv-vbench/bin/python", description="python of the vbench env")
    cache_dir: str = Field("~/.cache/vbench", description="VBENCH_CACHE_DIR: every checkpoint")
    dimensions: list[str] = Field(list(DIMENSIONS), min_length=1)
    device: str | None = Field(None, description="None = cuda if the vbench env sees one")
    timeout_s: float = Field(48 * 3600, gt=0)

    @field_validator("dimensions")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        if unknown := [d for d in v if d not in VBENCH_DIMENSIONS]:
            raise ValueError(f"VBench dimension(s) {unknown} are not supported here; choose "
                             f"from {', '.join(VBENCH_DIMENSIONS)}")
        return v


class ProxyConfig(Section):
    """Weight-free proxy metrics (NOT VBench): analysis size and the dynamic-degree test."""

    short_edge: int = Field(128, ge=32, description="frames are analysed at this short edge")
    flow_fps: float = Field(8.0, gt=0, description="frame pairs per second for the motion test "
                            "(VBench samples ~8 fps)")


class EvaluateConfig(Section):
    """The evaluate stage (paper §4.1, A.6)."""

    evaluators: list[Evaluator] = Field(["vbench", "proxy"], min_length=1)
    model: str | None = Field(None, description="base model (hub id or folder); None = the train "
                              "stage's, so adapters are compared on the base they were trained on")
    kind: Kind | None = Field(None, description="t2v | i2v | i2v-2.2; None = the train stage's")
    adapters: dict[str, str] = Field(default_factory=dict, description="extra adapters to compare: "
                                     "label -> URI of a pytorch_lora_weights.safetensors")
    include_trained: bool = Field(True, description="compare the run's own train stage adapter")
    generate: GenerateConfig = GenerateConfig()
    vbench: VBenchConfig = VBenchConfig()
    proxy: ProxyConfig = ProxyConfig()
    decimals: int = Field(5, ge=1, le=8, description="printed precision; ties are decided at it")
    workers: int = Field(1, ge=1, description="videos in flight (one pipeline per process, so "
                         "generation itself is serialized; >1 overlaps encoding)")

    @field_validator("adapters")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for label in v:
            safe_part(label)
            if label == BASE:
                raise ValueError(f"adapter label {BASE!r} is reserved for the base model")
        return v


