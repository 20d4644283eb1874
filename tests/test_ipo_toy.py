"""The shipped configs/toy-ipo.yaml, run as a user runs it: 2 Dual-IPO rounds end to end on the
toy clips with the tiny Wan2.1 T2V policy and the tiny Qwen2-VL critic, the critic fine-tuned
on the toy seed pairs (round 0) and refined on round 1's chains; every round trains."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_toy_ipo_config_runs_two_rounds_that_train(prefect_api, toy_dir: Path, tmp_path: Path):
    from flows.ipo import ipo
    from infra.config import load_config
    from infra.stage import input_manifest
    from infra.store import Store
    from tasks.report import render_report

    # The config file as shipped, beside a toy/ folder as `regdpo toy-data toy` writes it.
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "toy-ipo.yaml", tmp_path / "configs")
    (tmp_path / "toy").symlink_to(toy_dir)
    cfg = load_config(tmp_path / "configs" / "toy-ipo.yaml")
    cfg.store = f"file://{tmp_path / 'artifacts'}"
    results = ipo(run=cfg.name, config=cfg)

    st = Store(cfg.store)
    index = st.read_run(cfg.name)["stages"]
    assert results["r0"]["stages"]["refine"]["trained"]  # the seed fine-tune
    assert results["r1"]["trained"] and results["r2"]["trained"], (
        results["r1"]["why_not_trained"], results["r2"]["why_not_trained"])
    # The critic that judged round 2 is the one round 1 refined (or round 0's, if round 1's
    # chains gave nothing to refine on: the refine row says which).
    crit2, _ = input_manifest(st, cfg.name, "critique", "critique.r2")
    assert {r["critic_adapter"] for r in crit2 if r.get("kind") != "human"} == \
        {results["r1"]["critic_adapter"]}
    # Round 2 sampled from round 1's adapter and trained from it.
    sha1 = hashlib.sha256(st.read_bytes(results["r1"]["adapter"])).hexdigest()
    r2, _ = input_manifest(st, cfg.name, "sample", "sample.r2")
    assert {r["adapter_sha256"] for r in r2} == {sha1}
    assert index["train.r2"]["config"]["init_adapter"] == results["r1"]["adapter"]
    text = render_report(st, cfg.name)
    assert "## Dual-IPO rounds" in text and "| 0 (seed) |" in text
    assert "agree" in text and "not measured" not in text  # the held-out human labels
