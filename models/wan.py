"""Wan video diffusion models through diffusers: the real components by hub id or local
folder, and the LoRA policy/reference pair (tiny random-weight builds: models/tiny.py).

Three kinds (WanSpec.kind):
- t2v      Wan2.1 text-to-video: WanPipeline. The transformer sees 16 noise channels.
- i2v      Wan2.1 image-to-video: WanImageToVideoPipeline. The transformer sees 36 channels
           (16 noise + 16 first-frame latent + 4 mask) and, through its added K/V projections,
           the CLIP image tokens of the reference frame.
- i2v-2.2  Wan2.2 image-to-video (A14B): same 36 channels, no CLIP image encoder; two experts
           (`transformer` for high noise, `transformer_2` for low noise, split at boundary_ratio).

Every loader resolves its own subfolder to a local folder first (the path itself, or the
HF cache snapshot of a hub id) and fails at once with a ValueError when it is missing, so an
offline machine without the weights learns what to do before any retry loop starts. Only the
component asked for is fetched. models.tiny.build_tiny writes a folder with the same layout
that loads through exactly the same code.

The DPO reference model is the policy with its LoRA adapters disabled (`reference_mode`):
one copy of the weights in memory. No distributed code here; parallelism is applied from infra/.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import diffusers
import numpy as np
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.models.modeling_utils import no_init_weights
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub import constants as hub_constants
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    UMT5EncoderModel,
)
from transformers.utils import is_torchvision_available

from infra.weights import files_identity
from infra.config.wan import (  # noqa: F401  (re-exported: the model facts configs name)
    DEFAULT_TARGETS,
    KINDS,
    TEXT_LEN,
    WAN21_I2V_14B_720P,
    WAN21_T2V_1_3B,
    WAN21_T2V_14B,
    WAN22_I2V_A14B,
    Kind,
)

# Wan's flow-matching shift: larger at higher resolution (more tokens need more noise).
SHIFT_720P = 5.0
SHIFT_480P = 3.0

Pipeline = WanPipeline | WanImageToVideoPipeline

_HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")  # owner/name; "./x", "~/x", "/x" are paths


@dataclass(frozen=True)
class WanSpec:
    """Which Wan model to load."""

    kind: Kind
    """t2v (Wan2.1 text-to-video), i2v (Wan2.1 image-to-video, CLIP image tokens),
    i2v-2.2 (Wan2.2 image-to-video: first-frame latent only, no CLIP)."""
    model: str
    """A hub id (e.g. WAN21_I2V_14B_720P) or a local folder with the diffusers layout."""
    dtype: str = "bfloat16"
    """Dtype of the transformer(s) and the text encoder; the VAE and CLIP stay float32."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Wan kind {self.kind!r} is not one of {KINDS}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"Wan dtype {self.dtype!r} is not a torch dtype (e.g. 'bfloat16')")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# ---------------------------------------------------------------------------------------
# Loading the real components
# ---------------------------------------------------------------------------------------


def _missing(spec: WanSpec, component: str | None, why: str) -> ValueError:
    if _is_hub_id(spec.model):
        how = (f"run `hf download {spec.model}` on a machine with network and copy its HF cache "
               "here (or set HF_HOME to it), or point the config's model at a local folder with "
               "the diffusers layout")
    else:
        how = (f"point the config's model at a local folder with the diffusers layout "
               f"(model_index.json, {(component or 'transformer').removesuffix('.json')}/, ...), "
               "e.g. one written by "
               f"`hf download {WAN21_T2V_1_3B} --local-dir DIR` on a machine with network")
    what = f"Wan {component!r} of model" if component else "Wan model"
    return ValueError(f"{what} {spec.model!r} is not available: {why}. To provide it, {how}.")


def _is_hub_id(model: str) -> bool:
    return _HUB_ID.fullmatch(model) is not None and not Path(model).exists()


