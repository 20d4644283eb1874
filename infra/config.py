"""The run config: one YAML file, one pydantic section per stage.

Every number in the stage specs (paper appendix A.1) is a default here, never a constant in
code. Unknown keys and bad values are rejected with the key path and the reason.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from infra.store import safe_part

_BUCKET = re.compile(r"^(\d+):(\d+)$")


class _Loader(yaml.SafeLoader):
    """YAML without YAML 1.1's base-60 numbers: `16:9` stays the string '16:9', not 969."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
               r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only


class ConfigError(ValueError):
    """A run config that cannot be used; the message names each key path and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_bucket(bucket: str) -> tuple[int, int]:
    m = _BUCKET.match(bucket)
    if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
        raise ValueError(f"bucket {bucket!r} is not of the form W:H (e.g. 16:9)")
    return int(m.group(1)), int(m.group(2))


Buckets = Annotated[list[str], Field(min_length=1)]


def _check_buckets(v: list[str]) -> list[str]:
    for b in v:
        parse_bucket(b)
    return v


class ManifestSource(Section):
    """A CSV/Parquet manifest of videos (OpenVid-1M's CSV layout: `video`, `caption`)."""

    manifest: str = Field(description="path or URL of the CSV/Parquet file")
    video_column: str = "video"
    caption_column: str | None = "caption"
    video_root: str | None = Field(
        None, description="folder/URL prefix that relative video names are resolved against"
    )


class DownloadConfig(Section):
    timeout_s: float = Field(60.0, gt=0, description="per-request connect/read timeout")
    max_bytes: int = Field(2_000_000_000, gt=0, description="size cap per downloaded video")
    retries: int = Field(3, ge=0, description="retries with backoff on transient errors")


class AcquireConfig(Section):
    """Select raw videos by metadata (paper A.1): 16-45 fps, 5-6 s, short edge >= 512."""

    sources: list[str | ManifestSource] = Field(default_factory=list)
    extensions: list[str] = [".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"]
    fps_min: float = Field(16.0, gt=0)
    fps_max: float = Field(45.0, gt=0)
    duration_min: float = Field(5.0, ge=0, description="seconds")
    duration_max: float = Field(6.0, gt=0, description="seconds")
    short_edge_min: int = Field(512, gt=0)
    long_edge_max: int = Field(4096, gt=0, description="larger frames (8K) are rejected")
    buckets: Buckets = ["16:9", "9:16", "3:4", "1:1"]
    aspect_tolerance: float = Field(
        0.12, gt=0, description="max |log(aspect / bucket)| to count as near a bucket"
    )
    download: DownloadConfig = DownloadConfig()
    workers: int = Field(2, ge=1)

    @field_validator("buckets")
    @classmethod
    def _buckets(cls, v: list[str]) -> list[str]:
        return _check_buckets(v)

    @model_validator(mode="after")
    def _ranges(self) -> "AcquireConfig":
        if self.fps_min > self.fps_max:
            raise ValueError(f"fps_min {self.fps_min} > fps_max {self.fps_max}")
        if self.duration_min > self.duration_max:
            raise ValueError(f"duration_min {self.duration_min} > duration_max {self.duration_max}")
        return self


class FilterSignals(Section):
    """How the one decode pass samples a video; changing these recomputes the scores."""

    short_edge: int = Field(256, ge=64, description="analysis frames are downscaled to this")
    motion_fps: float = Field(8.0, gt=0, description="frame pairs for optical flow per second")
    text_frames: int = Field(3, ge=1, description="frames sampled for OCR")
    text_side: int = Field(256, ge=32, description="OCR detector input (min side, px)")
    text_min_score: float = Field(0.6, ge=0, le=1, description="OCR confidence to count a box")
    cut_threshold: float = Field(27.0, gt=0, description="PySceneDetect ContentDetector threshold")
    still_diff: float = Field(0.6, ge=0, description="mean |diff| (0-255) below which a pair is still")


class FilterConfig(Section):
    """Quality filters (paper A.1). Thresholds only decide; scores are kept in the manifest."""

    signals: FilterSignals = FilterSignals()
    motion_min: float = Field(
        0.6, ge=0,
        description="static if the median top-2% optical-flow magnitude (px at short_edge, "
        "per 1/motion_fps s) is below this (VBench's static test, Farneback flow)",
    )
    max_cuts: int = Field(0, ge=0, description="hard cuts/transitions allowed per clip")
    flash_delta: float = Field(40.0, gt=0, description="luma jump (0-255) that counts as a flash")
    max_flashes: int = Field(0, ge=0)
    fade_fraction_max: float = Field(
        0.03, ge=0, le=1, description="max fraction of near-uniform black/white frames (fades)"
    )
    text_area_max: float = Field(
        0.04, ge=0, le=1, description="max fraction of the frame covered by detected text"
    )
    slideshow_still_min: float = Field(
        0.5, ge=0, le=1, description="slideshow if this fraction of frame pairs is still ..."
    )
    slideshow_images_min: int = Field(2, ge=2, description="... and it shows this many stills")
    min_decoded_fraction: float = Field(
        0.9, gt=0, le=1, description="truncated if fewer frames decode than this x expected"
    )
    workers: int = Field(2, ge=1)


class CaptionConfig(Section):
    """Prompt for clips without a source caption: a transformers VLM by hub id or local path."""

    model: str | None = Field(
        None,
        description="e.g. Salesforce/blip-image-captioning-large or a local folder; "
        "None rejects clips that have no source caption",
    )
    prompt: str | None = Field(None, description="text prompt for chat-style VLMs")
    max_new_tokens: int = Field(60, gt=0)
    device: str = "cpu"


class NormalizeConfig(Section):
    """GT spec (paper A.1): bucket crop, short edge 720, 16 fps, first 81 frames, H.264 yuv420p."""

    fps: float = Field(16.0, gt=0)
    frames: int = Field(81, gt=0)
    short_edge: int = Field(720, ge=16)
    buckets: Buckets = ["16:9", "9:16", "3:4", "1:1"]
    crf: int = Field(18, ge=0, le=51)
    preset: Literal[
        "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"
    ] = "medium"
    caption: CaptionConfig = CaptionConfig()
    workers: int = Field(2, ge=1)

    @field_validator("buckets")
    @classmethod
    def _buckets(cls, v: list[str]) -> list[str]:
        return _check_buckets(v)

    @field_validator("short_edge")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"short_edge {v} must be a multiple of 16 (the VAE/patch grid)")
        return v


