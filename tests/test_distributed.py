"""Multi-rank training (infra/distributed.py, infra/parallel.py) against the plain path: 2 CPU
processes on gloo, launched with torchrun, on a tiny random-weight Wan transformer and random
pairs. Each layout must give the plain single-process numbers: the loss metrics and the LoRA
gradient of one micro-batch, the LoRA weights after two optimizer steps, and a resume.

Context parallelism runs both implementations: ours (gathered K/V, what `auto` picks on CPU)
and diffusers' Ulysses attention. diffusers' enable_parallelism computes its device as
`rank % torch.accelerator.device_count()`, a ZeroDivisionError without an accelerator, so the
diffusers cases stand in a count of 1 while the policy is built (`_LIBRARY_CP`); everything
after that lookup (the model's _cp_plan hooks, the all-to-all attention and its backward, on
gloo) is the library's own. Ring attention cannot run here at all (torch SDPA returns no
log-sum-exp); it waits for a multi-GPU machine.

One torchrun launch runs every case (each launch costs ~10 s of imports): this file is also the
worker script (`python -m torch.distributed.run ... tests/test_distributed.py --worker ...`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# name -> (model kind, train.parallel overrides, train overrides). Batch of 2 pairs everywhere,
# so the plain reference is the same one-process run of 2 pairs per micro-batch.
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "data_parallel": ("t2v", {}, {}),
    "fsdp": ("t2v", {"fsdp": True}, {}),
    "fsdp_gradient_checkpointing": ("t2v", {"fsdp": True, "gradient_checkpointing": True}, {}),
    "context_parallel": ("t2v", {"context_parallel": 2}, {}),
    "context_parallel_i2v_fsdp_ckpt": (
        "i2v", {"context_parallel": 2, "fsdp": True, "gradient_checkpointing": True}, {}),
    "context_parallel_diffusers_ulysses": (
        "t2v", {"context_parallel": {"ulysses": 2, "implementation": "diffusers"}}, {}),
    "context_parallel_diffusers_i2v_fsdp_ckpt": (
        "i2v", {"context_parallel": {"ulysses": 2, "implementation": "diffusers"}, "fsdp": True,
                "gradient_checkpointing": True}, {}),
    "pair_parallel": ("t2v", {"pair_parallel": True}, {}),
    # Dual-IPO round r under sharded loading: the policy starts from a saved adapter and the
    # reference is base + that adapter (a second, frozen adapter), both set before sharding.
    "fsdp_from_adapter_reference_previous": (
        "t2v", {"fsdp": True}, {"init_adapter": "adapters/t2v", "reference": "previous"}),
    "pair_parallel_region_fsdp": ("i2v", {"pair_parallel": True, "fsdp": True},
                                  {"loss": {"kind": "region"}}),
    # the per-block activation plan under FSDP: selective recompute + offload (the saved-tensor
    # hooks around FSDP's all-gathered blocks), and the planner's probe steps (ranks agree)
    "fsdp_selective_offload": ("t2v", {"fsdp": True, "gradient_checkpointing": True,
                                       "checkpoint_every": 2, "offload_activations": True}, {}),
    "fsdp_memory_budget": ("t2v", {"fsdp": True, "memory_budget_gb": 1000.0}, {}),
}
_LIBRARY_CP = {"context_parallel_diffusers_ulysses", "context_parallel_diffusers_i2v_fsdp_ckpt"}
# ‖got − want‖ ≤ TOL·‖want‖ over all LoRA tensors (float32 rounding of reordered sums).
TOL = 1e-5


# ---------------------------------------------------------------------------------------
# The worker: runs on every rank under torchrun
# ---------------------------------------------------------------------------------------


def _config(model: str, kind: str, parallel: dict, over: dict, **top: Any):
    from infra.config import TrainConfig

    base = dict(model=model, kind=kind, dtype="float32", data=f"data/{kind}", batch_size=2,
                lora=dict(rank=4, alpha=8), optimizer=dict(lr=1e-3, weight_decay=0.0),
                checkpoint=dict(every=1), steps=2, seed=3)
    return TrainConfig.model_validate({**base, **over, **top, "parallel": parallel})


def _perturb(trainer: Any) -> None:
    """Random A and B on every rank alike (B starts at 0, which leaves A without gradient)."""
    from models.wan import lora_parameters

    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in lora_parameters(trainer.transformer):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().flatten().double() for t in tensors])


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _measure(trainer: Any) -> dict[str, Any]:
    """Metrics and reduced LoRA gradient of one micro-batch, then the LoRA weights after two
    optimizer steps (from the same start)."""
    from models.wan import lora_parameters

    _perturb(trainer)
    params = lora_parameters(trainer.transformer)
    metrics = trainer.layout.mean_metrics(trainer.forward_backward_step(trainer.next_batch(), 1.0))
    trainer.layout.reduce_gradients(params)
    grads = _flat([p.grad for p in params])
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.cursor.position = 0  # the two steps start from the same pairs again
    start = _flat(params)
    for _ in range(2):
        trainer.train_step()
    return {"metrics": metrics, "grads": grads, "update": _flat(params) - start}


def _compare(got: dict[str, Any], want: dict[str, Any], b: float) -> dict[str, float]:
    """Relative differences. The errors are what the layouts compute; s and the gaps are
    differences of errors, and the loss and DGR see them through b·s, so those are compared on
    the errors' scale (times b), their own magnitude being far below the errors' rounding."""
    g, w = got["metrics"], want["metrics"]
    scale = abs(w["err_ref_win"]) + abs(w["err_ref_lose"])
    errors = [abs(g[k] - w[k]) / abs(w[k]) for k in ("err_win", "err_lose", "err_ref_win",
                                                      "err_ref_lose")]
    gaps = [abs(g[k] - w[k]) / scale for k in ("win_gap", "lose_gap", "s")]
    through_b = [abs(g[k] - w[k]) / (b * scale + abs(w[k])) for k in ("loss", "dgr")]
    return {"metrics": max(errors + gaps + through_b), "grads": _rel(got["grads"], want["grads"]),
            "update": _rel(got["update"], want["update"])}


def _cp_impl(transformer: Any) -> str | None:
    """Which context parallelism the transformer carries, read off the model itself."""
    from infra.distributed import GatheredKVAttnProcessor

    if getattr(transformer, "_parallel_config", None) is not None:
        return "diffusers"
    if isinstance(transformer.blocks[0].attn1.processor, GatheredKVAttnProcessor):
        return "gather"
    return None


def worker(args: argparse.Namespace) -> None:
    from infra.distributed import Layout, shutdown
    from infra.store import Store
    from models.wan import lora_parameters
    from tasks.train import Trainer

    store, models = Store(args.store), json.loads(args.models)
    single = Layout.single(torch.device("cpu"))
    results: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    try:
        for name, (kind, parallel, over) in CASES.items():
            key = (kind, json.dumps(over, sort_keys=True))
            if key not in plain:
                ref = Trainer(_config(models[kind], kind, {}, over), store, f"plain/{name}", single)
                plain[key] = _measure(ref)
            count = (mock.patch("torch.accelerator.device_count", return_value=1)
                     if name in _LIBRARY_CP else contextlib.nullcontext())
            with count:
                trainer = Trainer(_config(models[kind], kind, parallel, over), store,
                                  f"run/{name}")
            layout = trainer.layout
            b = trainer.cfg.loss.beta / 2
            results[name] = _compare(_measure(trainer), plain[key], b) | {
                "dp": layout.dp, "pair": layout.pair, "cp": layout.cp,
                "cp_impl": _cp_impl(trainer.transformer)}

        # 2 of 3 steps, a checkpoint by rank 0 (a run killed there), then a resume to 3: the
        # plain 3-step weights.
        kind, parallel, out = "i2v", {"context_parallel": 2, "fsdp": True}, "run/resume"
        killed = Trainer(_config(models[kind], kind, parallel, {}, steps=3), store, out)
        killed.resume()
        for _ in range(2):
            metrics = killed.train_step()
            killed.step += 1
            killed.log.write(killed.step, metrics)
        killed.save_checkpoint()
        killed.layout.barrier()
        resumed = Trainer(_config(models[kind], kind, parallel, {}, steps=3), store, out)
        resumed.train()
        straight = Trainer(_config(models[kind], kind, {}, {}, steps=3), store, "plain/resume",
                           single)
        straight.train()
        log = store.read_bytes(f"{out}/metrics.jsonl").decode().splitlines()
        results["resume"] = {"update": _rel(_flat(lora_parameters(resumed.transformer)),
                                            _flat(lora_parameters(straight.transformer))),
                             "log_steps": [json.loads(line)["step"] for line in log],
                             "checkpoint": store.read_json(f"{out}/checkpoints/latest.json")}
    finally:
        shutdown()
    rank = os.environ["RANK"]
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------
# The test: one launch, then the comparisons each rank wrote
# ---------------------------------------------------------------------------------------


def _write_adapter(store: Any, model: str, scratch: Path) -> None:
    """A previous round's adapter (random, non-zero A and B) at the store key adapters/t2v."""
    from models.wan import WanSpec, add_lora, load_transformer, lora_parameters, save_lora

    transformer = load_transformer(WanSpec("t2v", model))
    add_lora(transformer, rank=4, alpha=8)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in lora_parameters(transformer):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = save_lora(transformer, scratch)
    store.put_file(str(path), f"adapters/t2v/{Path(path).name}")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    from models.tiny import build_tiny
    from models.wan import WanSpec
    from infra.store import Store
    from models.wan import transformer_config
    from pairs_data import write_random_pairs

    root = tmp_path_factory.mktemp("dist")
    models = {kind: build_tiny(kind, root / kind) for kind in ("t2v", "i2v")}
    store = Store(str(root / "store"))
    for kind, path in models.items():
        model = transformer_config(WanSpec(kind, path))
        write_random_pairs(store, f"data/{kind}", model, 4, mask=True, seed=1)
    _write_adapter(store, models["t2v"], root / "adapter")
    out = root / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__)), "--worker", "--store", store.url, "--models", json.dumps(models),
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_layout_gives_the_plain_loss_gradient_and_update(launched, case) -> None:
    for rank, results in enumerate(launched):
        r = results[case]
        assert r["metrics"] <= TOL and r["grads"] <= TOL and r["update"] <= TOL, (rank, r)