def _resolve(spec: WanSpec, component: str) -> Path:
    """The local path of `component` (a subfolder or model_index.json) of spec.model."""
    root = Path(spec.model).expanduser()
    if _is_hub_id(spec.model):
        pattern = component if component.endswith(".json") else f"{component}/*"
        try:  # offline (HF_HUB_OFFLINE=1) this only reads the cache: no network, no retries
            root = Path(snapshot_download(spec.model, allow_patterns=[pattern]))
        except Exception as e:  # hub errors are many types; all mean "not here"
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            why = f"not in the HF cache and not downloadable ({reason})"
            raise _missing(spec, component, why) from e
    elif not root.is_dir():
        raise _missing(spec, component, f"no folder {str(root)!r}")
    path = root / component
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        raise _missing(spec, component, f"{str(root)!r} has no {component}")
    return path


def components(kind: Kind) -> tuple[str, ...]:
    """What a run loads of a Wan model of `kind`: the pipeline's parts (the data stages encode
    and generate with them, train reads the transformer and the scheduler)."""
    parts = ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    return parts + (("image_encoder", "image_processor") if kind == "i2v" else ())


def check_available(spec: WanSpec) -> str | None:
    """Why `spec.model` cannot be loaded here, or None; downloads nothing. A local folder must
    hold every component of its kind; a hub id must be in the HF cache, or (online only) exist
    on the hub, where the stage's loader will fetch it."""
    if not _is_hub_id(spec.model):
        try:
            for component in components(spec.kind):
                _resolve(spec, component)
        except ValueError as e:
            return str(e)
        return None
    try:
        root = Path(snapshot_download(spec.model, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - every miss means "not in the cache"
        reason = type(e).__name__
    else:
        missing = [c for c in components(spec.kind) if not (root / c).exists()]
        if not missing:
            return None
        reason = f"the cached snapshot has no {', '.join(missing)}"
    if hub_constants.HF_HUB_OFFLINE:
        return str(_missing(spec, None, f"not in the HF cache with HF_HUB_OFFLINE=1 ({reason})"))
    try:
        HfApi().model_info(spec.model, timeout=15)
    except Exception as e:  # noqa: BLE001 - not on the hub, private, or no network
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return str(_missing(spec, None, f"not in the HF cache and not reachable on the hub ({line})"))
    return None


def _read_json(spec: WanSpec, relpath: str) -> dict[str, Any]:
    """A JSON file of the model, e.g. "model_index.json" or "transformer/config.json"."""
    component = relpath.split("/")[0]
    path = _resolve(spec, component).parent / relpath
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _missing(spec, component, f"cannot read {str(path)!r} ({e})") from e


def _from_pretrained(spec: WanSpec, component: str, cls: Any, **kwargs: Any) -> Any:
    path = _resolve(spec, component)
    try:
        return cls.from_pretrained(path, **kwargs)
    except OSError as e:  # a folder without its weight or config files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        raise _missing(spec, component, reason) from e


def _check_kind(spec: WanSpec, subfolder: str, config: dict[str, Any]) -> None:
    in_channels = 16 if spec.kind == "t2v" else 36
    has_clip = spec.kind == "i2v"
    got_channels, image_dim = config.get("in_channels"), config.get("image_dim")
    if got_channels != in_channels or (image_dim is not None) != has_clip:
        raise ValueError(
            f"Wan {subfolder!r} of model {spec.model!r} does not fit kind {spec.kind!r}: it has "
            f"in_channels={got_channels}, image_dim={image_dim}, the kind "
            f"needs in_channels={in_channels} and {'an' if has_clip else 'no'} image_dim; "
            "fix the kind or the model in the config")


def load_transformer(spec: WanSpec, subfolder: str = "transformer") -> WanTransformer3DModel:
    """The denoiser in spec.dtype. Wan2.2 A14B also has `transformer_2` (low-noise expert)."""
    # Check the config before reading (up to 14B parameters of) weights.
    _check_kind(spec, subfolder, _read_json(spec, f"{subfolder}/config.json"))
    return _from_pretrained(spec, subfolder, WanTransformer3DModel, torch_dtype=spec.torch_dtype,
                            use_safetensors=True)


def empty_transformer(spec: WanSpec, subfolder: str = "transformer") -> WanTransformer3DModel:
    """The denoiser as load_transformer builds it, without reading a weight: every parameter on
    the meta device in the dtype load_transformer gives it (spec.dtype; float32 in the model's
    `_keep_in_fp32_modules`), the non-persistent buffers (rope) computed, eval mode. Built the way
    diffusers' from_pretrained builds a model before filling it (default dtype, no init,
    accelerate's init_empty_weights), so it draws what load_transformer draws from torch's RNG
    (`scale_shift_table` comes from torch.randn) and a LoRA added next starts from the same RNG
    state. For loaders that fill the weights themselves (infra.sharded_load)."""
    path = _resolve(spec, subfolder)
    config = WanTransformer3DModel.load_config(path)
    _check_kind(spec, subfolder, config)
    default = torch.get_default_dtype()
    torch.set_default_dtype(spec.torch_dtype)
    try:
        with no_init_weights(), init_empty_weights():
            model = WanTransformer3DModel.from_config(config)
    finally:
        torch.set_default_dtype(default)
    keep = WanTransformer3DModel._keep_in_fp32_modules or []
    for name, param in model.named_parameters():  # diffusers' load_model_dict_into_meta rule
        if any(module in name.split(".") for module in keep):
            param.data = param.data.float()
    return model.eval()


def transformer_files(spec: WanSpec, subfolder: str = "transformer") -> list[Path]:
    """The safetensors files load_transformer reads: the shards that the index
    (diffusion_pytorch_model.safetensors.index.json) names, else the one
    diffusion_pytorch_model.safetensors."""
    folder = _resolve(spec, subfolder)
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = _read_json(spec, f"{subfolder}/{SAFE_WEIGHTS_INDEX_NAME}").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise _missing(spec, subfolder, f"{str(index)!r} has no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = [folder / SAFETENSORS_WEIGHTS_NAME]
    if absent := [f.name for f in files if not f.is_file()]:
        raise _missing(spec, subfolder, f"{str(folder)!r} has no {', '.join(absent)}")
    return files


def load_vae(spec: WanSpec) -> AutoencoderKLWan:
    """The video VAE, float32 (Wan's VAE is numerically fragile in bf16)."""
    return _from_pretrained(spec, "vae", AutoencoderKLWan, torch_dtype=torch.float32,
                            use_safetensors=True)


def load_text_encoder(spec: WanSpec) -> tuple[UMT5EncoderModel, Any]:
    """(UMT5 encoder in spec.dtype, its tokenizer)."""
    tokenizer = _from_pretrained(spec, "tokenizer", AutoTokenizer)
    encoder = _from_pretrained(spec, "text_encoder", UMT5EncoderModel, dtype=spec.torch_dtype,
                               use_safetensors=True)
    return encoder, tokenizer


def load_image_encoder(spec: WanSpec) -> tuple[CLIPVisionModel, Any]:
    """(CLIP vision encoder in float32, its image processor); Wan2.1 I2V only."""
    if spec.kind != "i2v":
        raise ValueError(f"Wan kind {spec.kind!r} ({spec.model!r}) has no CLIP image encoder; "
                         "only Wan2.1 I2V (kind 'i2v') conditions on CLIP image tokens")
    # Without torchvision, transformers' CLIPImageProcessor falls back to the PIL one anyway
    # (and warns about it on import): name it only when torchvision is there.
    if is_torchvision_available():
        from transformers import CLIPImageProcessor as processor_cls
    else:
        processor_cls = CLIPImageProcessorPil
    processor = _from_pretrained(spec, "image_processor", processor_cls)
    encoder = _from_pretrained(spec, "image_encoder", CLIPVisionModel, dtype=torch.float32,
                               use_safetensors=True)
    return encoder, processor


def load_scheduler(spec: WanSpec) -> SchedulerMixin:
    """The inference scheduler the model ships (UniPC with flow sigmas for Wan-AI's repos)."""
    name = _read_json(spec, "scheduler/scheduler_config.json").get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"Wan scheduler of {spec.model!r} names {name!r}, "
                         "which is not a diffusers scheduler")
    return _from_pretrained(spec, "scheduler", cls)


def training_scheduler(spec: WanSpec,
                       shift: float | None = None) -> FlowMatchEulerDiscreteScheduler:
    """Flow-matching sigmas for training: sigma(t) shifted as in Wan (SHIFT_720P / SHIFT_480P).

    `shift` defaults to the flow_shift of the model's own scheduler config.
    """
    config = load_scheduler(spec).config
    shift = config.get("flow_shift", SHIFT_480P) if shift is None else shift
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.num_train_timesteps,
                                           shift=shift)


def load_pipeline(spec: WanSpec, text_encoder: bool = True) -> Pipeline:
    """WanPipeline (t2v) or WanImageToVideoPipeline (i2v, i2v-2.2) built from the loaders above.
    `text_encoder=False` leaves UMT5 and its tokenizer out, for callers that pass prompt
    embeddings computed once per prompt (UMT5 is ~11 GB for Wan2.1 14B)."""
    index = _read_json(spec, "model_index.json")
    has_expert_2 = (index.get("transformer_2") or [None])[0] is not None
    encoder, tokenizer = load_text_encoder(spec) if text_encoder else (None, None)
    parts: dict[str, Any] = dict(
        tokenizer=tokenizer, text_encoder=encoder, vae=load_vae(spec),
        scheduler=load_scheduler(spec), transformer=load_transformer(spec),
        transformer_2=load_transformer(spec, "transformer_2") if has_expert_2 else None,
        boundary_ratio=index.get("boundary_ratio"),
        expand_timesteps=index.get("expand_timesteps", False),
    )
    if spec.kind == "t2v":
        return WanPipeline(**parts)
    if spec.kind == "i2v":
        parts["image_encoder"], parts["image_processor"] = load_image_encoder(spec)
    return WanImageToVideoPipeline(**parts)


# ---------------------------------------------------------------------------------------
# LoRA: the policy is base + adapter, the reference is the same module with it disabled
# ---------------------------------------------------------------------------------------



def add_lora(transformer: WanTransformer3DModel, rank: int = 16, alpha: float = 32,
             targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS, dropout: float = 0.0) -> None:
    """Freeze the transformer and add a trainable LoRA adapter ("default") through diffusers' PEFT
    integration. LoRA weights are float32 whatever the base dtype: updates of lr ~5e-6 would
    round away in bf16. B starts at zero, so the policy starts equal to the reference. On a
    transformer built on the meta device (empty_transformer) the adapter is on the CPU."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                       lora_dropout=dropout, init_lora_weights=True))
    for p in lora_parameters(transformer):
        p.data = p.data.float()
    _init_lora(transformer)


def _init_lora(transformer: WanTransformer3DModel) -> None:
    """Draw the adapter's starting weights from torch's RNG with peft's own initializer (A
    Kaiming-uniform as nn.Linear, B = 0) where peft put them: on the base layer's device, except
    on a base built on the meta device (infra.sharded_load), where they are allocated on the
    CPU first. peft's own draws came before (and, on meta, were dropped), so a seed gives the
    same adapter whether the base was loaded on the CPU or built on the meta device."""
    _materialize_meta_adapters(transformer)
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_A:
                module.reset_lora_parameters(name, init_lora_weights=True)


def _materialize_meta_adapters(transformer: WanTransformer3DModel) -> None:
    """Allocate (uninitialized, on the CPU) every adapter weight peft left on the meta device
    because its base layer is there; adapters that already hold values keep them."""
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            for name in module.adapter_layer_names:
                for adapter in getattr(module, name).values():
                    if isinstance(adapter, torch.nn.Module) and any(
                            p.is_meta for p in adapter.parameters()):
                        adapter.to_empty(device="cpu")


def lora_parameters(transformer: WanTransformer3DModel,
                    adapter: str | None = "default") -> list[torch.nn.Parameter]:
    """The parameters of one adapter: "default" is the one that trains; None = every adapter
    (with a frozen reference adapter too, see add_reference_adapter)."""
    return [p for name, p in transformer.named_parameters()
            if "lora_" in name and (adapter is None or f".{adapter}." in name)]


REFERENCE_ADAPTER = "reference"


def add_reference_adapter(transformer: WanTransformer3DModel) -> None:
    """A second adapter, frozen, with the trained adapter's LoraConfig: the reference when it is
    the previous policy (Dual-IPO round r: base + round r−1's adapter) instead of the base.
    Load its weights with infra.checkpoint.load_adapter(..., adapter=REFERENCE_ADAPTER);
    `reference_mode` then activates it in place of disabling the adapters."""
    with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        transformer.add_adapter(copy.deepcopy(transformer.peft_config["default"]),
                                REFERENCE_ADAPTER)
    transformer.set_adapter("default")  # add_adapter activated the new one
    _materialize_meta_adapters(transformer)  # a meta base (sharded loading): load fills it next
    for p in lora_parameters(transformer, REFERENCE_ADAPTER):
        p.data = p.data.float()
        p.requires_grad_(False)


@contextmanager
def reference_mode(transformer: WanTransformer3DModel) -> Iterator[WanTransformer3DModel]:
    """Inside, the transformer is the reference: the frozen base model (adapters bypassed,
    bit-exact), or base + the frozen reference adapter when there is one. The trained adapter
    is active again on exit even if the body raises. Use under torch.no_grad()."""
    if REFERENCE_ADAPTER in (getattr(transformer, "peft_config", None) or {}):
        transformer.set_adapter(REFERENCE_ADAPTER)
        try:
            yield transformer
        finally:  # peft's set_adapter: the active adapter trains, the others are frozen
            transformer.set_adapter("default")
        return
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()  # also restores requires_grad on the LoRA weights


def save_lora(transformer: WanTransformer3DModel, directory: str | Path) -> Path:
    """Write the adapter as `pytorch_lora_weights.safetensors` in the format of diffusers'
    WanPipeline / WanImageToVideoPipeline `load_lora_weights`, with its LoraConfig (rank,
    alpha, targets) as metadata so the scale survives the round trip. The bytes depend only
    on the weights and the config (same run twice => same file)."""
    WanPipeline.save_lora_weights(
        str(directory),
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=_plain(transformer.peft_config["default"].to_dict()),
    )
    path = Path(directory) / "pytorch_lora_weights.safetensors"
    path.write_bytes(canonical_safetensors(path.read_bytes()))
    return path


def _plain(value: Any) -> Any:
    """The config with every set as a sorted list (peft keeps target_modules in a set, whose
    order follows the process's hash seed)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its header as JSON with sorted keys: safetensors writes
    `__metadata__` in a hash map's order, which differs from process to process. The tensor
    data (laid out by dtype, then name) is kept as it is."""
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data stays 8-byte aligned
    return len(header).to_bytes(8, "little") + header + data[8 + size:]


# ---------------------------------------------------------------------------------------
# Frozen encoders and generators for the data stages (negatives, precompute)
# ---------------------------------------------------------------------------------------
#
# Each helper runs the diffusers pipeline's own code on a pipeline object that holds only
# the components it needs, so an embedding or a condition here is bit for bit what
# WanPipeline / WanImageToVideoPipeline would compute inside __call__.


def generate_video(pipe: Pipeline, prompt: str, seed: int, size: tuple[int, int, int], *,
                   steps: int, guidance: float, negative_prompt: str | None = None,
                   image: Any = None) -> np.ndarray:
    """One video from a Wan pipeline's own __call__ (`image` for I2V): uint8 RGB [F, H, W, 3] at
    size (width, height, frames). The noise comes from a CPU generator seeded `seed`, so a
    seed gives the same video on any device and in any batch."""
    width, height, frames = size
    kwargs: dict[str, Any] = dict(
        prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
        num_frames=frames, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
        generator=torch.Generator(device="cpu").manual_seed(seed))
    if image is not None:
        kwargs["image"] = image
    with torch.no_grad():
        video = pipe(**kwargs).frames[0]
    return (np.clip(np.asarray(video, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)


def load_generator(spec: WanSpec) -> Pipeline:
    """The pipeline without its text encoder: the negatives stage feeds it prompt embeddings
    computed once per prompt, so UMT5 never sits next to the transformer."""
    return load_pipeline(spec, text_encoder=False)


def component_identity(spec: WanSpec, component: str) -> str:
    """A digest of a component's files (names, sizes, configs, the ends of each weight shard)
    and the dtype it runs in: two models that ship the same UMT5 or VAE get the same identity,
    so their encodings are shared. Reads ~2 MiB per shard, never whole weights."""
    return files_identity(_resolve(spec, component), f"{component}|{spec.dtype}")


def transformer_config(spec: WanSpec) -> dict[str, Any]:
    """The transformer's config.json, read without loading (up to 14B of) weights."""
    try:
        return dict(WanTransformer3DModel.load_config(spec.model, subfolder="transformer"))
    except OSError:
        load_transformer(spec)  # raises models.wan's error: what is missing and how to get it
        raise


@torch.no_grad()
def encode_prompts(encoder: UMT5EncoderModel, tokenizer: Any, prompts: list[str],
                   device: torch.device | str) -> torch.Tensor:
    """[B, TEXT_LEN, text_dim] UMT5 embeddings, cleaned, truncated and zero-padded exactly as
    the Wan pipelines' encode_prompt does (max_sequence_length = 512)."""
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, scheduler=None,
                       transformer=None)
    embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                   max_sequence_length=TEXT_LEN, device=torch.device(device),
                                   dtype=encoder.dtype)
    return embeds


