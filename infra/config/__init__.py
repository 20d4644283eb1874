"""The run config as a tree of small typed sections, importing neither torch nor any stage.

    base      Section, YAML loading, buckets, ConfigError
    wan       Wan kinds, hub ids, frame and size rules
    curate    acquire, filter, normalize
    pairs     negatives, pairs, precompute
    train     loss, LoRA, optimizer, parallel layout, checkpoints
    evaluate  sampling, VBench, proxy metrics
    critic    the Dual-IPO critic and SRPO
    ipo       Dual-IPO rounds: sample, critique, scored-pairs thresholds
    runner    where the item-parallel stages run (threads, a Dask cluster)
    run       RunConfig (one field per stage), load_config, --set overrides
"""

from infra.config.base import Buckets, ConfigError, Section, parse_bucket, yaml_load
from infra.config.curate import (AcquireConfig, CaptionConfig, DownloadConfig, FilterConfig,
                                 FilterSignals, ManifestSource, NormalizeConfig)
from infra.config.evaluate import (BASE, DIMENSIONS, EvaluateConfig, GenerateConfig, ProxyConfig,
                                   VBenchConfig)
from infra.config.critic import CriticConfig, SrpoConfig
from infra.config.ipo import (CritiqueConfig, IpoConfig, SampleConfig, ScoredPairsConfig)
from infra.config.pairs import (AnnotatedConfig, GeneratorConfig, LocalCorruptConfig,
                                NegativesConfig, PairsConfig, PrecomputeConfig)
from infra.config.runner import RunnerConfig, store_problem
from infra.config.run import (SECTION_PATHS, STAGE_CONFIGS, RunConfig, apply_overrides, load_config,
                              load_section, parse_override)
from infra.config.train import (CheckpointConfig, ContextParallelSection, LoraSection,
                                LossConfig, OptimizerConfig, ParallelConfig, TrainConfig)
from infra.config.wan import Kind

__all__ = [
    "CriticConfig", "CritiqueConfig", "IpoConfig", "SampleConfig", "ScoredPairsConfig",
    "SECTION_PATHS", "SrpoConfig",
    "AcquireConfig", "AnnotatedConfig", "BASE", "Buckets", "CaptionConfig", "CheckpointConfig",
    "ConfigError", "ContextParallelSection", "DIMENSIONS", "DownloadConfig", "EvaluateConfig", "FilterConfig",
    "FilterSignals", "GenerateConfig", "GeneratorConfig", "Kind", "LocalCorruptConfig",
    "LoraSection", "LossConfig", "ManifestSource", "NegativesConfig", "NormalizeConfig",
    "OptimizerConfig", "PairsConfig", "ParallelConfig", "PrecomputeConfig", "ProxyConfig",
    "RunConfig", "RunnerConfig", "STAGE_CONFIGS", "Section", "TrainConfig", "VBenchConfig", "apply_overrides",
    "load_config", "load_section", "parse_bucket", "parse_override", "store_problem",
    "yaml_load",
]
