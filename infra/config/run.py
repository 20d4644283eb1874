"""The run config: one YAML file, one typed section per stage (docs/architecture.md, "Config").

Every number in the stage specs (paper appendix A.1) is a default here, never a constant in
code. Unknown keys and bad values are rejected with the key path and the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from infra.config.base import ConfigError, Section, yaml_load
from infra.config.curate import AcquireConfig, FilterConfig, ManifestSource, NormalizeConfig
from infra.config.evaluate import EvaluateConfig
from infra.config.critic import SrpoConfig
from infra.config.ipo import CritiqueConfig, IpoConfig, SampleConfig
from infra.config.pairs import NegativesConfig, PairsConfig, PrecomputeConfig
from infra.config.runner import RunnerConfig, store_problem
from infra.config.train import TrainConfig
from infra.store import StoreError, check_store_url, safe_part


class RunConfig(Section):
    """A whole run: the store, the run name, and one section per stage."""

    name: str = Field("toy", description="the run's name: runs/<name>/ in the store")
    store: str = Field("file://./artifacts", description="artifact store URL: file://… or "
                       "s3://bucket/prefix (credentials from the environment, never here)")
    runner: RunnerConfig = Field(RunnerConfig(), description="where the items of acquire, "
                                 "filter, normalize and evaluate's scoring run: threads, or a "
                                 "Dask cluster (the store must be one its workers reach)")
    acquire: AcquireConfig = AcquireConfig()
    filter: FilterConfig = FilterConfig()
    normalize: NormalizeConfig = NormalizeConfig()
    negatives: NegativesConfig = NegativesConfig()
    pairs: PairsConfig = PairsConfig()
    precompute: PrecomputeConfig = PrecomputeConfig()
    train: TrainConfig | None = Field(None, description="the train stage; None = the run does "
                                      "not train")
    evaluate: EvaluateConfig | None = Field(None, description="the evaluate stage; None = the "
                                            "run does not evaluate")
    ipo: IpoConfig | None = Field(None, description="Dual-IPO rounds (flows/ipo.py): sample, "
                                  "critique, scored pairs, then this config's precompute, train "
                                  "and evaluate, once per round; None = not a Dual-IPO run")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        safe_part(v)
        return v

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        try:
            return check_store_url(v)
        except StoreError as e:  # a ValueError for pydantic: a key-path error, not a traceback
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _shared_store(self) -> "RunConfig":
        if why := store_problem(self.runner, self.store):
            raise ValueError(why)
        return self

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

    @model_validator(mode="after")
    def _ipo(self) -> "RunConfig":
        if self.ipo is None:
            return self
        if self.train is None:
            raise ValueError("ipo needs a `train` section: its model is the policy that samples "
                             "each round and the round's adapter trains it")
        if self.train.kind != "t2v" and self.train.kind != "i2v":
            raise ValueError(f"ipo samples with train.model, a Wan2.1 t2v or i2v model (got "
                             f"train.kind {self.train.kind!r})")
        if self.train.init_adapter is not None:
            raise ValueError("ipo sets train.init_adapter itself (round r starts from round "
                             "r-1's adapter); drop train.init_adapter")
        return self


STAGE_CONFIGS: dict[str, type[Section]] = {
    "acquire": AcquireConfig,
    "filter": FilterConfig,
    "normalize": NormalizeConfig,
    "negatives": NegativesConfig,
    "pairs": PairsConfig,
    "precompute": PrecomputeConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    # Dual-IPO's own stages (sections under `ipo`, SECTION_PATHS)
    "sample": SampleConfig,
    "critique": CritiqueConfig,
    "refine": SrpoConfig,
}
# Stages whose section is not the RunConfig field of their name.
SECTION_PATHS: dict[str, tuple[str, ...]] = {"sample": ("ipo", "sample"),
                                             "critique": ("ipo", "critique"),
                                             "refine": ("ipo", "srpo")}


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid run config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"] if not _is_type_tag(p)) or "<root>"
        msg = e["msg"]
        if e["type"] == "value_error" and "error" in e.get("ctx", {}):
            msg = str(e["ctx"]["error"])  # the validator's own words, without "Value error, "
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/toy.yaml for the valid keys)"
        got = e.get("input")
        # A store URL is never repeated: the value that failed may be the credential.
        secret = bool(e["loc"]) and e["loc"][0] == "store"
        shown = "" if secret or e["type"] == "extra_forbidden" or isinstance(got, dict) \
            else f" (got {got!r:.80})"
        lines.append(f"  {path}: {msg}{shown}")
    return "\n".join(lines)


def _is_type_tag(part: Any) -> bool:
    """pydantic names the member of a union it tried (`str`, `float`, `literal['dgr']`): not a key."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "ManifestSource"}
                                      or "[" in part)


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


def load_section(cls: type[Section], data: dict, source: str) -> Section:
    """One section from plain data, errors as for a whole config (key paths, no traceback)."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a run config; relative local paths resolve against the file's folder.
    Every way a file can be unusable is a ConfigError naming it (never a traceback)."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        data = _read_yaml(Path(path))
    data = apply_overrides(data, list(overrides or []))
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    except RecursionError:
        raise ConfigError(f"run config {source} is nested too deeply to be a run config") from None
    if path is not None:
        cfg = _resolve_paths(cfg, Path(path).resolve().parent)
    return cfg


MAX_CONFIG_BYTES = 1 << 20  # a run config is a few KB; a bigger file is not one


def _read_yaml(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"run config {path} is over {MAX_CONFIG_BYTES} bytes: not a run config")
        data = yaml_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"run config {path} not found (try configs/toy.yaml)") from None
    except (IsADirectoryError, PermissionError) as e:
        raise ConfigError(f"run config {path} cannot be read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"run config {path} is not UTF-8 text (byte {e.start}): save it as "
                          "UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"run config {path} is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"run config {path} is nested too deeply to be a run config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"run config {path}: top level must be a mapping of sections")
    return data


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
    if cfg.ipo is not None and cfg.ipo.critique.critic.model.startswith((".", "/")):
        cfg.ipo.critique.critic.model = _resolve(base, cfg.ipo.critique.critic.model)
    if cfg.ipo is not None and cfg.ipo.critique.human_labels:
        cfg.ipo.critique.human_labels = _resolve(base, cfg.ipo.critique.human_labels)
    if cfg.ipo is not None and cfg.ipo.srpo.seed_data:
        cfg.ipo.srpo.seed_data = _resolve(base, cfg.ipo.srpo.seed_data)
    if cfg.pairs.annotated is not None:
        cfg.pairs.annotated.scores = _resolve(base, cfg.pairs.annotated.scores)
        cfg.pairs.annotated.video_root = _resolve(base, cfg.pairs.annotated.video_root)
    return cfg