@torch.no_grad()
def encode_image(encoder: CLIPVisionModel, processor: Any, image: Any,
                 device: torch.device | str) -> torch.Tensor:
    """[N, image_dim] CLIP penultimate hidden states of one reference image (Wan2.1 I2V's
    encode_image)."""
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                                   image_processor=processor, image_encoder=encoder,
                                   transformer=None)
    return pipe.encode_image(image, torch.device(device))[0]


def latent_stats(vae: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents_mean, latents_std) as [1, z_dim, 1, 1, 1]: the pipelines normalize a latent as
    (z - mean) / std before the transformer sees it."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    return (torch.tensor(vae.config.latents_mean).view(shape),
            torch.tensor(vae.config.latents_std).view(shape))


@torch.no_grad()
def encode_video(vae: AutoencoderKLWan, frames: torch.Tensor) -> torch.Tensor:
    """Normalized latent [z_dim, F', H/8, W/8] of uint8 frames [F, H, W, 3] (F = 4k + 1).

    The distribution's mode (as WanImageToVideoPipeline encodes its condition), so the same
    video always gives the same latent and the encoding can be content-addressed."""
    device = next(vae.parameters()).device
    x = frames.to(device=device, dtype=vae.dtype).permute(3, 0, 1, 2)[None] / 127.5 - 1.0
    z = vae.encode(x).latent_dist.mode()
    mean, std = latent_stats(vae)
    return ((z - mean.to(z)) / std.to(z))[0].float().cpu()


