"""Config of the stages between GT clips and training: negatives, pairs, precompute
(paper §3.1, A.1, A.2; LocalDPO for local_corrupt)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from infra.config.base import Section
from infra.config.ipo import ScoredPairsConfig
from infra.config.wan import WAN21_I2V_14B_720P, WAN_NEGATIVE_PROMPT, Kind, WanEdge, WanFrames
from infra.store import safe_part

class GeneratorConfig(Section):
    """One frozen base model that adds one negative per GT clip (the paper used five, A.1)."""

    name: str = Field(description="short name recorded in every row (`generator` column)")
    model: str = Field(WAN21_I2V_14B_720P, description="hub id or local diffusers folder")
    kind: Kind = "i2v"
    dtype: str = Field("bfloat16", description="transformer and text encoder dtype")
    steps: int = Field(50, ge=1, description="inference steps (Wan's default 50)")
    guidance: float = Field(5.0, ge=0, description="classifier-free guidance scale (Wan: 5.0)")
    guidance_2: float | None = Field(None, ge=0, description="Wan2.2's low-noise expert scale; "
                                     "None = guidance")
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    short_edge: WanEdge = Field(None, ge=16, description="generation short edge (px, multiple "
                                   "of 16); None = the GT clip's size. Outputs are renormalized "
                                   "to the GT spec either way")
    frames: WanFrames = Field(None, ge=1, description="generated frames (4k + 1); None = the "
                               "GT clip's. Fewer frames are spread over the GT clip's duration")
    batch_size: int = Field(1, ge=1, description="clips per pipeline call (T2V only: diffusers' "
                            "I2V pipeline conditions a call on one reference image)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        safe_part(v)
        return v

    @model_validator(mode="after")
    def _batch(self) -> "GeneratorConfig":
        if self.batch_size > 1 and self.kind != "t2v":
            raise ValueError(f"batch_size {self.batch_size} needs kind 't2v': diffusers' "
                             "WanImageToVideoPipeline takes one reference image per call; "
                             "set batch_size: 1")
        return self


class LocalCorruptConfig(Section):
    """LocalDPO negatives (paper 002): random spatio-temporal boxes over the GT latent are
    re-noised and reconstructed by the frozen base model; the rest stays the GT latent."""

    masks: tuple[int, int] = Field((1, 3), description="[min, max] boxes per clip")
    size: tuple[float, float] = Field((0.2, 0.5), description="[min, max] box side as a fraction "
                                      "of the latent height and width")
    span: tuple[float, float] = Field((0.25, 1.0), description="[min, max] box duration as a "
                                      "fraction of the latent frames")
    strength: float = Field(0.6, gt=0, le=1, description="re-noising strength: the masked region "
                            "is noised to the schedule's step int(steps * strength) from the end")

    @model_validator(mode="after")
    def _ranges(self) -> "LocalCorruptConfig":
        if not 1 <= self.masks[0] <= self.masks[1]:
            raise ValueError(f"masks {list(self.masks)} must be [min, max] with 1 <= min <= max")
        for name in ("size", "span"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} {[lo, hi]} must be [min, max] with 0 < min <= max <= 1")
        return self


class NegativesConfig(Section):
    """The negatives stage: gt_pair (Reg-DPO §3.1) or local_corrupt (LocalDPO)."""

    mode: Literal["gt_pair", "local_corrupt"] = "gt_pair"
    generators: list[GeneratorConfig] = Field(
        default_factory=lambda: [GeneratorConfig(name="wan21-i2v-14b-720p")], min_length=1,
        description="gt_pair: each adds one negative per GT clip; local_corrupt: exactly one, "
                    "the frozen base model")
    local: LocalCorruptConfig = LocalCorruptConfig()
    seed: int = Field(0, ge=0, description="per-item seeds derive from (seed, clip, generator)")
    device: str | None = Field(None, description="torch device; None = cuda if available")
    workers: int = Field(2, ge=1, description="items in flight: inference is serialized per "
                         "model, renormalizing and uploading overlap with it")

    @model_validator(mode="after")
    def _check(self) -> "NegativesConfig":
        names = [g.name for g in self.generators]
        if len(set(names)) != len(names):
            raise ValueError(f"generator names {names} must be unique")
        if self.mode == "local_corrupt" and len(self.generators) != 1:
            raise ValueError("local_corrupt reconstructs with one frozen base model: give "
                             f"exactly one generator (got {len(self.generators)})")
        if self.mode == "local_corrupt" and self.generators[0].batch_size != 1:
            raise ValueError("local_corrupt runs one inference per clip: set batch_size: 1")
        if self.mode == "local_corrupt" and (self.generators[0].frames is not None
                                             or self.generators[0].short_edge is not None):
            raise ValueError("local_corrupt reconstructs the GT latent itself, so it works at the "
                             "GT clip's own size and frame count (outside the mask the negative "
                             "must stay the GT clip, frame for frame): leave the generator's "
                             "frames and short_edge unset")
        return self


class AnnotatedConfig(Section):
    """External per-video scores (paper A.1's manual annotation: mean of 5-point scores)."""

    scores: str = Field(description="CSV or Parquet file, one row per scored video")
    video_root: str = Field(description="folder the video paths are relative to; paths that "
                            "leave it are rejected")
    gt_column: str = Field("gt_id", description="the GT clip (id in the normalize manifest) "
                           "whose reference frame and prompt generated the video")
    video_column: str = "video"
    score_column: str = "score"
    min_gap: float = Field(1.0, ge=0, description="keep pairs whose score gap is >= this "
                           "(paper: 1 or 2)")
    min_win_score: float | None = Field(None, description="keep pairs whose positive scores "
                                        ">= this (paper: 4); None = no floor")


class PairsConfig(Section):
    """The pairs stage: preference pairs and the train/test split by GT clip."""

    mode: Literal["gt_pair", "local", "annotated", "scored"] = Field(
        "gt_pair", description="gt_pair / local: GT clips win against the negatives stage's "
        "videos; annotated: external scores; scored: a Dual-IPO round's critic verdicts "
        "(flows/ipo.py sets it, with `scored` = ipo.pairs)")
    annotated: AnnotatedConfig | None = None
    scored: ScoredPairsConfig | None = Field(None, description="mode scored's thresholds "
                                             "(ipo.pairs); the other modes take none")
    test_fraction: float = Field(0.04, ge=0, lt=1, description="share of GT clips held out; "
                                 "the test set keeps only their reference frames and prompts "
                                 "(paper: 500 of 12.5K)")
    split_seed: int = Field(0, ge=0, description="a clip's split is a hash of (seed, clip id): "
                            "adding clips never moves one between splits")

    @model_validator(mode="after")
    def _check(self) -> "PairsConfig":
        if (self.mode == "annotated") != (self.annotated is not None):
            raise ValueError("mode 'annotated' needs the `annotated` section (scores file, "
                             "video_root) and the other modes take none")
        if (self.mode == "scored") != (self.scored is not None):
            raise ValueError("mode 'scored' needs the `scored` section (the ipo.pairs "
                             "thresholds) and the other modes take none")
        return self

    def settings(self) -> dict:
        """What the stage key digests: the fields, without the `scored` slot when unused (so
        the keys of the other modes are what they were before it existed)."""
        return self.model_dump(exclude={"scored"} if self.scored is None else None)


class PrecomputeConfig(Section):
    """Pre-encoding (paper A.2): per pair UMT5 text, VAE latents of win and lose, and the I2V
    condition; training then needs neither the VAE nor the text encoder."""

    model: str | None = Field(None, description="the model to train (its VAE, UMT5 and CLIP): "
                              "hub id or local diffusers folder; None = train.model")
    kind: Kind | None = Field(None, description="None = train.kind")
    dtype: str = Field("bfloat16", description="text encoder dtype (the VAE and CLIP run in "
                       "float32)")
    short_edge: WanEdge = Field(None, ge=16, description="encode at this short edge (train "
                                   "resolution, multiple of 16); None = the GT size")
    frames: WanFrames = Field(None, ge=1, description="encode the first frames (4k + 1); "
                               "None = all GT frames")
    save_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the tensors in the pair files")
    device: str | None = Field(None, description="torch device; None = cuda if available")
    workers: int = Field(1, ge=1)


