"""Training-step memory and time: the naive DPO path against the optimized one, side by side.

For a Wan-architecture WanTransformer3DModel with random weights (no downloads), at growing
latent frame counts F, one full training step (reference forward without grad + policy forward
+ backward + gradient clipping + AdamW over the LoRA parameters) is run by

  naive      a deep-copied reference model, win and lose through separate forwards
             (pair_forward(pair_batch=False)), no gradient checkpointing;
  optimized  the reference = the same module with the adapter disabled (models.wan.reference_mode),
             win + lose as one batch of 2 (pair_forward(pair_batch=True)), gradient checkpointing
             switched on through infra.parallel.parallelize — exactly Trainer.forward_backward_step
             of tasks/train.py, called on in-memory tensors.

Both get pre-encoded prompt embeddings (random [1, 512, text_dim] tensors) and a LoRA policy
(models.wan.add_lora, rank 16 / alpha 32 on the attention and FFN projections). Each
(path, F) runs in a fresh process forked from a clean fork server that has only imported the
code (never touched the model or CUDA), so peaks do not leak from one configuration into the
next:
  CUDA  peak = torch.cuda.max_memory_allocated over warmup + timed steps (absolute: weights,
        the naive path's reference copy, LoRA, optimizer state and activations);
  CPU   peak = the process's peak RSS (VmHWM, reset through /proc/self/clear_refs after the
        baseline; getrusage ru_maxrss where that is unavailable) minus the RSS right after the
        base model and the inputs were built. The naive path's reference copy is made after
        the baseline, so it counts.

Then, for a memory budget (--budget-gb; default: the naive path's peak at the middle F of the
list) it prints the largest measured F each path fits in and the capacity ratio
optimized/naive (issue target >= 4x). F grows past the list for the optimized path (each next
F = sum of the two before) until it exceeds the budget or --max-frames.

"ideal" (issue target: optimized step <= 1.1x ideal) = 2 reference forwards (no grad) + 2 policy
forwards + backward, measured in the optimized path's own process on the same model right after
its timed steps, with gradient checkpointing switched off (no recompute), win and lose batched
as in the optimized path, and no clipping or optimizer step: Trainer.forward_backward_step
timed alone. It is measured after the peak was read, in rounds alternating with optimized
steps (so load from other processes hits both alike); each time is the minimum over its repeats.
Both the full-step ratio and the forward+backward-only ratio (fb/ideal) are printed. On CPU every
time is the child's process CPU time (time.process_time) on one thread by default: on a shared
machine, wall time also counts the time other processes held the cores, which swung single steps
by 10x, and with two threads OpenMP's spin-waiting on a descheduled partner still did 2x.

Last, the planner (train.parallel.memory_budget_gb; infra/memory_plan.py): at F = 4x the naive
path's largest F under the budget, a fresh process runs the trainer's probe steps (F = 1 and 2,
every block stored, then every block recomputed), plans the fewest blocks to recompute (or, with
--offload on CUDA, to offload) for the budget, and measures that setting's peak and its step over
the ideal as above (--plan-steps alternating rounds). It prints the plan, the predicted and the
measured peak, and `joint: ...`: both targets met by that one setting, or which one is not and why.

On CPU the children run with a fixed small glibc mmap threshold (MALLOC_MMAP_THRESHOLD_), so
freed activation buffers go back to the OS and RSS follows live memory rather than the
allocator's history; RSS still counts the Python/torch runtime's own growth, page granularity,
and no caching allocator, so it only approximates what max_memory_allocated reports on a GPU.

    python benchmarks/train_memory.py [--quick] [--frames 1,2,3,5,8,13,21] [--budget-gb G]
                                      [--config small|1.3b|14b] [--latent-hw 16x16] [--json PATH]

CPU defaults: the `small` config (the 1.3B structure scaled down in width and depth), float32,
latent 16x16 (64 tokens per frame). CUDA defaults: the real Wan2.1 T2V 1.3B config (--config 14b
for 14B), bfloat16 weights + autocast, latent 60x104 (480x832 video: 1560 tokens per frame).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import multiprocessing as mp
import os
import re
import resource
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infra.memory_plan import BudgetTooSmall, Line, MemoryPlan, MemoryProfile, plan_memory  # noqa: E402  (torch-free)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Only what the fork server preloads; torch/diffusers come in through these.
PRELOAD = ["torch", "tasks.train", "models.wan", "infra.parallel", "losses"]

# The transformer configs of Wan-AI/Wan2.1-T2V-1.3B-Diffusers and Wan-AI/Wan2.1-T2V-14B-Diffusers.
_WAN_COMMON: dict[str, Any] = dict(
    patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
    freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)
CONFIGS: dict[str, dict[str, Any]] = {
    "1.3b": _WAN_COMMON | dict(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "14b": _WAN_COMMON | dict(num_attention_heads=40, ffn_dim=13824, num_layers=40),
    # 1.3B's structure scaled down: head_dim 64 (rope split t/h/w = 24/20/20, all even), 4 heads
    # (dim 256), the same ffn/dim ratio (~5.8), 8 blocks instead of 30; real text_dim, freq_dim.
    "small": _WAN_COMMON | dict(num_attention_heads=4, attention_head_dim=64, ffn_dim=1536,
                                num_layers=8),
}

MiB = 2**20


# ---------------------------------------------------------------------------------------
# Child: one (path, F) configuration in a fresh process
# ---------------------------------------------------------------------------------------


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM in bytes (Linux), {} elsewhere."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    return {k: int(m.group(1)) * 1024 for k in ("VmRSS", "VmHWM")
            if (m := re.search(rf"{k}:\s+(\d+) kB", text))}


class CpuPeak:
    """Peak RSS over a baseline: VmHWM reset by clear_refs, else ru_maxrss."""

    def __init__(self) -> None:
        gc.collect()
        status = _proc_status()
        self.baseline = status.get("VmRSS", 0)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss (not reset: includes model build)"
            self.baseline = self.baseline or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def rearm(self) -> None:
        """Reset the peak to the current RSS again (after work that is not the measured step)."""
        gc.collect()
        if self.method.startswith("VmHWM"):
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        hwm = _proc_status().get("VmHWM")
        if hwm is None or not self.method.startswith("VmHWM"):
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        return hwm - self.baseline


def _run_config(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from diffusers import WanTransformer3DModel

    from infra.activations import apply_block_plan, measure_profile, optimizer_bytes
    from infra.parallel import ParallelConfig, checkpoint_blocks, pair_forward, parallelize
    from losses import PreferenceLoss, preference_loss
    from models.wan import TEXT_LEN, add_lora, lora_parameters
    from tasks.train import PairBatch, Trainer

    device = torch.device(job["device"])
    cuda = device.type == "cuda"
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    dtype = torch.bfloat16 if cuda else torch.float32
    config = CONFIGS[job["config"]]
    torch.manual_seed(0)

    # -- the base model (random weights) and the pre-encoded inputs: the baseline -----------
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build 14B directly in bf16 on the GPU: no fp32 detour
    try:
        with device:
            model = WanTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(default_dtype)
    # As from_pretrained(torch_dtype=bf16) does: diffusers keeps these modules in float32.
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and keep.intersection(name.split(".")):
            tensor.data = tensor.data.float()
    n_params = sum(p.numel() for p in model.parameters())
    f, (h, w) = job["frames"], job["latent_hw"]
    c = config["out_channels"]

    def make_batch(f: int) -> PairBatch:  # one pair; one (t, ε) shared by win and lose
        g = torch.Generator().manual_seed(1)
        return PairBatch(
            win=torch.randn(1, c, f, h, w, generator=g).to(device),
            lose=torch.randn(1, c, f, h, w, generator=g).to(device),
            prompt_embeds=torch.randn(1, TEXT_LEN, config["text_dim"], generator=g).to(device),
            noise=torch.randn(1, c, f, h, w, generator=g).to(device),
            sigma=torch.tensor([0.7], device=device), timestep=torch.tensor([700.0], device=device))

    batch = make_batch(f)
    if cuda:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        cpu_peak = CpuPeak()

    # -- the path's setup (counted in its peak) ----------------------------------------------
    naive, planned = job["path"] == "naive", job["path"] == "planned"
    parallel = ParallelConfig(pair_batch=not naive, gradient_checkpointing=job["path"] == "optimized",
                              bf16=True, checkpoint_every=job["checkpoint_every"])
    cfg = SimpleNamespace(parallel=parallel, loss=PreferenceLoss(kind="regdpo"))
    reference = None
    if naive:
        reference = copy.deepcopy(model).requires_grad_(False).eval()
    add_lora(model, rank=job["rank"], alpha=2 * job["rank"])
    model = parallelize(model, parallel)
    params = lora_parameters(model)
    n_lora = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=5e-6)

    # Trainer's own step code on in-memory tensors: the attributes its methods read.
    def trainer_view(transformer: torch.nn.Module) -> Any:
        view = SimpleNamespace(cfg=cfg, transformer=transformer, device=device, layout=None)
        view.errors = partial(Trainer.errors, view)
        return view

    policy = trainer_view(model)
    restore_plan = partial(checkpoint_blocks, model, job["checkpoint_every"])
    plan = None
    if planned:
        # The trainer's memory_budget_gb path (tasks.train.Trainer._plan_memory): probe steps
        # at F = 1 and 2, every block stored then every block recomputed, scaled to F.
        def probe_step(f: int) -> None:
            Trainer.forward_backward_step(policy, make_batch(f), 1.0)
            optimizer.zero_grad(set_to_none=True)

        profile = measure_profile(model, device, probe_step, extra=optimizer_bytes(params))
        # The budget is over the post-build baseline on CPU, absolute on CUDA (see the peaks).
        offset = 0 if cuda else cpu_peak.baseline
        try:
            plan = plan_memory(profile, job["budget"] + offset, f, offload=job["offload"])
        except BudgetTooSmall as e:
            return dict(path=job["path"], frames=f, error=f"no plan: {e}")
        restore_plan = partial(apply_block_plan, model, plan.recompute, plan.offload)
        restore_plan()
        if cuda:  # the probes' peaks are not the step's
            torch.cuda.reset_peak_memory_stats(device)
        else:
            cpu_peak.rearm()
        largest = f  # the largest F the planner finds a plan for (predicted, not measured)
        while largest < 4096 and profile.peak(largest + 1, 0) <= job["budget"] + offset:
            largest += 1
        plan_info = dict(plan=plan.describe(), recomputed=plan.recomputed,
                         offloaded=plan.offloaded, blocks=len(plan.recompute),
                         predicted_peak=plan.peak_bytes - offset, largest_planned_f=largest,
                         offset=offset,
                         profile=dict(blocks=profile.blocks, extra=profile.extra,
                                      stored=[profile.stored.intercept, profile.stored.slope],
                                      recomputed=[profile.recomputed.intercept,
                                                  profile.recomputed.slope]))

    def forward_backward() -> None:
        if not naive:
            Trainer.forward_backward_step(policy, batch, 1.0)
            return
        # Trainer.forward_backward_step with a separate reference module instead of
        # reference_mode; the same noising, errors, pair_forward and loss.
        sigma = batch.sigma.view(-1, 1, 1, 1, 1)
        win = ((1 - sigma) * batch.win + sigma * batch.noise, batch.noise - batch.win)
        lose = ((1 - sigma) * batch.lose + sigma * batch.noise, batch.noise - batch.lose)
        with torch.no_grad():
            ref_w, ref_l = pair_forward(partial(trainer_view(reference).errors, batch), win, lose,
                                        parallel)
        err_w, err_l = pair_forward(partial(policy.errors, batch), win, lose, parallel)
        loss, _ = preference_loss(cfg.loss, err_w, err_l, ref_w, ref_l)
        loss.backward()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # CPU: the process's CPU time (all its threads), which other processes on a shared machine
    # do not inflate the way they inflate wall time; CUDA: wall time after a synchronize.
    clock = time.perf_counter if cuda else time.process_time

    def step() -> tuple[float, float]:
        t0 = clock()
        forward_backward()
        sync()
        t1 = clock()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return t1 - t0, clock() - t0

    for _ in range(job["warmup"]):
        step()
    times = [step() for _ in range(job["steps"])]
    sync()
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        peak_over_base = peak - baseline
        method = "torch.cuda.max_memory_allocated (absolute)"
    else:
        peak = peak_over_base = cpu_peak.peak()
        method = f"peak RSS over the post-build baseline ({cpu_peak.method})"
    result = dict(path=job["path"], frames=f, peak=peak, peak_over_base=peak_over_base,
                  method=method, params=n_params, lora_params=n_lora)
    if plan is not None:
        result |= plan_info

    # -- the ideal, on the same model in the same process: no recompute, no optimizer --------
    # Measured after the peak was read. Rounds alternate (ideal, optimized step) so that load
    # from other processes hits both alike; every time is the minimum over its repeats.
    if not naive and job["ideal"]:
        def ideal() -> float:
            model.disable_gradient_checkpointing()
            try:
                t0 = clock()
                Trainer.forward_backward_step(policy, batch, 1.0)
                sync()
                return clock() - t0
            finally:
                optimizer.zero_grad(set_to_none=True)
                restore_plan()

        try:
            ideal()  # warm the no-checkpointing path (its larger buffers)
            ideals = []
            for _ in range(job["steps"]):
                ideals.append(ideal())
                times.append(step())
            result["ideal_s"] = min(ideals)
        except torch.OutOfMemoryError:
            result["ideal_s"] = None
            result["ideal_error"] = "OOM without checkpointing"
    result["fb_s"] = min(t[0] for t in times)
    result["step_s"] = min(t[1] for t in times)
    return result


def _child(conn: Any, job: dict[str, Any]) -> None:
    try:
        result = _run_config(job)
    except Exception as e:  # OOM on CUDA, or anything else: reported, the sweep goes on
        import torch
        oom = isinstance(e, torch.OutOfMemoryError)
        result = dict(path=job["path"], frames=job["frames"], error="OOM" if oom else repr(e),
                      trace="" if oom else traceback.format_exc(limit=4))
    conn.send_bytes(json.dumps(result, default=str).encode())  # JSON, not pickle
    conn.close()


def run_fresh(ctx: Any, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One configuration in a fresh forked process; its result dict (or an error)."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, job))
    proc.start()
    send.close()
    result: dict[str, Any] | None = None
    if recv.poll(timeout):
        try:
            result = json.loads(recv.recv_bytes())
        except EOFError:
            result = None
    proc.join(10 if result is not None else 0.1)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is None:
        why = (f"timeout after {timeout:.0f} s" if proc.exitcode in (None, -9) and timeout
               else f"exit code {proc.exitcode} (killed for memory?)")
        result = dict(path=job["path"], frames=job["frames"], error=why)
    return result


# ---------------------------------------------------------------------------------------
# Parent: the sweep and the report
# ---------------------------------------------------------------------------------------


def _fmt_mem(b: float | None) -> str:
    return "-" if b is None else f"{b / MiB:.0f}"


def _fmt_s(s: float | None) -> str:
    return "-" if s is None else (f"{s:.3f}" if s < 10 else f"{s:.1f}")


def largest_fit(results: dict[int, dict[str, Any]], budget: float) -> tuple[int | None, bool]:
    """(largest F whose run fit the budget, whether a larger F was run and did not fit)."""
    fits = [f for f, r in results.items() if "error" not in r and r["peak"] <= budget]
    best = max(fits) if fits else None
    bounded = any(f > (best or 0) and ("error" in r or r["peak"] > budget)
                  for f, r in results.items())
    return best, bounded


def linear_fit(results: dict[int, dict[str, Any]]) -> tuple[float, float] | None:
    pts = [(f, r["peak"]) for f, r in results.items() if "error" not in r]
    if len(pts) < 2:
        return None
    mf = sum(f for f, _ in pts) / len(pts)
    mp_ = sum(p for _, p in pts) / len(pts)
    var = sum((f - mf) ** 2 for f, _ in pts)
    if var == 0:
        return None
    slope = sum((f - mf) * (p - mp_) for f, p in pts) / var
    return mp_ - slope * mf, slope


def _plan_or_none(profile: MemoryProfile, budget: float, frames: int) -> MemoryPlan | None:
    try:
        return plan_memory(profile, budget, frames)
    except BudgetTooSmall:
        return None


CAPACITY_TARGET, STEP_TARGET = 4.0, 1.1  # the issue's: >= 4x naive F, <= 1.1x ideal step


def joint_report(results: dict[str, dict[int, dict[str, Any]]], budget: float,
                 run_planned: Any) -> None:
    """The planner's setting at 4x the naive path's largest F under the same budget: measured
    peak and step over ideal, side by side in one process, and whether both targets hold."""
    fit_n, _ = largest_fit(results["naive"], budget)
    target = int(CAPACITY_TARGET * fit_n)

    def run(f: int) -> tuple[dict[str, Any], float | None]:
        r = results["planned"][f] = run_planned(f)
        print(f"planned (train.parallel.memory_budget_gb = the budget; infra/memory_plan.py from "
              f"probe steps at F=1,2) at F={f} = {f / fit_n:.2f}x the naive F={fit_n}:")
        if "error" in r:
            print(f"  {r['error']}")
            return r, None
        step = r["step_s"] / r["ideal_s"] if r.get("ideal_s") else None
        fb = r["fb_s"] / r["ideal_s"] if r.get("ideal_s") else None
        print(f"  {r['plan']}")
        print(f"  measured peak {_fmt_mem(r['peak'])} MiB (predicted "
              f"{_fmt_mem(r['predicted_peak'])}, budget {_fmt_mem(budget)}); step "
              f"{_fmt_s(r['step_s'])} s, ideal {_fmt_s(r.get('ideal_s'))} s: {step:.2f}x full "
              f"step, {fb:.2f}x forward+backward; the planner's largest F at this budget: "
              f"{r['largest_planned_f']} (predicted, every block recomputed)", flush=True)
        return r, step

    r, step = run(target)
    if "error" in r:
        print(f"joint: not met: the planner found no setting that fits F={target} in the budget")
        return
    fits = r["peak"] <= budget
    meets = fits and step is not None and step <= STEP_TARGET
    if meets:
        print(f"joint: both targets met by the planned setting: capacity {target / fit_n:.2f}x "
              f"naive (target >= {CAPACITY_TARGET:g}x) at {step:.2f}x ideal step (target <= "
              f"{STEP_TARGET:g}x)")
        return
    why = []
    if not fits:
        why.append(f"the measured peak is above the budget (the linear model from F=1,2 "
                   f"under-predicts at F={target})")
    if step is not None and step > STEP_TARGET:
        why.append(f"recomputing {r['recomputed']}/{r['blocks']} blocks, the fewest that fit, "
                   f"costs {step:.2f}x" + ("; on CPU offload frees nothing (host memory is the "
                   "device's), so recompute is the only lever" if r["offloaded"] == 0 else ""))
    print(f"joint: not met at F={target}: " + "; ".join(why), flush=True)
    if not fits or step is None or not r["recomputed"]:
        return
    # The best joint point: the recompute this measurement allows within the step target
    # (its cost per block), and the largest F the planner fits with no more than that.
    per_block = (step - 1) / r["recomputed"]
    allowed = int((STEP_TARGET - 1) / per_block) if per_block > 0 else r["blocks"]
    prof = r["profile"]
    profile = MemoryProfile(prof["blocks"], Line(*prof["stored"]), Line(*prof["recomputed"]),
                            prof["extra"])
    plans = {f: _plan_or_none(profile, budget + r["offset"], f) for f in range(fit_n, target)}
    candidates = [f for f, plan in plans.items() if plan is not None and plan.recomputed <= allowed]
    if not candidates:
        print(f"best joint point: none above the naive F={fit_n} (at {per_block:.3f}x of the "
              f"ideal step per recomputed block, {allowed} may be recomputed)")
        return
    best = max(candidates)
    r2, step2 = run(best)
    if step2 is not None:
        print(f"best joint point: capacity {best / fit_n:.2f}x naive (F={best}) at {step2:.3f}x "
              f"ideal step: peak {'within' if r2['peak'] <= budget else 'OVER'} the budget, step "
              f"{'within' if step2 <= STEP_TARGET else 'OVER'} {STEP_TARGET:g}x (recompute costs "
              f"~{per_block:.3f}x of the ideal step per block, so <= {allowed} of {r['blocks']} "
              f"blocks keep the step <= {STEP_TARGET:g}x; {STEP_TARGET:g}x at "
              f"{CAPACITY_TARGET:g}x capacity needs a block's activations off the device "
              "without recompute: offload, on a GPU)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default=None,
                   help="transformer config (default: small on CPU, 1.3b on CUDA)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--frames", default=None,
                   help="latent frame counts, comma-separated (default 1,2,3,5,8,13; --quick 1,2,4)")
    p.add_argument("--max-frames", type=int, default=None,
                   help="grow F past the list for the optimized path up to this "
                        "(default: 34 on CPU, 16 with --quick, 233 on CUDA; 0 = no growth)")
    p.add_argument("--latent-hw", default=None, help="latent HxW (default 16x16 CPU, 60x104 CUDA)")
    p.add_argument("--budget-gb", type=float, default=None,
                   help="memory budget in GiB (default: the naive peak at the middle F)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 rank)")
    p.add_argument("--checkpoint-every", type=int, default=1,
                   help="optimized path: recompute every k-th block only (selective activation "
                        "checkpointing, train.parallel.checkpoint_every; 1 = every block)")
    p.add_argument("--offload", action="store_true",
                   help="planned path: let the planner offload activations to host memory "
                        "(train.parallel.offload_activations; CUDA only, on CPU it is the same memory)")
    p.add_argument("--plan-steps", type=int, default=3,
                   help="timed steps (alternating with the ideal) of the planned point")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 2 CPU, 3 CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads in the children (default 1 on CPU: with more, OpenMP "
                        "workers spin while a partner is descheduled, and on a shared machine "
                        "that spin lands in the process CPU time the ratios are taken from)")
    p.add_argument("--quick", action="store_true",
                   help="a short CPU run: F in 1,2,4, growth to 16, 1 timed step")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    args = p.parse_args(argv)

    import torch  # the parent never initializes CUDA: the fork server children do

    cuda_ok = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda_ok else "cpu")
    on_cuda = device.startswith("cuda")
    config = args.config or ("1.3b" if on_cuda else "small")
    frames_arg = args.frames or ("1,2,4" if args.quick else "1,2,3,5,8,13")
    frames = sorted({int(x) for x in frames_arg.split(",")})
    max_frames = args.max_frames if args.max_frames is not None else (
        (16 if args.quick else 34) if not on_cuda else 233)
    hw = args.latent_hw or ("60x104" if on_cuda else "16x16")
    h, w = (int(x) for x in hw.lower().split("x"))
    steps = args.steps or (1 if args.quick else (3 if on_cuda else 2))
    threads = args.threads or (None if on_cuda else 1)
    cfg = CONFIGS[config]
    tokens_per_frame = (h // cfg["patch_size"][1]) * (w // cfg["patch_size"][2])

    # glibc raises its mmap threshold after big frees, then keeps freed activation buffers in
    # the heap: RSS would then track allocator history, not live tensors. A fixed threshold
    # (read at start-up by the fork server, hence every child) returns big blocks on free.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(16 * 1024))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(16 * 1024))
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)

    def job(path: str, f: int) -> dict[str, Any]:
        return dict(path=path, frames=f, device=device, config=config, latent_hw=(h, w),
                    rank=args.rank, warmup=args.warmup, steps=steps, threads=threads,
                    ideal=True, checkpoint_every=args.checkpoint_every, budget=None,
                    offload=args.offload and on_cuda)

    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    print(f"train_memory: WanTransformer3DModel '{config}' ({cfg['num_layers']} blocks, dim {dim}, "
          f"{cfg['num_attention_heads']} heads x {cfg['attention_head_dim']}, ffn "
          f"{cfg['ffn_dim']}, text_dim {cfg['text_dim']}), random weights, device {device} "
          f"({'bf16 weights + autocast' if on_cuda else 'float32'}, torch {torch.__version__}, "
          f"{torch.get_num_threads() if threads is None else threads} threads)")
    print(f"latent {h}x{w} -> {tokens_per_frame} tokens/frame; 1 pair, 512 text tokens; "
          f"LoRA rank {args.rank}; Reg-DPO loss; optimized path recomputes every "
          f"{args.checkpoint_every} block(s); {args.warmup} warmup + {steps} timed steps "
          "(min) per config, each config in a fresh process; times are "
          f"{'wall time' if on_cuda else 'process CPU time'}", flush=True)

    budget = None if args.budget_gb is None else args.budget_gb * 2**30
    budget_note = "--budget-gb" if budget is not None else None
    middle = frames[len(frames) // 2]
    results: dict[str, dict[int, dict[str, Any]]] = {"naive": {}, "optimized": {}}
    done = {"naive": False, "optimized": False}
    # Never let a CPU child take the machine down: stop a path above half the available RAM.
    mem_cap = None
    if not on_cuda:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            mem_cap = avail // 2
        except (ValueError, OSError):
            mem_cap = None

    header = (f"{'F':>4} {'tokens':>7} | {'naive MiB':>9} {'step s':>7} | {'opt MiB':>8} "
              f"{'step s':>7} {'ideal s':>7} {'opt/ideal':>9} {'fb/ideal':>8} | {'opt/naive mem':>13}")
    print(header)
    print("-" * len(header), flush=True)
    metric = None
    t_start = time.perf_counter()
    queue, seen = list(frames), set()
    while queue:
        f = queue.pop(0)
        if f in seen:
            continue
        seen.add(f)
        row: dict[str, dict[str, Any] | None] = {"naive": None, "optimized": None}
        for path in ("naive", "optimized"):
            if done[path]:
                continue
            r = run_fresh(ctx, job(path, f), args.timeout)
            results[path][f] = row[path] = r
            metric = metric or r.get("method")
            if "error" in r or (budget is not None and r["peak"] > budget) or (
                    mem_cap is not None and r["peak"] > mem_cap):
                done[path] = True
        if budget is None and f == middle and row["naive"] and "error" not in row["naive"]:
            budget = row["naive"]["peak"]
            budget_note = f"the naive peak at F={middle}"
            for path, res in results.items():  # a path already above it has shown its limit
                if any("error" not in r and r["peak"] > budget for r in res.values()):
                    done[path] = True
        n, o = row["naive"], row["optimized"]
        cells = [f"{f:>4} {f * tokens_per_frame:>7}"]
        if n is None:
            cells.append(f"{'(stopped)':>9} {'':>7}")
        elif "error" in n:
            cells.append(f"{n['error'][:17]:>17}")
        else:
            cells.append(f"{_fmt_mem(n['peak']):>9} {_fmt_s(n['step_s']):>7}")
        if o is None:
            cells.append(f"{'(stopped)':>8}")
        elif "error" in o:
            cells.append(f"{o['error'][:17]:>17}")
        else:
            ideal = o.get("ideal_s")
            ratio = "-" if not ideal else f"{o['step_s'] / ideal:.2f}x"
            fb = "-" if not ideal else f"{o['fb_s'] / ideal:.2f}x"
            mem_ratio = ("-" if n is None or "error" in n or n["peak"] <= 0
                         else f"{o['peak'] / n['peak']:.2f}")
            cells.append(f"{_fmt_mem(o['peak']):>8} {_fmt_s(o['step_s']):>7} {_fmt_s(ideal):>7} "
                         f"{ratio:>9} {fb:>8} | {mem_ratio:>13}")
        print(" | ".join(cells), flush=True)
        for r in (n, o):
            if r and r.get("trace"):
                print(r["trace"], file=sys.stderr)
        # Grow F for the optimized path while it still fits: next F = sum of the last two.
        if not queue and not done["optimized"] and budget is not None:
            ran = sorted(results["optimized"])
            nxt = ran[-1] + (ran[-2] if len(ran) > 1 else 1)
            if nxt <= max_frames:
                queue.append(nxt)

    print()
    print(f"memory: {metric}")
    some = next((r for res in results.values() for r in res.values() if "params" in r), None)
    if some:
        print(f"model: {some['params'] / 1e6:.1f}M parameters; LoRA {some['lora_params'] / 1e6:.2f}M")
    if budget is None:
        print("no budget: the naive path failed at the middle F; nothing to compare")
    else:
        fit_n, bounded_n = largest_fit(results["naive"], budget)
        fit_o, bounded_o = largest_fit(results["optimized"], budget)
        print(f"budget: {budget / MiB:.0f} MiB ({budget_note})")

        def say(fit: int | None, bounded: bool) -> str:
            if fit is None:
                return "none"
            return f"F={fit}" + ("" if bounded else " (largest run; a larger F was not tried)")

        print(f"largest F under the budget: naive {say(fit_n, bounded_n)}, "
              f"optimized {say(fit_o, bounded_o)}")
        if fit_n and fit_o:
            sign = "" if bounded_o else ">= "
            print(f"capacity ratio optimized/naive: {sign}{fit_o / fit_n:.2f}x (issue target >= 4x)")
        for path, res in results.items():
            line = linear_fit(res)
            if line and line[1] > 0:
                a, b = line
                est = (budget - a) / b
                print(f"  linear fit {path}: peak ~ {a / MiB:.0f} MiB + {b / MiB:.1f} MiB x F "
                      f"-> F ~ {est:.1f} at the budget (extrapolated, not measured)")
        fits = {path: linear_fit(res) for path, res in results.items()}
        if all(fit and fit[1] > 0 for fit in fits.values()):
            print(f"  per-frame memory naive/optimized: "
                  f"{fits['naive'][1] / fits['optimized'][1]:.2f}x (the capacity ratio once the "
                  "budget is large against the fixed cost of weights and optimizer state)")
    ratios = [(f, r["step_s"] / r["ideal_s"], r["fb_s"] / r["ideal_s"])
              for f, r in sorted(results["optimized"].items())
              if "error" not in r and r.get("ideal_s")]
    if ratios:
        f_last, full, fb = ratios[-1]
        print(f"step time optimized / ideal at F={f_last}: {full:.2f}x full step, {fb:.2f}x "
              f"forward+backward only (issue target <= 1.1x); over all F: "
              + ", ".join(f"F={f}: {x:.2f}x" for f, x, _ in ratios))
    if budget is not None and largest_fit(results["naive"], budget)[0]:
        results["planned"] = {}
        joint_report(results, budget, run_planned=lambda f: run_fresh(
            ctx, job("planned", f) | dict(budget=budget, steps=args.plan_steps), args.timeout))
    print(f"wall time {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(
            dict(config=config, device=device, latent_hw=[h, w], budget=budget,
                 results={k: {str(f): r for f, r in v.items()} for k, v in results.items()}),
            indent=1))


if __name__ == "__main__":
    main()