# ---------------------------------------------------------------------------------------
# negatives -> pairs -> precompute (DESIGN "Negatives and pairs"; paper §3.1, A.1, A.2)
# ---------------------------------------------------------------------------------------

# The Wan kinds of models.wan.Kind, repeated here so a config loads without importing torch.
WanKind = Literal["t2v", "i2v", "i2v-2.2"]
WAN21_I2V_14B_720P = "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"
# The English negative prompt of diffusers' Wan examples (Wan's own default, translated).
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people "
    "in the background, walking backwards"
)


def _check_frames(v: int | None) -> int | None:
    if v is not None and (v - 1) % 4:
        raise ValueError(f"frames {v} must be 4k + 1 (Wan's VAE keeps frame 0 and packs the "
                         "rest 4 to a latent frame), e.g. 81, 49, 17, 5")
    return v


def _check_edge(v: int | None) -> int | None:
    if v is not None and v % 16:
        raise ValueError(f"short_edge {v} must be a multiple of 16 (VAE 8x and patch 2x)")
    return v


# Frame counts and sizes a Wan model can take (None = the GT clip's own).
WanFrames = Annotated[int | None, AfterValidator(_check_frames)]
WanEdge = Annotated[int | None, AfterValidator(_check_edge)]


class GeneratorConfig(Section):
    """One frozen base model that adds one negative per GT clip (the paper used five, A.1)."""

    name: str = Field(description="short name recorded in every row (`generator` column)")
    model: str = Field(WAN21_I2V_14B_720P, description="hub id or local diffusers folder")
    kind: WanKind = "i2v"
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

    mode: Literal["gt_pair", "local", "annotated"] = "gt_pair"
    annotated: AnnotatedConfig | None = None
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
        return self


class PrecomputeConfig(Section):
    """Pre-encoding (paper A.2): per pair UMT5 text, VAE latents of win and lose, and the I2V
    condition; training then needs neither the VAE nor the text encoder."""

    model: str | None = Field(None, description="the model to train (its VAE, UMT5 and CLIP): "
                              "hub id or local diffusers folder; None = train.model")
    kind: WanKind | None = Field(None, description="None = train.kind")
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


