"""negatives: the rejected video of each preference pair, made from a GT clip.

- gt_pair (Reg-DPO §3.1, A.1): the frozen base model generates from the GT clip's reference
  frame and prompt (I2V, WanImageToVideoPipeline) or its prompt (T2V, WanPipeline). Several
  generator models may each add one negative per clip (the paper used five).
- local_corrupt (LocalDPO, paper 002): random spatio-temporal boxes over the GT latent are
  re-noised to a strength and the frozen base model reconstructs only them; outside the boxes
  the latent is pinned to the GT's at every step, so it ends exactly equal to the GT latent.
  One inference per clip; the mask is kept (latent grid + a pixel video for viewing).

Every output goes through infra.gtspec.renormalize (normalize_file, the code that made the GT clips) to
the GT clip's exact spec (fps, frames, bucket, size), and is probed there. Prompts are
embedded once per text encoder (tasks.precompute.encode_prompts) before any generator loads.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from infra.config import GeneratorConfig, LocalCorruptConfig, NormalizeConfig
from infra.store import Store, digest
from infra.encoded import read_tensor
from infra.stage import save_row
from infra.gtspec import renormalize, size_in_bucket
from infra.video import X264_THREADS, probe, read_frames, reference_image, write_video
from models import wan
from models.runtime import FROZEN, torch_device


class NegativesFailed(RuntimeError):
    """Some clips of a batch failed; the others were committed. The message lists each."""


def item_seed(seed: int, clip_id: str, generator: str) -> int:
    """A clip's seed: recorded in its row, independent of batching and of other clips."""
    return int(digest([seed, clip_id, generator], 15), 16)


def generation_size(clip: dict, gen: GeneratorConfig) -> tuple[int, int, int]:
    """(width, height, frames) to generate at: the GT clip's, or gen.short_edge in its bucket."""
    return size_in_bucket(clip, gen.short_edge, gen.frames)


def load_generator(gen: GeneratorConfig, device: torch.device) -> wan.Pipeline:
    pipe = wan.load_generator(wan.WanSpec(gen.kind, gen.model, gen.dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ---------------------------------------------------------------------------------------
# gt_pair: the pipeline's own __call__
# ---------------------------------------------------------------------------------------


def generate(pipe: wan.Pipeline, gen: GeneratorConfig, prompt_embeds: torch.Tensor,
             negative_embeds: torch.Tensor, seeds: list[int], size: tuple[int, int, int],
             image: Any = None) -> np.ndarray:
    """uint8 videos [B, F, H, W, 3] for B prompt embeddings (one reference image for I2V)."""
    width, height, frames = size
    batch = prompt_embeds.shape[0]
    kwargs: dict[str, Any] = dict(
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds.expand(batch, -1, -1),
        height=height, width=width, num_frames=frames, num_inference_steps=gen.steps,
        guidance_scale=gen.guidance, output_type="np",
        # One CPU generator per clip: its noise does not depend on the batch or the device.
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    )
    if gen.guidance_2 is not None:
        kwargs["guidance_scale_2"] = gen.guidance_2
    if image is not None:
        kwargs["image"] = image
    video = pipe(**kwargs).frames
    return (np.asarray(video) * 255).round().clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# local_corrupt: masks and the pinned reconstruction
# ---------------------------------------------------------------------------------------


def sample_mask(shape: tuple[int, int, int], cfg: LocalCorruptConfig, generator: torch.Generator,
                keep_first: bool) -> torch.Tensor:
    """[1, F, H, W] union of random boxes on the latent grid (1 = corrupted). With keep_first
    (I2V) latent frame 0 — the reference frame the model is conditioned on — is never hit."""
    f, h, w = shape
    first = 1 if keep_first else 0
    if f - first < 1:
        raise ValueError(f"a latent of {f} frame(s) leaves nothing to corrupt after the I2V "
                         "reference frame; generate more frames")

    def randint(lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=generator))

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(1, generator=generator))

    mask = torch.zeros(1, f, h, w)
    for _ in range(randint(*cfg.masks)):
        bh, bw = (max(1, round(n * uniform(*cfg.size))) for n in (h, w))
        bf = max(1, round((f - first) * uniform(*cfg.span)))
        t, y, x = randint(first, f - bf), randint(0, h - bh), randint(0, w - bw)
        mask[0, t:t + bf, y:y + bh, x:x + bw] = 1
    return mask


