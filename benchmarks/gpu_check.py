"""The one prepared GPU check of issue 12: Wan2.1 1.3B and 14B at the paper's shapes on one GPU.

Random-weight WanTransformer3DModel with the real configs' dimensions (Wan2.1-T2V-1.3B and
Wan2.1-I2V-14B-720P, written out below: nothing is downloaded), built directly on the GPU in
bf16, at 480p (480x832) and 720p (720x1280) x 81 frames (21 latent frames: 32,760 and 75,600
video tokens per sample). Per (model, resolution), cheapest first, within a time budget:

  optimized  the trainer's own step (tasks.train.Trainer.forward_backward_step on in-memory
             tensors, plus clipping and AdamW over the LoRA weights): reference = the same module
             with the adapter disabled, win + lose as one batch of 2, every block checkpointed,
             bf16 autocast, attention "auto" (flash-attn if installed, else torch SDPA).
             Peak memory (torch.cuda.max_memory_allocated, absolute) and step time.
  ideal      the same forward/backward with checkpointing off (no recompute) and no optimizer:
             measured where it fits; where it does not, estimated as the optimized
             forward/backward minus one policy forward (what full checkpointing recomputes),
             and labelled "est.".
  naive      a deep-copied reference model, win and lose through separate forwards, no
             checkpointing. At 81 frames it is expected not to fit: "OOM" is reported and the
             check goes on. Its capacity is then the largest latent frame count of the ladder
             1, 2, 3, 5, 8, 13 that fits; capacity ratio = 21 / that (a lower bound: the
             optimized path was only asked to fit 21). Where naive fits 81 frames, the ratio is
             the two peaks' ratio.
  attention  flash (the flash-attn package, if installed) vs torch SDPA (diffusers' "native",
             which lets torch pick) and torch's own kernels (_native_flash, _native_cudnn,
             _native_efficient) on the self-attention shapes (2 samples, S tokens, all heads,
             head_dim 128), forward + backward.

First, fsdp bf16 policy: the trainer's FSDP2 MixedPrecisionPolicy on a one-rank group against
the same tiny LoRA model without FSDP (dtypes while computing, errors and LoRA gradients).

FLOPs are counted, not guessed: torch.utils.flop_counter.FlopCounterMode over the same step
run on the meta device (shapes only, no memory), checkpointing off — two reference forwards,
two policy forwards and the backward that autograd actually runs (the frozen base gets input
gradients only, the LoRA weights their weight gradients). Attention counts as QK^T and PV
matmuls (4·S²·d per sample and layer forward, twice that backward); element-wise ops,
norms and softmax are not counted. MFU = these model FLOPs / step time / the GPU's dense
bf16 peak (spec sheet: H100/H200 SXM 989 TFLOP/s; --peak-tflops overrides); HFU adds the
recomputed policy forward. tokens/s = the pair's 2 x S video tokens / step time.

Budget (--budget-s, default 450 s from the start): before each phase its time is predicted
from its counted FLOPs and the throughput measured so far; a phase that would not end inside
the budget is skipped and says so. Every line is printed as soon as it is measured.

    bash benchmarks/gpu_check.sh            # on the GPU machine (see the script for wheels)
    python benchmarks/gpu_check.py --dry-run  # CPU, tiny config, seconds: the same code path
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from infra.config import LossConfig, ParallelConfig  # noqa: E402
from infra.parallel import checkpoint_blocks, pair_forward, parallelize  # noqa: E402
from losses import preference_loss  # noqa: E402
from models.tiny import tiny_transformer_config  # noqa: E402
from models.wan import TEXT_LEN, add_lora, lora_parameters, reference_mode  # noqa: E402
from tasks.train import PairBatch, Trainer  # noqa: E402

GiB = 2**30
FRAMES = 81  # video frames; latent frames = (81 - 1) / 4 + 1 = 21
NAIVE_LADDER = (1, 2, 3, 5, 8, 13)  # latent frames tried for the naive path's capacity
LONG_STEP_S = 20.0  # a step predicted longer than this is measured once, without a warmup

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers and Wan-AI/Wan2.1-I2V-14B-720P-Diffusers transformer configs.
_WAN = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=1e-6, rope_max_seq_len=1024)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "1.3b": ("t2v", _WAN | dict(num_attention_heads=12, ffn_dim=8960, num_layers=30)),
    "14b": ("i2v", _WAN | dict(num_attention_heads=40, ffn_dim=13824, num_layers=40,
                               in_channels=36, image_dim=1280, added_kv_proj_dim=5120)),
}
IMAGE_TOKENS = 257  # CLIP ViT-H/14 at 224 px: 256 patches + class token
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}
# --dry-run: the tiny random-weight builds of models.tiny (one T2V, one I2V, like 1.3b / 14b),
# a few frames at a small size.
DRY_MODELS = {"tiny-t2v": ("t2v", tiny_transformer_config("t2v")),
              "tiny-i2v": ("i2v", tiny_transformer_config("i2v"))}
DRY_RESOLUTIONS = {"32px": (32, 32)}
DRY_FRAMES = 9
DRY_IMAGE_TOKENS = 17
ATTENTION_BACKENDS = ("flash", "native", "_native_flash", "_native_cudnn", "_native_efficient")
# Dense bf16 tensor-core peaks (spec sheets), matched against the device name in this order.
PEAK_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H100", 989.4),
               ("A100", 312.0), ("L40S", 362.1))


# ---------------------------------------------------------------------------------------
# What is measured: one (model, resolution) case
# ---------------------------------------------------------------------------------------


@dataclass
class Case:
    model: str
    kind: str
    config: dict[str, Any]
    res: str
    height: int
    width: int
    frames: int  # video frames
    image_tokens: int

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // 4 + 1

    def latent_hw(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8

    def tokens(self, latent_frames: int | None = None) -> int:
        """Video tokens of one sample: latent frames x (h / 2) x (w / 2)."""
        h, w = self.latent_hw()
        pt, ph, pw = self.config["patch_size"]
        return (latent_frames or self.latent_frames) // pt * (h // ph) * (w // pw)

    @property
    def name(self) -> str:
        return f"{self.model} {self.res} x{self.frames}"


@dataclass
class Env:
    device: torch.device
    dtype: torch.dtype
    peak_flops: float | None  # FLOP/s
    budget: "Budget"
    steps: int
    throughput: float | None = None  # hardware FLOP/s seen so far
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def predict_s(self, flops: float) -> float | None:
        rate = self.throughput or (0.35 * self.peak_flops if self.peak_flops else None)
        return None if rate is None else flops / rate

    def saw(self, flops: float, seconds: float) -> None:
        self.throughput = flops / seconds if seconds > 0 else self.throughput


class Budget:
    """Wall-clock seconds left of the check; a phase runs only if it is predicted to fit."""

    def __init__(self, seconds: float, reserve: float = 10.0):
        self.end, self.reserve = time.monotonic() + seconds, reserve

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, predicted_s: float | None) -> bool:
        return predicted_s is None or predicted_s <= self.left() - self.reserve


def say(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------------------------------
# Building: the model (random weights, on the device or on meta) and one pair
# ---------------------------------------------------------------------------------------


def build_model(case: Case, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """WanTransformer3DModel with random weights straight on `device` in `dtype` (no fp32
    detour for 14B), the modules diffusers keeps in fp32 kept so, as from_pretrained does."""
    from diffusers import WanTransformer3DModel

    default = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = WanTransformer3DModel(**case.config)
    finally:
        torch.set_default_dtype(default)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and keep.intersection(name.split(".")):
            tensor.data = tensor.data.float()
    return model


def make_pair(case: Case, device: torch.device, latent_frames: int | None = None) -> PairBatch:
    """One pair as the trainer sees it: latents, shared noise and (t, σ), text embeddings, and
    for I2V the first-frame condition and CLIP image embeddings."""
    f = latent_frames or case.latent_frames
    h, w = case.latent_hw()
    cfg = case.config
    c = cfg["out_channels"]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device) if device.type != "meta" else torch.empty(
            *shape, device=device)

    cond = image = None
    if case.kind == "i2v":
        cond = randn(1, cfg["in_channels"] - c, f, h, w)
        image = randn(1, case.image_tokens, cfg["image_dim"])
    return PairBatch(win=randn(1, c, f, h, w), lose=randn(1, c, f, h, w),
                     prompt_embeds=randn(1, TEXT_LEN, cfg["text_dim"]), noise=randn(1, c, f, h, w),
                     sigma=torch.full((1,), 0.7, device=device),
                     timestep=torch.full((1,), 700.0, device=device), cond=cond,
                     image_embeds=image)


def trainer_view(model: torch.nn.Module, parallel: ParallelConfig,
                 device: torch.device) -> SimpleNamespace:
    """The attributes Trainer.errors / forward_backward_step read: the trainer's step code
    runs on in-memory tensors without a store, a dataset or a process group."""
    view = SimpleNamespace(cfg=SimpleNamespace(parallel=parallel, loss=LossConfig()),
                           transformer=model, device=device, layout=None)
    view.errors = partial(Trainer.errors, view)
    view.real_errors = partial(Trainer.real_errors, view)
    return view


def noised(batch: PairBatch) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    sigma = batch.sigma.view(-1, 1, 1, 1, 1)
    return tuple(((1 - sigma) * z + sigma * batch.noise, batch.noise - z)
                 for z in (batch.win, batch.lose))


# ---------------------------------------------------------------------------------------
# FLOPs: counted on the meta device
# ---------------------------------------------------------------------------------------


def count_flops(case: Case, dtype: torch.dtype) -> dict[str, float]:
    """{"model": FLOPs of one step without recompute, "policy_forward": one batched policy
    forward (what full checkpointing recomputes)}, counted by FlopCounterMode on meta with 1
    and 2 blocks and extended linearly to the model's depth: the blocks are identical, so this
    is exact, and it takes a second instead of a minute of meta-tensor bookkeeping."""
    layers = case.config["num_layers"]
    one, two = (_count_flops(case, dtype, n) for n in (1, 2))
    return {k: one[k] + (layers - 1) * (two[k] - one[k]) for k in one}


def _count_flops(case: Case, dtype: torch.dtype, layers: int) -> dict[str, float]:
    meta = torch.device("meta")
    shallow = Case(**{**case.__dict__, "config": case.config | {"num_layers": layers}})
    model = build_model(shallow, meta, dtype)
    add_lora(model, rank=16, alpha=32)
    model.to(meta)  # add_lora allocates a meta base's adapter on the CPU (sharded loading)
    parallel = ParallelConfig(pair_batch=True, attention="sdpa")
    parallelize(model, parallel)
    view = trainer_view(model, parallel, meta)
    batch = make_pair(case, meta)
    win, lose = noised(batch)
    errors = partial(view.errors, batch)
    with FlopCounterMode(display=False) as step:
        with torch.no_grad(), reference_mode(model):
            ref_w, ref_l = pair_forward(errors, win, lose, parallel)
        err_w, err_l = pair_forward(errors, win, lose, parallel)
        # The loss's own arithmetic is a handful of scalars; its backward is the model's.
        (err_w - err_l - ref_w + ref_l).sum().backward()
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        pair_forward(errors, win, lose, parallel)
    return {"model": float(step.get_total_flops()),
            "policy_forward": float(forward.get_total_flops())}


# ---------------------------------------------------------------------------------------
# Phases; each returns a record and frees what it built, also on OOM
# ---------------------------------------------------------------------------------------


def _reset_memory(env: Env) -> None:
    gc.collect()
    if env.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(env.device)


def _peak(env: Env) -> int | None:
    return torch.cuda.max_memory_allocated(env.device) if env.cuda else None


def guarded(env: Env, what: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """run() with out-of-memory reported as {"error": "OOM"}, anything else as its repr; the
    memory it held is released either way, and the check goes on."""
    _reset_memory(env)
    try:
        return run()
    except torch.OutOfMemoryError:
        result: dict[str, Any] = {"error": "OOM"}
    except Exception as e:  # a kernel that does not run here, etc.: reported, not fatal
        result = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                  "trace": traceback.format_exc(limit=3)}
    finally:
        _reset_memory(env)
    say(f"  {what}: {result['error']}")
    return result


def optimized_phase(env: Env, case: Case, flops: dict[str, float], steps: int) -> dict[str, Any]:
    """The optimized step's peak and time (a warmup step, then up to `steps` timed ones; with
    0 the warmup is the measurement), then the ideal (no recompute) on the same model."""
    model = build_model(case, env.device, env.dtype)
    add_lora(model, rank=16, alpha=32)
    parallel = ParallelConfig(pair_batch=True, gradient_checkpointing=True, bf16=True)
    parallelize(model, parallel)
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=5e-6)
    view = trainer_view(model, parallel, env.device)
    batch = make_pair(case, env.device)
    weights = torch.cuda.memory_allocated(env.device) if env.cuda else None

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        Trainer.forward_backward_step(view, batch, 1.0)
        env.sync()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        env.sync()
        return t1 - t0, time.perf_counter() - t0

    hw = flops["model"] + flops["policy_forward"]
    first = step()  # warmup (kernel selection, allocator growth); also the first estimate
    env.saw(hw, first[1])
    times = [first] if steps == 0 else []
    for _ in range(steps):
        if not env.budget.allows(env.predict_s(hw)):
            break
        times.append(step())
    times = times or [first]
    out: dict[str, Any] = {"peak": _peak(env), "weights": weights,
                           "fb_s": min(t[0] for t in times), "step_s": min(t[1] for t in times),
                           "timed_steps": len(times) if steps else 0,
                           "attention": _backend_name(model)}
    env.saw(hw, out["step_s"])

    # Recompute = one policy forward: the estimate of the ideal where the ideal does not fit.
    win, lose = noised(batch)
    with torch.no_grad():
        t0 = time.perf_counter()
        pair_forward(partial(view.errors, batch), win, lose, parallel)
        env.sync()
        out["policy_forward_s"] = time.perf_counter() - t0
    out["ideal_s"], out["ideal"] = out["fb_s"] - out["policy_forward_s"], "est."
    if env.budget.allows(env.predict_s(flops["model"])):
        model.disable_gradient_checkpointing()
        try:
            t0 = time.perf_counter()
            Trainer.forward_backward_step(view, batch, 1.0)
            env.sync()
            out["ideal_s"], out["ideal"] = time.perf_counter() - t0, "measured"
        except torch.OutOfMemoryError:
            out["ideal_note"] = "no-checkpointing step OOM"
        finally:
            optimizer.zero_grad(set_to_none=True)
            checkpoint_blocks(model, 1)
    else:
        out["ideal_note"] = "skipped (budget)"
    return out


def _backend_name(model: torch.nn.Module) -> str:
    backend = getattr(model.blocks[0].attn1.processor, "_attention_backend", None)
    return getattr(backend, "value", backend) or "native"


def naive_step(env: Env, case: Case, latent_frames: int | None = None) -> dict[str, Any]:
    """One naive step (separate reference copy, separate win/lose forwards, no checkpointing):
    its peak memory and time."""
    model = build_model(case, env.device, env.dtype)
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    add_lora(model, rank=16, alpha=32)
    parallel = ParallelConfig(pair_batch=False, gradient_checkpointing=False, bf16=True)
    parallelize(model, parallel)
    parallelize(reference, parallel)
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=5e-6)
    policy = trainer_view(model, parallel, env.device)
    frozen = trainer_view(reference, parallel, env.device)
    batch = make_pair(case, env.device, latent_frames)
    win, lose = noised(batch)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref_w, ref_l = pair_forward(partial(frozen.errors, batch), win, lose, parallel)
    err_w, err_l = pair_forward(partial(policy.errors, batch), win, lose, parallel)
    loss, _ = preference_loss(policy.cfg.loss, err_w, err_l, ref_w, ref_l)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    env.sync()
    return {"peak": _peak(env), "step_s": time.perf_counter() - t0}


def naive_phase(env: Env, case: Case, flops: dict[str, float]) -> dict[str, Any]:
    """Naive at the case's frames; if it does not fit, its capacity on the ladder."""
    out: dict[str, Any] = {}
    if not env.budget.allows(env.predict_s(flops["model"])):
        return {"error": "skipped (budget)"}
    out["full"] = guarded(env, f"{case.name} naive", lambda: naive_step(env, case))
    if "error" not in out["full"]:
        return out
    fits = None
    for f in (f for f in NAIVE_LADDER if f < case.latent_frames):
        share = case.tokens(f) / case.tokens()
        if not env.budget.allows(env.predict_s(flops["model"] * share)):
            out["ladder_stop"] = f"budget at {f} latent frames"
            break
        r = guarded(env, f"{case.name} naive at {f} latent frames",
                    lambda f=f: naive_step(env, case, f))
        if "error" in r:
            out["ladder_stop"] = f"{r['error']} at {f} latent frames"
            break
        fits = f
    out["max_latent_frames"] = fits
    return out


