"""Same config + same data => byte-identical adapter and checkpoint files (issue 10), whatever
the interpreter's hash seed: peft keeps LoRA targets in a set, and safetensors writes its
metadata in a hash map's order, so both are written canonically (models/wan.py save_lora)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.config import TrainConfig
from infra.store import Store
from models.tiny import build_tiny
from models.wan import WanSpec, transformer_config
from pairs_data import write_random_pairs

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, str]:
    """sha256 of every adapter and checkpoint file under root (logs carry timings: not compared)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and (p.suffix in (".safetensors", ".pt") or "checkpoints" in p.parts):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Two trainings of one config on one dataset, in processes with different hash seeds."""
    tmp = tmp_path_factory.mktemp("repro")
    model = build_tiny("t2v", tmp / "t2v")
    store = Store(str(tmp / "store"))
    write_random_pairs(store, "data/pairs", transformer_config(WanSpec("t2v", model)), 2)
    cfg = TrainConfig.model_validate(dict(
        model=model, kind="t2v", dtype="float32", data="data/pairs", steps=2,
        lora=dict(rank=4, alpha=8), optimizer=dict(lr=1e-3), checkpoint=dict(every=1)))
    (tmp / "train.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    hashes = {}
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-m", "tasks.train", str(tmp / "train.json"),
                               "--store", store.url, "--out", f"runs/seed{seed}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        hashes[seed] = _files(tmp / "store" / "runs" / f"seed{seed}")
    return {"model": model, **hashes}


def test_adapter_and_checkpoints_are_byte_identical_across_hash_seeds(trained):
    one, two = trained["1"], trained["2"]
    assert any(k.endswith("pytorch_lora_weights.safetensors") and "checkpoints" not in k for k in one), one
    assert any("checkpoints" in k and k.endswith(".safetensors") for k in one), one
    assert one.keys() == two.keys()
    differ = [k for k in one if one[k] != two[k]]
    assert not differ, f"differ between PYTHONHASHSEED=1 and 2: {differ}"


def test_the_canonical_file_keeps_its_lora_config(trained, tmp_path):
    """What diffusers' load_lora_weights reads: the tensors, and the adapter metadata (r, alpha,
    target_modules) as JSON; written with sorted keys, sorted targets, a sorted header."""
    from safetensors import safe_open

    from models.wan import add_lora, load_transformer, save_lora

    transformer = load_transformer(WanSpec("t2v", trained["model"]))
    add_lora(transformer, rank=4, alpha=8)
    path = save_lora(transformer, tmp_path)
    with safe_open(str(path), "pt") as f:
        meta, names = f.metadata(), list(f.keys())
    assert names and all(n.startswith("transformer.") and "lora_" in n for n in names)
    lora = json.loads(meta["lora_adapter_metadata"])
    targets = lora["transformer.target_modules"]
    assert targets == sorted(targets) and lora["transformer.r"] == 4 and lora["transformer.lora_alpha"] == 8
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = data[8:8 + size]
    assert size % 8 == 0
    assert header.rstrip() == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()
