"""Deterministic keys and per-item checkpoints for stages (no Prefect here).

- item key   = digest(stage, the item's input identity, the settings that affect it, code version)
- stage key  = digest(stage, its config, input manifest digest, code version)

An item's row is committed as `items/<stage>/<item key>/row.json`, written after its
artifacts; a killed stage restarted with the same inputs finds those rows and redoes nothing
that was committed. The stage manifest is assembled from the rows and committed last.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from functools import lru_cache
from pathlib import Path

from infra.store import Store, digest, join_key

# The modules whose source defines each stage's output; editing one invalidates its keys.
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "acquire": ("tasks.acquire", "infra.video"),
    "filter": ("tasks.filter", "infra.video"),
    "normalize": ("tasks.normalize", "infra.video", "models.captioner"),
    "negatives": ("tasks.negatives", "tasks.precompute", "tasks.normalize", "infra.video",
                  "models.wan"),
    "pairs": ("tasks.pairs",),
    "precompute": ("tasks.precompute", "models.wan", "infra.video", "tasks.train"),
    "train": ("tasks.train", "losses.preference", "losses.errors", "models.wan", "infra.parallel",
              "infra.distributed", "infra.checkpoint"),
    # The code a test video depends on (the report's code does not: editing it regenerates nothing).
    "evaluate": ("tasks.evaluate", "tasks.negatives", "tasks.normalize", "infra.video", "models.wan"),
}


@lru_cache(maxsize=None)
def code_version(stage: str) -> str:
    """Digest of the stage's source files, read without importing them (no heavy imports)."""
    h = hashlib.sha256()
    for name in STAGE_MODULES[stage]:
        h.update(Path(importlib.util.find_spec(name).origin).read_bytes())
    return h.hexdigest()[:16]


def item_key(stage: str, identity: dict, settings: dict) -> str:
    return digest({"stage": stage, "item": identity, "settings": settings, "code": code_version(stage)})


def stage_key(stage: str, config: dict, input_digest: str) -> str:
    return digest({"stage": stage, "config": config, "input": input_digest, "code": code_version(stage)})


def stage_dir(stage: str, key: str) -> str:
    return join_key("stages", stage, key)


def item_dir(stage: str, ikey: str) -> str:
    return join_key("items", stage, ikey)


def load_row(store: Store, stage: str, ikey: str) -> dict | None:
    try:
        return store.read_json(f"{item_dir(stage, ikey)}/row.json")
    except FileNotFoundError:
        return None


def save_row(store: Store, stage: str, ikey: str, row: dict) -> dict:
    """Commit an item: called after all of its artifacts are written."""
    row = {**row, "item_key": ikey, "computed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.write_json(f"{item_dir(stage, ikey)}/row.json", row)
    return row


def input_manifest(store: Store, run: str, stage: str) -> tuple[list[dict], dict]:
    """The committed manifest `stage` produced for `run` (via runs/<run>/run.json)."""
    index = store.read_run(run)
    if not index or stage not in index.get("stages", {}):
        raise LookupError(
            f"run {run!r} has no committed {stage!r} stage in {store.url}: run `regdpo run CONFIG "
            f"--run {run} --only {stage}` (or the {stage} deployment) first"
        )
    table, success = store.read_manifest(stage_dir(stage, index["stages"][stage]["key"]))
    return table.to_pylist(), success