def attention_phase(env: Env, heads: int, tokens: int, head_dim: int = 128,
                    repeats: int = 2) -> dict[str, Any]:
    """Forward + backward of self-attention (2 samples, all heads) per backend: seconds and
    TFLOP/s (12·B·H·S²·d: QK^T and PV forward, twice that backward)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    flops = 12 * 2 * heads * tokens**2 * head_dim
    out: dict[str, Any] = {}
    for name in ATTENTION_BACKENDS:
        if name == "flash" and not _has_flash():
            out[name] = {"error": "flash-attn not installed"}
            continue
        if name != "native" and not env.cuda:
            out[name] = {"error": "CUDA only"}
            continue
        if not env.budget.allows(env.predict_s(flops * (repeats + 1))):
            out[name] = {"error": "skipped (budget)"}
            continue

        def run(name: str = name) -> dict[str, Any]:
            q, k, v = (torch.randn(2, tokens, heads, head_dim, device=env.device,
                                   dtype=env.dtype, requires_grad=True) for _ in range(3))
            backend = AttentionBackendName(name)
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                o = dispatch_attention_fn(q, k, v, backend=backend)
                o.backward(torch.ones_like(o))
                env.sync()
                times.append(time.perf_counter() - t0)
            best = min(times[1:])
            return {"s": best, "tflops": flops / best / 1e12}

        out[name] = guarded(env, f"attention {name} S={tokens} H={heads}", run)
    return out


def _has_flash() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def fsdp_bf16_check(env: Env) -> dict[str, Any]:
    """The trainer's FSDP2 mixed precision (infra.parallel.fsdp_mixed_precision: bf16 weights,
    fp32 reductions on CUDA) on a one-rank process group, against the same LoRA model without
    FSDP: one optimized step each on a tiny Wan (the policy's mechanics, not the model's size).
    Reports the policy, the dtypes weights have while their block computes, and the relative
    difference of the errors and of the LoRA gradients (the weights it casts are bf16 already,
    the fp32 ones stay out of its units, so both should be ~0)."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from infra.distributed import Layout
    from infra.parallel import apply_fsdp, fsdp_mixed_precision

    [case] = cases(True, ["tiny-t2v"], [])
    parallel = ParallelConfig(pair_batch=True, gradient_checkpointing=True, bf16=True)
    policy = fsdp_mixed_precision(parallel, env.device)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl" if env.cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        layout = Layout(device=env.device, world=1,
                        world_mesh=init_device_mesh(env.device.type, (1,)))
        runs = {}
        for name in ("plain", "fsdp"):
            model = build_model(case, env.device, env.dtype)
            add_lora(model, rank=4, alpha=8)
            g = torch.Generator().manual_seed(7)  # B = 0 would leave A without a gradient
            with torch.no_grad():
                for w in lora_parameters(model):
                    w.copy_(torch.randn(w.shape, generator=g) * 0.1)
            parallelize(model, parallel)
            seen: list[str] = []
            if name == "fsdp":
                apply_fsdp(model, layout, policy)
                for module in (model.blocks[0].attn1.to_q.base_layer, model.blocks[0].norm2):
                    module.register_forward_pre_hook(lambda m, args: seen.append(_dtype(m.weight)))
            view = trainer_view(model, parallel, env.device)
            metrics = Trainer.forward_backward_step(view, make_pair(case, env.device), 1.0)
            lora = lora_parameters(model)
            runs[name] = dict(metrics=metrics, seen=seen, lora_dtypes={_dtype(w) for w in lora},
                              grad_dtypes={_dtype(w.grad) for w in lora},
                              grads=torch.cat([w.grad.flatten().double() for w in lora]))
        plain, fsdp = runs["plain"], runs["fsdp"]
        errors = max(abs(fsdp["metrics"][k] - plain["metrics"][k]) / abs(plain["metrics"][k])
                     for k in ("err_win", "err_lose", "err_ref_win", "err_ref_lose"))
        grads = float((fsdp["grads"] - plain["grads"]).norm() / plain["grads"].norm())
        return {"param_dtype": _dtype(policy.param_dtype), "reduce_dtype": _dtype(policy.reduce_dtype),
                "compute_dtypes": dict(zip(("base to_q", "norm2 (kept fp32)"), fsdp["seen"])),
                "lora_dtypes": sorted(fsdp["lora_dtypes"]),
                "lora_grad_dtypes": sorted(fsdp["grad_dtypes"]),
                "errors_rel": errors, "lora_grads_rel": grads}
    finally:
        dist.destroy_process_group()