class RunConfig(Section):
    """A whole run: the store, the run name, and one section per stage."""

    name: str = "toy"
    store: str = "file://./artifacts"
    acquire: AcquireConfig = AcquireConfig()
    filter: FilterConfig = FilterConfig()
    normalize: NormalizeConfig = NormalizeConfig()
    negatives: NegativesConfig = NegativesConfig()
    pairs: PairsConfig = PairsConfig()
    precompute: PrecomputeConfig = PrecomputeConfig()
    train: Any = Field(None, description="the train stage: a tasks.train.TrainConfig, or None "
                       "when the run does not train")
    evaluate: Any = Field(None, description="the evaluate stage: a tasks.evaluate.EvaluateConfig, "
                          "or None when the run does not evaluate")

    @field_validator("train", "evaluate", mode="before")
    @classmethod
    def _lazy_section(cls, v: Any, info: ValidationInfo) -> Any:
        # Imported here, not at the top: tasks.train and tasks.evaluate import this module (a
        # cycle), and train pulls in torch and diffusers (~5 s), which configs without a train
        # section never need. Validation errors keep their key paths (train.loss.beta, ...).
        if v is None:
            return None
        if info.field_name == "train":
            from tasks.train import TrainConfig as section
        else:
            from tasks.evaluate import EvaluateConfig as section
        return section.model_validate(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        safe_part(v)
        return v

    @model_validator(mode="after")
    def _precompute_model(self) -> "RunConfig":
        # Pre-encoding is for the model that trains: one place names it, a mismatch is an error.
        pre, train = self.precompute, self.train
        if train is None:
            return self
        for field in ("model", "kind"):
            mine, theirs = getattr(pre, field), getattr(train, field)
            if mine is None:
                setattr(pre, field, theirs)
            elif mine != theirs:
                raise ValueError(f"precompute.{field} {mine!r} differs from train.{field} "
                                 f"{theirs!r}: latents must come from the model that trains; "
                                 f"drop precompute.{field} (it defaults to train's)")
        return self


STAGE_CONFIGS: dict[str, type[Section]] = {
    "acquire": AcquireConfig,
    "filter": FilterConfig,
    "normalize": NormalizeConfig,
    "negatives": NegativesConfig,
    "pairs": PairsConfig,
    "precompute": PrecomputeConfig,
}


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid run config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in {"str", "ManifestSource"})) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/toy.yaml for the valid keys)"
        got = e.get("input")
        shown = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {path}: {msg}{shown}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key path")
    return path, yaml_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a run config; relative local paths resolve against the file's folder."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            data = yaml_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"run config {path} not found (try configs/toy.yaml)") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"run config {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"run config {path}: top level must be a mapping of sections")
    data = apply_overrides(data, list(overrides or []))
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    if path is not None:
        cfg = _resolve_paths(cfg, Path(path).resolve().parent)
    return cfg


def _resolve(base: Path, value: str) -> str:
    if "://" in value or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def _resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    """Make local paths in the config absolute, relative to the config file (not the CWD)."""
    # The store stays relative to the working directory, like `./artifacts` in every CLI.
    sources: list[str | ManifestSource] = []
    for s in cfg.acquire.sources:
        if isinstance(s, str):
            sources.append(_resolve(base, s))
        else:
            sources.append(
                s.model_copy(update={
                    "manifest": _resolve(base, s.manifest),
                    "video_root": _resolve(base, s.video_root) if s.video_root else None,
                })
            )
    cfg.acquire.sources = sources
    model = cfg.normalize.caption.model
    if model and (model.startswith(".") or model.startswith("/")):
        cfg.normalize.caption.model = _resolve(base, model)
    if cfg.train is not None and cfg.train.model.startswith((".", "/")):
        cfg.train.model = _resolve(base, cfg.train.model)
    for generator in cfg.negatives.generators:
        if generator.model.startswith((".", "/")):
            generator.model = _resolve(base, generator.model)
    if cfg.precompute.model and cfg.precompute.model.startswith((".", "/")):
        cfg.precompute.model = _resolve(base, cfg.precompute.model)
    if cfg.pairs.annotated is not None:
        cfg.pairs.annotated.scores = _resolve(base, cfg.pairs.annotated.scores)
        cfg.pairs.annotated.video_root = _resolve(base, cfg.pairs.annotated.video_root)
    return cfg