def test_layouts_are_what_the_switches_ask_for(launched) -> None:
    layouts = {case: (r["dp"], r["pair"], r["cp"]) for case, r in launched[0].items()
               if case != "resume"}
    assert layouts["data_parallel"] == layouts["fsdp"] == (2, 1, 1)
    assert layouts["context_parallel"] == (1, 1, 2)
    assert layouts["context_parallel_diffusers_ulysses"] == (1, 1, 2)
    impls = {case: r["cp_impl"] for case, r in launched[0].items() if case != "resume"}
    assert impls["context_parallel"] == impls["context_parallel_i2v_fsdp_ckpt"] == "gather"
    assert impls["context_parallel_diffusers_ulysses"] == "diffusers"
    assert impls["context_parallel_diffusers_i2v_fsdp_ckpt"] == "diffusers"
    assert impls["data_parallel"] is None
    assert layouts["pair_parallel"] == (1, 2, 1)


def test_resume_under_fsdp_and_context_parallel_continues_exactly(launched) -> None:
    for results in launched:
        assert results["resume"]["log_steps"] == [1, 2, 3]  # rank 0's log, continued
        assert results["resume"]["checkpoint"]["step"] == 3
        assert results["resume"]["update"] <= TOL, results["resume"]


def test_a_grid_that_does_not_fit_the_world_names_the_fix() -> None:
    from infra.distributed import check_grid

    with pytest.raises(ValueError, match="multiple of 4.*nproc"):
        check_grid(2, 2, 2)
    assert check_grid(8, 2, 2) == 2


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--models", required=True)
    parser.add_argument("--out", required=True)
    sys.path.insert(0, str(REPO))
    worker(parser.parse_args())