@torch.no_grad()
def reconstruct_masked(pipe: wan.Pipeline, z0: torch.Tensor, mask: torch.Tensor,
                       prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                       gen: GeneratorConfig, strength: float, generator: torch.Generator,
                       cond: torch.Tensor | None = None,
                       image_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """LocalDPO's negative latent: z0 [C, F, H, W] with the mask region re-noised to
    `strength` and denoised by the frozen model (classifier-free guidance, the pipeline's
    scheduler and expert switch); elsewhere it is the GT latent at the current noise level
    after every step (diffusers' inpainting convention) and exactly z0 at the end."""
    scheduler, device = pipe.scheduler, pipe.device
    scheduler.set_timesteps(gen.steps, device=device)
    start = gen.steps - min(int(gen.steps * strength), gen.steps)
    if start >= gen.steps:
        raise ValueError(f"strength {strength} x {gen.steps} steps re-noises nothing; raise "
                         "negatives.local.strength or the generator's steps")
    timesteps = scheduler.timesteps[start:]
    scheduler.set_begin_index(start)  # img2img: the schedule starts part way
    z0, region = z0[None].to(device), mask[None].to(device).bool()
    noise = torch.randn(z0.shape, generator=generator).to(device)
    x = scheduler.add_noise(z0, noise, timesteps[:1])
    boundary = (pipe.config.boundary_ratio or 0) * scheduler.config.num_train_timesteps
    extra = {"encoder_hidden_states_image": image_embeds} if image_embeds is not None else {}
    for i, t in enumerate(timesteps):
        expert_2 = pipe.transformer_2 is not None and t < boundary  # Wan2.2 low-noise expert
        model = pipe.transformer_2 if expert_2 else pipe.transformer
        scale = (gen.guidance_2 if gen.guidance_2 is not None else gen.guidance) if expert_2 \
            else gen.guidance
        v = _velocity(model, x, t, cond, prompt_embeds, negative_embeds, scale, extra)
        x = scheduler.step(v, t, x, return_dict=False)[0]
        last = i == len(timesteps) - 1
        pinned = z0 if last else scheduler.add_noise(z0, noise, timesteps[i + 1:i + 2])
        x = torch.where(region, x, pinned)
    return x[0].float().cpu()


def _velocity(model: Any, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
              prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, scale: float,
              extra: dict) -> torch.Tensor:
    """The guided flow prediction, as in the Wan pipelines' denoising loop."""
    dtype = model.dtype
    inp = (torch.cat([x, cond[None].to(x)], dim=1) if cond is not None else x).to(dtype)
    extra = {k: v.to(x.device, dtype) for k, v in extra.items()}

    def run(embeds: torch.Tensor) -> torch.Tensor:
        return model(hidden_states=inp, timestep=t.expand(1), return_dict=False,
                     encoder_hidden_states=embeds.to(x.device, dtype), **extra)[0].float()

    v = run(prompt_embeds)
    if scale > 1.0:  # the pipelines' do_classifier_free_guidance
        uncond = run(negative_embeds)
        v = uncond + scale * (v - uncond)
    return v


def local_negative(store: Store, pipe: wan.Pipeline, gen: GeneratorConfig,
                   cfg: LocalCorruptConfig, clip: dict, seed: int, size: tuple[int, int, int],
                   prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor
                   ) -> tuple[np.ndarray, torch.Tensor]:
    """(uint8 frames [F, H, W, 3] of the corrupted clip, its latent mask [1, F', H', W'])."""
    width, height, frames = size
    with store.local_copy(store.key_of(clip["video"])) as local:
        pixels = torch.from_numpy(read_frames(local, probe(local), clip["bucket"], width, height,
                                              clip["fps"], frames))
    z0 = wan.encode_video(pipe.vae, pixels)
    generator = torch.Generator().manual_seed(seed)
    mask = sample_mask(tuple(z0.shape[1:]), cfg, generator, keep_first=gen.kind != "t2v")
    cond = image_embeds = None
    if gen.kind != "t2v":
        image = reference_image(store, clip["ref_image"])
        cond = wan.image_condition(pipe.vae, image, height, width, frames)
        if gen.kind == "i2v":
            image_embeds = wan.encode_image(pipe.image_encoder, pipe.image_processor, image,
                                            pipe.device)[None]
    z = reconstruct_masked(pipe, z0, mask, prompt_embeds, negative_embeds, gen, cfg.strength,
                           generator, cond, image_embeds)
    return wan.decode_latent(pipe.vae, z).numpy(), mask


# ---------------------------------------------------------------------------------------
# Back to the GT spec
# ---------------------------------------------------------------------------------------


def mask_video(mask: torch.Tensor, clip: dict, gen_frames: int, gt_fps: float, path: str) -> None:
    """The latent mask as a grey video at the GT clip's size, fps and frame count (viewing)."""
    f_gt = clip["frames"]
    index = [round(j * (gen_frames - 1) / max(f_gt - 1, 1)) for j in range(f_gt)]
    latent_index = torch.tensor([0 if g == 0 else (g - 1) // 4 + 1 for g in index])
    volume = mask[0, latent_index].float()[None]  # Wan packs frame 0, then 4 frames per latent
    pixels = torch.nn.functional.interpolate(volume, size=(clip["height"], clip["width"]),
                                             mode="nearest-exact")[0]
    write_video((pixels * 255).to(torch.uint8).numpy(), Fraction(gt_fps).limit_denominator(1001),
                path, "gray", ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                          "-threads", str(X264_THREADS)])


# ---------------------------------------------------------------------------------------
# One work item: a batch of clips for one generator
# ---------------------------------------------------------------------------------------


def make_negatives(store: Store, payload: dict, commit: Callable[[str, dict], None]) -> dict:
    """Make the negatives of `payload["clips"]` (one pipeline call when batched) and commit
    each clip's row as soon as its artifacts are written. A failed batch is retried clip by
    clip; clips that still fail are listed in NegativesFailed, the others stay committed."""
    gen = GeneratorConfig.model_validate(payload["generator"])
    units = payload["clips"]
    outputs = None
    if len(units) > 1:
        try:
            outputs = _run(store, payload, gen, units)
        except Exception:  # noqa: BLE001 - one bad clip (or an OOM) must not sink the batch
            outputs = None
    failures = []
    for i, unit in enumerate(units):
        try:
            out = outputs[i] if outputs else _run(store, payload, gen, [unit])[0]
            commit(unit["ikey"], _finish(store, payload, gen, unit, out))
        except Exception as e:
            if len(units) == 1:
                raise
            failures.append(f"{unit['clip']['id']}: {type(e).__name__}: {e}")
    if failures:
        raise NegativesFailed(f"{len(failures)} of {len(units)} clips failed: "
                              + "; ".join(failures))
    return {"id": f"batch.{gen.name}.{len(units)}", "status": "ok", "reason": "",
            "clips": [u["ikey"] for u in units]}


def _run(store: Store, payload: dict, gen: GeneratorConfig,
         units: list[dict]) -> list[tuple[np.ndarray, torch.Tensor | None]]:
    """The model call(s) for `units`: [(uint8 frames, latent mask or None)] in order."""
    device = torch_device(payload["device"])
    size = generation_size(units[0]["clip"], gen)
    embeds = torch.stack([read_tensor(store, u["prompt_key"]) for u in units])
    negative = read_tensor(store, payload["negative_key"])[None]
    with FROZEN.use(("generator", gen.name, gen.model), lambda: load_generator(gen, device)) \
            as pipe:
        if payload["mode"] == "local_corrupt":
            cfg = LocalCorruptConfig.model_validate(payload["local"])
            unit = units[0]
            frames, mask = local_negative(store, pipe, gen, cfg, unit["clip"], unit["seed"],
                                          size, embeds, negative)
            return [(frames, mask)]
        image = reference_image(store, units[0]["clip"]["ref_image"]) if gen.kind != "t2v" \
            else None
        videos = generate(pipe, gen, embeds, negative, [u["seed"] for u in units], size, image)
    return [(video, None) for video in videos]


def _finish(store: Store, payload: dict, gen: GeneratorConfig, unit: dict,
            output: tuple[np.ndarray, torch.Tensor | None]) -> dict:
    """Renormalize, upload the artifacts (mask first, video last), return the clip's row."""
    frames, mask = output
    clip, out_dir = unit["clip"], unit["dir"]
    gt = NormalizeConfig.model_validate(payload["gt"])
    width, height, n = generation_size(clip, gen)
    row: dict[str, Any] = {
        "id": f"{clip['id']}.{gen.name}", "gt_id": clip["id"], "generator": gen.name,
        "model": gen.model, "kind": gen.kind, "mode": payload["mode"], "seed": unit["seed"],
        "prompt": clip["prompt"], "ref_image": clip["ref_image"], "gt_video": clip["video"],
        "gen_width": width, "gen_height": height, "gen_frames": n, "steps": gen.steps,
        "guidance": gen.guidance, "mask": None, "mask_video": None,
    }
    with tempfile.TemporaryDirectory(prefix="regdpo-neg-") as tmp:
        video = os.path.join(tmp, "negative.mp4")
        spec = renormalize(frames, clip, gt, video)
        if mask is not None:
            row["mask"] = store.write_bytes(f"{out_dir}/mask.safetensors",
                                            save_safetensors({"mask": mask.contiguous()}))
            mask_video(mask, clip, n, gt.fps, os.path.join(tmp, "mask.mp4"))
            row["mask_video"] = store.put_file(os.path.join(tmp, "mask.mp4"), f"{out_dir}/mask.mp4")
        row["video"] = store.put_file(video, f"{out_dir}/negative.mp4")
    keep = ("bucket", "width", "height", "fps", "frames", "pix_fmt")
    return row | {k: spec[k] for k in keep} | {"status": "ok", "reason": ""}


def read_mask(store: Store, uri: str) -> torch.Tensor:
    return load_safetensors(store.read_bytes(store.key_of(uri)))["mask"]


def negatives_item(store: Store, out_dir: str, payload: dict) -> dict:
    """The negatives stage's item: a batch of clips for one generator, each clip's row
    committed under its own item key as soon as its artifacts are in the store."""
    return make_negatives(store, payload, lambda ikey, row: save_row(
        store, "negatives", ikey, row | {"flow_run": payload["flow_run"]}))