def _dtype(x: torch.Tensor | torch.dtype | None) -> str:
    """"bfloat16", "float32", or "none" (a policy that does not cast)."""
    dtype = x.dtype if isinstance(x, torch.Tensor) else x
    return "none" if dtype is None else str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------


def peak_flops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override * 1e12, f"{override:g} TFLOP/s (--peak-tflops)"
    if device.type != "cuda":
        return None, "n/a on CPU"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{tflops:g} TFLOP/s ({key} spec, dense bf16)"
    return None, f"unknown for {name!r}: pass --peak-tflops"


def cases(dry: bool, models: list[str], resolutions: list[str]) -> list[Case]:
    table, sizes = (DRY_MODELS, DRY_RESOLUTIONS) if dry else (MODELS, RESOLUTIONS)
    frames, image_tokens = (DRY_FRAMES, DRY_IMAGE_TOKENS) if dry else (FRAMES, IMAGE_TOKENS)
    out = []
    for m in models or list(table):
        for r in resolutions or list(sizes):
            kind, config = table[m]
            out.append(Case(m, kind, config, r, *sizes[r], frames, image_tokens))
    return out


def check_case(env: Env, case: Case) -> dict[str, Any]:
    rec: dict[str, Any] = {"case": case.name, "tokens": case.tokens(),
                           "latent_frames": case.latent_frames}
    rec["flops"] = flops = count_flops(case, env.dtype)
    floor = optimized_floor_bytes(case, env)
    if env.cuda and floor > torch.cuda.get_device_properties(env.device).total_memory:
        rec["optimized"] = {"error": f"does not fit: needs >= {floor / GiB:.0f} GiB (weights + "
                                     "checkpointed block inputs), more than this GPU has"}
        say(f"{case.name}: optimized {rec['optimized']['error']}")
        return rec
    predicted = env.predict_s(flops["model"] + flops["policy_forward"])
    steps = env.steps
    if predicted is not None and (predicted > LONG_STEP_S
                                  or not env.budget.allows(predicted * (1 + steps))):
        steps = 0  # the warmup step alone is the measurement (labelled in the record)
    if not env.budget.allows(None if predicted is None else predicted * 1.2):
        rec["optimized"] = {"error": f"skipped (budget: ~{predicted:.0f} s per step, "
                                     f"{env.budget.left():.0f} s left)"}
        say(f"{case.name}: {rec['optimized']['error']}")
        return rec
    rec["optimized"] = guarded(env, f"{case.name} optimized",
                               lambda: optimized_phase(env, case, flops, steps))
    if "error" not in rec["optimized"]:  # where optimized does not fit, naive cannot either
        rec["naive"] = naive_phase(env, case, flops)
    cfg = case.config
    rec["attention"] = attention_phase(env, cfg["num_attention_heads"], case.tokens(),
                                       cfg["attention_head_dim"])
    say(summary(env, case, rec))
    return rec


