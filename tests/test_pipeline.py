"""The whole DAG on toy clips with the shipped configs/toy.yaml (tiny random-weight Wan2.1 I2V):
acquire -> filter -> normalize -> negatives -> pairs -> precompute -> train -> evaluate.

Then the re-run contract, proven by counting the work done (item rows written, stage outputs
committed): an unchanged re-run does nothing; re-running one stage with a changed config redoes
only that stage (and only its new items); every other stage keeps its committed output.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

STAGES = ["acquire", "filter", "normalize", "negatives", "pairs", "precompute", "train", "evaluate"]


def _toy_config(toy_dir: Path, tmp: Path, store: str):
    """configs/toy.yaml as shipped, next to a `toy` folder (its paths are ../toy/...)."""
    from infra.config import load_config

    (tmp / "configs").mkdir()
    shutil.copy(REPO / "configs" / "toy.yaml", tmp / "configs" / "toy.yaml")
    (tmp / "toy").symlink_to(toy_dir)
    return load_config(tmp / "configs" / "toy.yaml", [f"store={store}", "name=p"])


def _rows(root: Path) -> dict[str, float]:
    """Every committed item row in the store -> its mtime (a new or rewritten row = work done)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.glob("items/*/*/row.json")}


def _keys(store) -> dict[str, str]:
    return {s: e["key"] for s, e in store.read_run("p")["stages"].items()}


def test_toy_pipeline_end_to_end_then_rerun_one_stage(prefect_api, toy_dir: Path, tmp_path: Path):
    from flows.pipeline import pipeline
    from infra.stage import input_manifest, stage_dir
    from infra.store import Store
    from tasks.report import render_report
    from infra.pairs_format import PairsDataset
    from models.wan import transformer_config
    from models.wan import WanSpec

    root = tmp_path / "store"
    cfg = _toy_config(toy_dir, tmp_path, f"file://{root}")
    st = Store(cfg.store)

    # 1. The whole DAG.
    results = pipeline(run="p", config=cfg)
    assert list(results) == STAGES
    counts = {s: results[s]["counts"] for s in STAGES}
    assert counts["normalize"]["ok"] >= 5 and counts["filter"]["rejected"] >= 5, counts
    assert all(c["failed"] == 0 for c in counts.values()), counts
    assert counts["negatives"]["ok"] == counts["normalize"]["ok"]  # one generator: one each
    pairs, _ = input_manifest(st, "p", "pairs")
    train_gt = {r["gt_id"] for r in pairs if r["split"] == "train"}
    test_gt = {r["gt_id"] for r in pairs if r["split"] == "test"}
    assert train_gt and test_gt and not train_gt & test_gt  # split by GT clip
    assert counts["precompute"]["ok"] == sum(r["split"] == "train" and r["status"] == "ok" for r in pairs)
    data = PairsDataset.open(st, stage_dir("precompute", results["precompute"]["key"]))
    data.validate(transformer_config(WanSpec("i2v", cfg.train.model)), need_mask=False, batch_size=1)
    assert st.exists(st.key_of(results["train"]["adapter"]))
    videos, _ = input_manifest(st, "p", "evaluate")
    assert {r["model"] for r in videos} == {"base", "regdpo"} and all(r["status"] == "ok" for r in videos)
    assert all(r["proxy_dynamic_degree"] is not None for r in videos)
    report = render_report(st, "p")
    assert "PROXY" in report and "NOT VBench" in report and "Total_Score" in report
    assert "stale" not in report

    # 2. The same run again: every stage is a lookup; no item row is written or rewritten.
    rows, keys = _rows(root), _keys(st)
    successes = {s: (root / stage_dir(s, k) / "_SUCCESS.json").read_bytes() for s, k in keys.items()}
    pipeline(run="p", config=cfg)
    assert _rows(root) == rows and _keys(st) == keys
    assert {s: (root / stage_dir(s, k) / "_SUCCESS.json").read_bytes() for s, k in keys.items()} == successes

    # 3. Re-run only `evaluate` with a second seed: only the new seed's videos are made (and
    #    scored); the first seed's are reused, and no other stage moves.
    more = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={
        "generate": cfg.evaluate.generate.model_copy(update={"seeds": [0, 1]})})})
    pipeline(run="p", config=more, only=["evaluate"])
    new = set(_rows(root)) - set(rows)
    # The prompts of the first seed's videos: up to max_prompts, fewer when the split held out fewer.
    n_models, n_prompts = 2, sum(r["model"] == "base" for r in videos)
    assert {p.split("/")[1] for p in new} == {"evaluate", "evaluate-proxy"}, sorted(new)
    assert sum(p.startswith("items/evaluate/") for p in new) == n_models * n_prompts
    assert {k: v for k, v in _rows(root).items() if k in rows} == rows  # nothing rewritten
    after = _keys(st)
    assert after["evaluate"] != keys["evaluate"]
    assert {s: after[s] for s in STAGES[:-1]} == {s: keys[s] for s in STAGES[:-1]}
    success = st.read_success(stage_dir("evaluate", after["evaluate"]))
    assert success["counts"]["ok"] == 2 * len(videos)
    assert success["computed"] == len(videos) and success["reused"] == len(videos)

    # 4. Re-run only `train` with more steps: a new adapter, no item anywhere redone, and the
    #    report says the evaluation is now stale (it scored the previous adapter).
    rows = _rows(root)
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": cfg.train.steps + 2})})
    pipeline(run="p", config=longer, only=["train"])
    assert _rows(root) == rows
    final = _keys(st)
    assert final["train"] != after["train"]
    assert {s: final[s] for s in STAGES if s != "train"} == {s: after[s] for s in STAGES if s != "train"}
    assert "stale: built from an older train output; re-run evaluate" in render_report(st, "p")
