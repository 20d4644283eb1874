"""A store moves and heals (docs/architecture.md, "The stage contract"):

- manifests, rows, _SUCCESS.json and the run index hold store-relative keys, and no key digests
  the store's URL: the toy pipeline's store copied to another folder, or synced to a real S3
  server, reruns there as a lookup (no item recomputed), and train and evaluate resolve;
- rows record their artifacts' sizes and digests: a truncated row.json and a truncated gt.mp4
  are found on reuse and recomputed (never served), and nothing else is redone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _config(toy_dir: Path, tmp: Path, store: str):
    from infra.config import load_config

    (tmp / "configs").mkdir(exist_ok=True)
    shutil.copy(REPO / "configs" / "toy.yaml", tmp / "configs" / "toy.yaml")
    if not (tmp / "toy").exists():
        (tmp / "toy").symlink_to(toy_dir)
    return load_config(tmp / "configs" / "toy.yaml", [f"store={store}", "name=p"])


def _rows(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.glob("items/*/*/row.json")}


def _keys(store) -> dict[str, str]:
    return {s: e["key"] for s, e in store.read_run("p")["stages"].items()}


def test_copied_and_synced_store_rerun_as_lookups_and_heal(prefect_api, toy_dir, tmp_path,
                                                           s3_admin_fs, s3_store_url):
    from flows.pipeline import pipeline
    from infra.stage import input_manifest
    from infra.store import Store

    a, b = tmp_path / "store-a", tmp_path / "moved" / "store-b"
    cfg = _config(toy_dir, tmp_path, f"file://{a}")
    pipeline(run="p", config=cfg)
    keys = _keys(Store(cfg.store))
    for path in a.glob("**/*.json"):  # no absolute reference anywhere in the store's records
        assert str(a) not in path.read_text(), path

    # 1. A copy in another folder: every stage is a lookup, train and evaluate resolve.
    shutil.copytree(a, b)
    moved = cfg.model_copy(update={"store": f"file://{b}"})
    rows = _rows(b)
    results = pipeline(run="p", config=moved)
    st = Store(moved.store)
    assert _keys(st) == keys and _rows(b) == rows  # nothing recomputed, nothing rewritten
    assert st.exists(st.key_of(results["train"]["adapter"]))
    more = moved.model_copy(update={"evaluate": moved.evaluate.model_copy(update={
        "generate": moved.evaluate.generate.model_copy(update={"seeds": [0, 1]})})})
    evaluated = pipeline(run="p", config=more, only=["evaluate"])["evaluate"]
    assert evaluated["counts"]["failed"] == 0 and evaluated["counts"]["ok"] > 0
    videos, _ = input_manifest(st, "p", "evaluate")
    assert {r["model"] for r in videos} == {"base", "regdpo"}  # the adapter resolved in the copy

    # 2. Integrity: a torn row.json and a truncated GT clip are recomputed on the next run.
    gt_rows = [r for r in input_manifest(st, "p", "normalize")[0] if r["status"] == "ok"]
    torn, cut = (b / "items" / "normalize" / r["item_key"] for r in gt_rows[:2])
    (torn / "row.json").write_text((torn / "row.json").read_text()[:40])
    video = cut / "gt.mp4"
    recorded = next(x["size"] for x in json.loads((cut / "row.json").read_text())["artifacts"]
                    if x["key"].endswith("gt.mp4"))
    video.write_bytes(video.read_bytes()[: recorded // 2])
    before = _rows(b)
    pipeline(run="p", config=more)
    after = _rows(b)
    assert json.loads((torn / "row.json").read_text())["status"] == "ok"  # repaired
    assert video.stat().st_size == recorded
    redone = {k for k in after if after[k] != before.get(k)}
    assert redone == {str(p.relative_to(b) / "row.json") for p in (torn, cut)}, sorted(redone)
    assert {s: k for s, k in _keys(st).items() if s != "evaluate"} == \
        {s: k for s, k in keys.items() if s != "evaluate"}  # same content: no stage re-keyed

    # 3. The original store synced to a real S3 server: the same keys, still only lookups.
    bucket = s3_store_url[len("s3://"):]
    s3_admin_fs.put(str(a) + "/", bucket, recursive=True)

    def stamps() -> dict[str, str]:
        found = s3_admin_fs.find(f"{bucket}/items", detail=True)
        return {k: str(v.get("LastModified") or v.get("mtime")) for k, v in found.items()
                if k.endswith("/row.json")}

    synced = stamps()
    assert synced
    on_s3 = cfg.model_copy(update={"store": s3_store_url})
    pipeline(run="p", config=on_s3)
    assert _keys(Store(s3_store_url)) == keys and stamps() == synced