@torch.no_grad()
def decode_latent(vae: AutoencoderKLWan, latent: torch.Tensor) -> torch.Tensor:
    """uint8 frames [F, H, W, 3] of a normalized latent [z_dim, F', H', W'] (the pipelines'
    un-normalize + decode + postprocess)."""
    device = next(vae.parameters()).device
    mean, std = latent_stats(vae)
    z = latent[None].to(device=device, dtype=vae.dtype) * std.to(device, vae.dtype)
    video = vae.decode(z + mean.to(device, vae.dtype), return_dict=False)[0][0]
    video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(1, 2, 3, 0).cpu()


@torch.no_grad()
def image_condition(vae: AutoencoderKLWan, image: Any, height: int, width: int,
                    num_frames: int) -> torch.Tensor:
    """The I2V condition [4 + z_dim, F', H/8, W/8]: the first-frame mask channels, then the
    normalized latent of the reference frame followed by zero frames — built by
    WanImageToVideoPipeline.prepare_latents itself."""
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=None,
                                   image_processor=None, image_encoder=None, transformer=None)
    device = next(vae.parameters()).device
    pixels = pipe.video_processor.preprocess(image, height=height, width=width)
    _, condition = pipe.prepare_latents(pixels.to(device, torch.float32), 1, vae.config.z_dim,
                                        height, width, num_frames, torch.float32, device)
    return condition[0].cpu()


def component_config(spec: WanSpec, component: str) -> dict[str, Any]:
    """`<component>/config.json` of the model (e.g. "vae", "text_encoder"), without weights."""
    return _read_json(spec, f"{component}/config.json")
