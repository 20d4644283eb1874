"""Wan video diffusion models through diffusers: the real components by hub id or local
folder, tiny random-weight builds of the same classes, and the LoRA policy/reference pair.

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
component asked for is fetched. `build_tiny` writes a folder with the same layout that loads
through exactly the same code.

The DPO reference model is the policy with its LoRA adapters disabled (`reference_mode`):
one copy of the weights in memory. No distributed code here; parallelism is applied from infra/.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, get_args

import diffusers
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from huggingface_hub import snapshot_download
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)
from transformers.utils import is_torchvision_available

WAN21_I2V_14B_720P = "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"
WAN21_T2V_14B = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
WAN21_T2V_1_3B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
WAN22_I2V_A14B = "Wan-AI/Wan2.2-I2V-A14B-Diffusers"

# Wan's flow-matching shift: larger at higher resolution (more tokens need more noise).
SHIFT_720P = 5.0
SHIFT_480P = 3.0

Kind = Literal["t2v", "i2v", "i2v-2.2"]
Pipeline = WanPipeline | WanImageToVideoPipeline

_HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")  # owner/name; "./x", "~/x", "/x" are paths
# Text tokens per prompt (the pipelines' max_sequence_length). Wan2.1 I2V attention splits its
# context as [image tokens, 512 text tokens] (diffusers' WanAttnProcessor hard-codes 512), so
# text embeddings must keep this padded length.
TEXT_LEN = 512


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
        if self.kind not in get_args(Kind):
            raise ValueError(f"Wan kind {self.kind!r} is not one of {get_args(Kind)}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"Wan dtype {self.dtype!r} is not a torch dtype (e.g. 'bfloat16')")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# ---------------------------------------------------------------------------------------
# Loading the real components
# ---------------------------------------------------------------------------------------


def _missing(spec: WanSpec, component: str, why: str) -> ValueError:
    if _is_hub_id(spec.model):
        how = (f"run `hf download {spec.model}` on a machine with network and copy its HF cache "
               "here (or set HF_HOME to it), or point the config's model at a local folder with "
               "the diffusers layout")
    else:
        how = (f"point the config's model at a local folder with the diffusers layout "
               f"(model_index.json, {component}/, ...), e.g. one written by "
               f"`hf download {WAN21_T2V_1_3B} --local-dir DIR` on a machine with network")
    return ValueError(f"Wan {component!r} of model {spec.model!r} is not available: {why}. "
                      f"To provide it, {how}.")


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
    # Without torchvision, transformers' CLIPImageProcessor falls back to the PIL one anyway.
    processor_cls = CLIPImageProcessor if is_torchvision_available() else CLIPImageProcessorPil
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
# Tiny random-weight builds of the same classes (tests, demo)
# ---------------------------------------------------------------------------------------

TINY_TEXT_DIM = 32  # UMT5 d_model = transformer text_dim
TINY_IMAGE_DIM = 32  # CLIP hidden size = transformer image_dim
TINY_IMAGE_SIZE = 32  # CLIP input side; 8-pixel patches -> 16 + 1 image tokens


def tiny_transformer_config(kind: Kind) -> dict[str, Any]:
    """A 2-block WanTransformer3DModel config with the real model's structure.

    attention_head_dim=12: rope splits it as t = 12 - 2*4 = 4, h = w = 2*(12 // 6) = 4, and
    every part must be even (complex pairs).
    """
    heads, head_dim = 2, 12
    config = dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                  in_channels=16, out_channels=16, text_dim=TINY_TEXT_DIM, freq_dim=32, ffn_dim=48,
                  num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                  rope_max_seq_len=64)
    if kind != "t2v":
        config["in_channels"] = 16 + 16 + 4  # noise + first-frame latent + 4 mask channels
    if kind == "i2v":  # CLIP tokens: image_dim -> inner dim, then the added K/V (inner -> inner)
        config.update(image_dim=TINY_IMAGE_DIM, added_kv_proj_dim=heads * head_dim)
    return config


def _tiny_tokenizer() -> T5Tokenizer:
    # A Unigram vocabulary like umt5's (pad=0, eos=1, unk=2, sentencepiece '▁' word starts),
    # built in memory: no download, deterministic.
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = "a the cat dog man woman walks runs on in street beach sky red blue video".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0) for w in words] + [(c, -3.0) for c in letters]
    vocab += [(f"▁{c}", -3.5) for c in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _tiny_text_encoder(vocab_size: int) -> UMT5EncoderModel:
    return UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def _tiny_vae() -> AutoencoderKLWan:
    # The real layout (3 spatial downsamples = 8x, 2 temporal = 4x, z_dim 16) with few channels.
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def _tiny_image_encoder() -> tuple[CLIPVisionModel, CLIPImageProcessorPil]:
    config = CLIPVisionConfig(hidden_size=TINY_IMAGE_DIM, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=TINY_IMAGE_SIZE, patch_size=8,
                              projection_dim=TINY_IMAGE_DIM)
    side = TINY_IMAGE_SIZE
    processor = CLIPImageProcessorPil(size={"shortest_edge": side},
                                      crop_size={"height": side, "width": side})
    return CLIPVisionModel(config), processor


def _tiny_scheduler() -> UniPCMultistepScheduler:
    # What Wan-AI's diffusers repos ship: UniPC over flow-matching sigmas.
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=1000, flow_shift=SHIFT_480P)


def build_tiny(kind: Kind, path: str | Path, seed: int = 0) -> str:
    """Write a random-weight Wan pipeline of `kind` in the diffusers layout to `path`.

    Same classes and folder layout as the hub repos, so `load_pipeline(WanSpec(kind, path))`
    takes the real loading path. Seeded without touching the caller's RNG. Returns the path.
    """
    WanSpec(kind, str(path))  # validates kind
    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts: dict[str, Any] = dict(
            tokenizer=tokenizer, text_encoder=_tiny_text_encoder(len(tokenizer)), vae=_tiny_vae(),
            scheduler=_tiny_scheduler(),
            transformer=WanTransformer3DModel(**tiny_transformer_config(kind)),
        )
        if kind == "t2v":
            pipe = WanPipeline(**parts)
        elif kind == "i2v":
            parts["image_encoder"], parts["image_processor"] = _tiny_image_encoder()
            pipe = WanImageToVideoPipeline(**parts)
        else:  # Wan2.2 A14B: a high-noise and a low-noise expert, switching at 0.9 * 1000
            parts["transformer_2"] = WanTransformer3DModel(**tiny_transformer_config(kind))
            pipe = WanImageToVideoPipeline(**parts, boundary_ratio=0.9)
    pipe.save_pretrained(str(path))
    return str(path)


# ---------------------------------------------------------------------------------------
# LoRA: the policy is base + adapter, the reference is the same module with it disabled
# ---------------------------------------------------------------------------------------

# Every attention projection (self, cross, and Wan2.1 I2V's image K/V) and both FFN layers
# of each WanTransformerBlock. Names are module-path suffixes; absent ones (add_k_proj in t2v)
# are simply not matched.
DEFAULT_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "ffn.net.0.proj", "ffn.net.2",
)


def add_lora(transformer: WanTransformer3DModel, rank: int = 16, alpha: float = 32,
             targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS, dropout: float = 0.0) -> None:
    """Freeze the transformer and add a trainable LoRA adapter ("default") through diffusers' PEFT
    integration. LoRA weights are float32 whatever the base dtype: updates of lr ~5e-6 would
    round away in bf16. B starts at zero, so the policy starts equal to the reference."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                       lora_dropout=dropout, init_lora_weights=True))
    for p in lora_parameters(transformer):
        p.data = p.data.float()


def lora_parameters(transformer: WanTransformer3DModel) -> list[torch.nn.Parameter]:
    """The adapter's parameters (the only ones that train)."""
    return [p for name, p in transformer.named_parameters() if "lora_" in name]


@contextmanager
def reference_mode(transformer: WanTransformer3DModel) -> Iterator[WanTransformer3DModel]:
    """Inside, the transformer is the frozen base model (adapters bypassed, bit-exact); the
    adapters are re-enabled on exit even if the body raises. Use under torch.no_grad()."""
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()  # also restores requires_grad on the LoRA weights


def save_lora(transformer: WanTransformer3DModel, directory: str | Path) -> Path:
    """Write the adapter as `pytorch_lora_weights.safetensors` in the format of diffusers'
    WanPipeline / WanImageToVideoPipeline `load_lora_weights`, with its LoraConfig (rank,
    alpha, targets) as metadata so the scale survives the round trip."""
    WanPipeline.save_lora_weights(
        str(directory),
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
    return Path(directory) / "pytorch_lora_weights.safetensors"


# ---------------------------------------------------------------------------------------
# Frozen encoders and generators for the data stages (negatives, precompute)
# ---------------------------------------------------------------------------------------
#
# Each helper runs the diffusers pipeline's own code on a pipeline object that holds only
# the components it needs, so an embedding or a condition here is bit for bit what
# WanPipeline / WanImageToVideoPipeline would compute inside __call__.


def load_generator(spec: WanSpec) -> Pipeline:
    """The pipeline without its text encoder: the negatives stage feeds it prompt embeddings
    computed once per prompt, so UMT5 never sits next to the transformer."""
    return load_pipeline(spec, text_encoder=False)


def component_identity(spec: WanSpec, component: str) -> str:
    """A digest of a component's files (names, sizes, configs, the ends of each weight shard)
    and the dtype it runs in: two models that ship the same UMT5 or VAE get the same identity,
    so their encodings are shared. Reads ~2 MiB per shard, never whole weights."""
    import hashlib

    root = _resolve(spec, component)
    h = hashlib.sha256(f"{component}|{spec.dtype}".encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.relative_to(root)}|{size}".encode())
        with open(path, "rb") as f:
            if size <= 4 << 20:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(size - (1 << 20))
                h.update(f.read())
    return h.hexdigest()[:32]


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
