"""benchmarks/gpu_check.{sh,py}: the prepared GPU check, through its CPU dry run (tiny
configs, the same code path), its out-of-memory handling, its budget and its FLOP count."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def test_dry_run_reports_every_case_through_the_shell_script(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "gpu_check: done" in proc.stdout
    fsdp, *records = json.loads((tmp_path / "gpu_check.json").read_text())
    # On CPU the policy casts nothing (the CPU layouts' exact equality); on CUDA it is bf16.
    assert fsdp["case"] == "fsdp bf16 policy" and fsdp["param_dtype"] == "none"
    assert fsdp["lora_dtypes"] == fsdp["lora_grad_dtypes"] == ["float32"]
    assert fsdp["errors_rel"] == 0 and fsdp["lora_grads_rel"] == 0
    assert [r["case"] for r in records] == ["tiny-t2v 32px x9", "tiny-i2v 32px x9"]
    for r in records:
        opt = r["optimized"]
        assert "error" not in opt, opt
        assert opt["step_s"] > 0 and opt["ideal"] == "measured"
        assert r["flops"]["model"] > r["flops"]["policy_forward"] > 0
        assert "error" not in r["naive"]["full"]  # a tiny model fits naive on CPU
        assert r["attention"]["native"]["s"] > 0
        assert r["attention"]["_native_cudnn"] == {"error": "CUDA only"}
    assert "gpu_check: done" in (tmp_path / "gpu_check.log").read_text()


def test_naive_oom_is_reported_and_its_capacity_found_on_the_ladder(gpu_check, monkeypatch,
                                                                    capsys) -> None:
    """A naive step that runs out of memory above 1 latent frame: "OOM", the check goes on,
    capacity = 3 latent frames (the case) / 1 (the largest naive fit)."""
    real = gpu_check.naive_step

    def naive_step(env, case, latent_frames=None):
        if (latent_frames or case.latent_frames) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(env, case, latent_frames)

    monkeypatch.setattr(gpu_check, "naive_step", naive_step)
    _, record = gpu_check.main(["--dry-run", "--models", "tiny-i2v"])
    assert record["naive"]["full"] == {"error": "OOM"}
    assert record["naive"]["max_latent_frames"] == 1
    assert record["naive"]["ladder_stop"] == "OOM at 2 latent frames"
    out = capsys.readouterr().out
    assert "naive OOM -> capacity >= 3.0x (3 vs 1 latent frames)" in out
    assert "gpu_check: done" in out


def test_a_spent_budget_skips_cases_without_building_them(gpu_check) -> None:
    records = gpu_check.main(["--dry-run", "--budget-s", "0"])
    assert [r["error"] for r in records] == ["skipped (budget)"] * 3


def test_flops_of_the_full_depth_equal_the_count_extended_from_one_and_two_blocks(
        gpu_check) -> None:
    [case] = gpu_check.cases(True, ["tiny-t2v"], [])
    deep = gpu_check.Case(**{**case.__dict__, "config": case.config | {"num_layers": 3}})
    counted = gpu_check._count_flops(deep, torch.float32, 3)
    assert gpu_check.count_flops(deep, torch.float32) == counted
    # Self-attention alone is 4·S²·d per sample and block forward (QK^T and PV); the count holds
    # at least the 2 reference + 2 policy forwards of it and its backward (twice the forward).
    s, d = deep.tokens(), deep.config["num_attention_heads"] * deep.config["attention_head_dim"]
    assert counted["model"] > 3 * (4 + 2 * 4) * 4 * s * s * d