def optimized_floor_bytes(case: Case, env: Env) -> int:
    """What the optimized step holds at least: the bf16 weights and, with every block
    checkpointed, each block's input (win + lose: 2 x S x dim in bf16)."""
    cfg = case.config
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    with torch.device("meta"):
        from diffusers import WanTransformer3DModel

        params = sum(p.numel() for p in WanTransformer3DModel(**cfg).parameters())
    size = torch.finfo(env.dtype).bits // 8
    return params * size + cfg["num_layers"] * 2 * case.tokens() * dim * size


def summary(env: Env, case: Case, rec: dict[str, Any]) -> str:
    """One line: memory, capacity, step vs ideal, throughput, MFU; then the attention line."""
    opt, naive, flops = rec["optimized"], rec.get("naive", {}), rec["flops"]

    def gib(b: int | None) -> str:
        return "n/a" if b is None else f"{b / GiB:.1f} GiB"

    attn = rec.get("attention", {})
    kernels = ", ".join(f"{k} {v['tflops']:.0f} TFLOP/s" if "error" not in v
                        else f"{k} {v['error']}" for k, v in attn.items())
    kernels = f"\n  attention fwd+bwd: {kernels}" if kernels else ""
    parts = [f"{case.name} ({case.tokens()} tokens/sample)"]
    if "error" in opt:
        return parts[0] + f": optimized {opt['error']}" + kernels
    parts.append(f"optimized peak {gib(opt['peak'])} (weights {gib(opt['weights'])})")
    full = naive.get("full", naive)
    if "error" not in full:
        ratio = (f"{full['peak'] / opt['peak']:.2f}x peak ratio"
                 if full.get("peak") and opt.get("peak") else "n/a")
        parts.append(f"naive peak {gib(full.get('peak'))} -> capacity {ratio}")
    else:
        best = naive.get("max_latent_frames")
        cap = (f">= {case.latent_frames / best:.1f}x ({case.latent_frames} vs {best} latent "
               f"frames)" if best else "n/a (" + naive.get("ladder_stop", full["error"]) + ")")
        parts.append(f"naive {full['error']} -> capacity {cap}")
    ratio = opt["step_s"] / opt["ideal_s"] if opt["ideal_s"] > 0 else math.nan
    warm = "" if opt["timed_steps"] else " (1 step, no warmup)"
    parts.append(f"step {opt['step_s']:.3g} s{warm} vs ideal {opt['ideal_s']:.3g} s "
                 f"({opt['ideal']}) = {ratio:.2f}x")
    parts.append(f"{2 * case.tokens() / opt['step_s']:.0f} tokens/s")
    if env.peak_flops:
        mfu = flops["model"] / opt["step_s"] / env.peak_flops
        hfu = (flops["model"] + flops["policy_forward"]) / opt["step_s"] / env.peak_flops
        parts.append(f"{flops['model'] / 1e15:.2f} PFLOP/step, MFU {mfu:.1%} (HFU {hfu:.1%})")
    else:
        parts.append(f"{flops['model'] / 1e12:.3g} TFLOP/step, MFU n/a")
    parts.append(f"attention {opt['attention']}")
    return "; ".join(parts) + kernels


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny configs, a few seconds: the same code path")
    ap.add_argument("--models", default="", help="comma list (default: 1.3b,14b)")
    ap.add_argument("--res", default="", help="comma list (default: 480p,720p)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="wall-clock seconds the check may take (phases predicted to overrun "
                    "are skipped)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps after the warmup")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--json", default=None, help="write every record here")
    args = ap.parse_args(argv)

    budget = Budget(args.budget_s)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --dry-run on a CPU machine")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    peak, peak_note = peak_flops(device, args.peak_tflops)
    env = Env(device, dtype, peak, budget, args.steps)
    import diffusers

    name = torch.cuda.get_device_name(device) if env.cuda else "CPU (dry run)"
    memory = (f"{torch.cuda.get_device_properties(device).total_memory / GiB:.1f} GiB"
              if env.cuda else "n/a")
    say(f"gpu_check: {name}, {memory}; torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, flash-attn {'yes' if _has_flash() else 'no'}; peak "
        f"{peak_note}; budget {args.budget_s:.0f} s")
    fsdp = (guarded(env, "fsdp bf16 policy", lambda: fsdp_bf16_check(env))
            if budget.left() > budget.reserve else {"error": "skipped (budget)"})
    env.records.append({"case": "fsdp bf16 policy", **fsdp})
    if "error" not in fsdp:
        say(f"fsdp bf16 policy (1 rank, tiny Wan): param {fsdp['param_dtype']}, reduce "
            f"{fsdp['reduce_dtype']}, computing with {fsdp['compute_dtypes']}, LoRA "
            f"{fsdp['lora_dtypes']} grads {fsdp['lora_grad_dtypes']}; vs no FSDP: errors "
            f"{fsdp['errors_rel']:.1e}, LoRA grads {fsdp['lora_grads_rel']:.1e} (relative)")
    split = (lambda s: [x for x in s.split(",") if x])
    for case in cases(args.dry_run, split(args.models), split(args.res)):
        if budget.left() < budget.reserve:
            env.records.append({"case": case.name, "error": "skipped (budget)"})
            say(f"{case.name}: skipped (budget)")
            continue
        record = guarded(env, case.name, lambda: check_case(env, case))  # never stops the run
        env.records.append(record if "case" in record else {"case": case.name, **record})
        if args.json:  # after every case: a killed run keeps what it measured
            Path(args.json).write_text(json.dumps(env.records, indent=1, default=str))
    say(f"gpu_check: done in {args.budget_s - budget.left():.0f} s")
    return env.records


if __name__ == "__main__":
    main()
