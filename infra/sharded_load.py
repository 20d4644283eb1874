"""Sharded loading of the frozen base under FSDP: no rank ever holds the whole model.

The plain path loads the full transformer in every process and shards it afterwards: 8 ranks
of a 14B model in bf16 hold 8 x 28 GB of host memory before the first step. Here, when
train.parallel.fsdp is on and there is more than one rank (`applies`), each rank instead

1. builds the transformer on the meta device (models.wan.empty_transformer: no weight memory,
   the same modules, dtypes, rope buffers and RNG draws as load_transformer),
2. adds the LoRA adapter (models.wan.add_lora allocates it on the CPU and draws the plain
   path's numbers for the same seed), then moves it and the buffers to the rank's device,
3. applies train.parallel's switches as the plain path does (infra.parallel.parallelize):
   FSDP2's fully_shard on meta parameters only records each rank's slice,
4. allocates its slices (empty) and reads them from the safetensors files with torch's
   distributed checkpoint reader for Hugging Face checkpoints (HuggingFaceStorageReader: a
   `safe_open(...).get_slice(...)` of the local rows of each tensor, converted to the model's
   dtype on copy).

Peak host memory per rank is thus its shard of the base plus what reading one file costs (the
pages that hold its rows, one slice in flight), not the model (tests/test_sharded_load.py measures it against a single-process load).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from diffusers import WanTransformer3DModel

from infra.config import LoraSection, ParallelConfig
from infra.distributed import Layout
from infra.parallel import parallelize
from models.wan import WanSpec, add_lora, empty_transformer, transformer_files


def applies(cfg: ParallelConfig, layout: Layout) -> bool:
    """Sharded loading is the loading of every FSDP layout (the one that shards the base)."""
    return cfg.fsdp and layout.world > 1


def load_policy(spec: WanSpec, lora: LoraSection, cfg: ParallelConfig, layout: Layout,
                adapt: Callable[[WanTransformer3DModel], None] | None = None
                ) -> WanTransformer3DModel:
    """The LoRA-wrapped, parallelized transformer of the plain path (load_transformer, add_lora,
    `adapt`, parallelize), each rank holding only its FSDP shard of the base. `adapt` sees the
    adapters on the CPU before anything moves or shards (a start adapter, a reference adapter)."""
    files = _checkpoint_files(spec)
    transformer = empty_transformer(spec)
    add_lora(transformer, rank=lora.rank, alpha=lora.alpha, targets=lora.targets,
             dropout=lora.dropout)
    if adapt is not None:
        adapt(transformer)
    device = layout.device
    transformer._apply(lambda t: t if t.is_meta else t.to(device))  # adapter, rope buffers
    parallelize(transformer, cfg, layout)
    # Each rank's slices, uninitialized (FSDP2's _apply re-registers its sharded parameters).
    transformer._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    _read_base(transformer, files[0].parent, spec)
    return transformer


def _checkpoint_files(spec: WanSpec) -> list[Path]:
    """The transformer's safetensors files; the distributed reader reads every *.safetensors in
    the folder, so the folder must hold no other (a variant, a stray copy)."""
    files = transformer_files(spec)
    folder = files[0].parent
    others = sorted({p.name for p in folder.glob("*.safetensors")} - {f.name for f in files})
    if others:
        raise ValueError(
            f"Wan transformer folder {str(folder)!r} of model {spec.model!r} holds safetensors "
            f"files that the model does not load ({', '.join(others)}); sharded loading "
            "(train.parallel.fsdp on several ranks) reads every *.safetensors file there: move "
            "them out of the folder")
    return files


def _read_base(transformer: torch.nn.Module, folder: Path, spec: WanSpec) -> None:
    """Fill the base weights (this rank's DTensor slices) from the checkpoint in `folder`."""
    state = {_checkpoint_key(name): tensor for name, tensor
             in transformer.state_dict(keep_vars=True).items() if "lora_" not in name}
    reader = dcp.HuggingFaceStorageReader(str(folder))
    stored = reader.read_metadata().state_dict_metadata
    missing, unexpected = sorted(state.keys() - stored.keys()), sorted(stored.keys() - state.keys())
    wrong = [k for k in state.keys() & stored.keys() if tuple(state[k].shape) != tuple(stored[k].size)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"Wan transformer weights in {str(folder)!r} (model {spec.model!r}) do not fit its "
            f"config.json: missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes "
            f"{sorted(wrong)[:5]}; the weights and config.json must come from one model")
    with torch.no_grad():
        dcp.load(state, storage_reader=reader)


def _checkpoint_key(name: str) -> str:
    """The checkpoint's name of a parameter of the LoRA-wrapped model: peft moves each target
    layer's own weights under `.base_layer`."""
    return name.replace(".base_layer.", ".")
