"""Deterministic keys and verified per-item checkpoints for stages (no Prefect here).

- item key   = digest(stage, the item's input identity, the settings that affect it, code)
- stage key  = digest(stage, its config, its input manifests' digests, code)

`code` is the digest of the functions that compute the stage's output (infra.code, declared
per stage in flows/dag.py). No key holds a store URL: a copied or synced store keeps its keys.

An item's row is committed as `items/<stage>/<item key>/row.json`, written after its
artifacts, and records each artifact's key, size and sha256. A row whose file is unreadable, or
whose artifacts are missing or of another size, does not count as committed: the item is
recomputed. The stage manifest is assembled from the rows and committed last
(docs/architecture.md, "The stage contract").
"""

from __future__ import annotations

import json
import posixpath
import time
from typing import Iterable

from infra.store import Store, digest, join_key


# Row fields that say when and by whom a row was made, not what it is: left out of the content
# digest that downstream keys use, so recomputing an item to the same result re-keys nothing.
VOLATILE = ("computed_at", "flow_run", "row_size", "gen_seconds")


def content_digest(rows: list[dict]) -> str:
    return digest([{k: v for k, v in r.items() if k not in VOLATILE} for r in rows], 64)


def output_digest(success: dict) -> str:
    """What a downstream key digests of a committed input: its content, not its bytes."""
    return success.get("content_digest") or success["manifest_sha256"]


def item_key(stage: str, identity: dict, settings: dict, code: str) -> str:
    return digest({"stage": stage, "item": identity, "settings": settings, "code": code})


def stage_key(stage: str, config: dict, input_digest: str, code: str) -> str:
    return digest({"stage": stage, "config": config, "input": input_digest, "code": code})


def entry_stage(entry: str) -> tuple[str, int | None]:
    """(stage, round) of a run-index entry: `pairs.r2` -> ("pairs", 2) (a Dual-IPO round's
    entry, flows/dag.py round_entry); `pairs` -> ("pairs", None)."""
    stage, dot, rest = entry.rpartition(".r")
    return (stage, int(rest)) if dot and stage and rest.isdigit() else (entry, None)


def stage_dir(stage: str, key: str) -> str:
    return join_key("stages", stage, key)


def item_dir(stage: str, ikey: str) -> str:
    return join_key("items", stage, ikey)


def row_key(stage: str, ikey: str) -> str:
    return f"{item_dir(stage, ikey)}/row.json"


def artifact_problems(row: dict, sizes: dict[str, int]) -> list[str]:
    """What is wrong with a row's recorded artifacts, given the store's sizes of their keys."""
    problems = []
    for a in row.get("artifacts") or []:
        size = sizes.get(a["key"])
        if size is None:
            problems.append(f"{a['key']} is missing")
        elif size != a["size"]:
            problems.append(f"{a['key']} has {size} bytes, the row recorded {a['size']}")
    return problems


def load_row(store: Store, stage: str, ikey: str) -> dict | None:
    """The committed row of an item, or None when it has none or it cannot be trusted (row.json
    unreadable, an artifact missing or of another size): then the item is recomputed."""
    try:
        row = json.loads(store.read_bytes(row_key(stage, ikey)))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None  # a torn or corrupted row.json is not a commit
    if not isinstance(row, dict) or row.get("item_key") != ikey:
        return None
    sizes: dict[str, int] = {}
    for prefix in {posixpath.dirname(a["key"]) for a in row.get("artifacts") or []}:
        sizes |= store.sizes(prefix)
    return None if artifact_problems(row, sizes) else row


def save_row(store: Store, stage: str, ikey: str, row: dict) -> dict:
    """Commit an item: called after all of its artifacts are written (by `store`, whose
    receipts of the item's dir and of the keys the row names become the row's artifacts)."""
    here = item_dir(stage, ikey) + "/"
    named = {v for v in row.values() if isinstance(v, str)}
    artifacts = store.take_receipts(lambda k: k.startswith(here) or k in named)
    row = {**row, "item_key": ikey, "artifacts": artifacts,
           "computed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.write_json(row_key(stage, ikey), row)
    return row


def bad_rows(store: Store, stage: str, rows: Iterable[dict]) -> list[dict]:
    """The rows of a committed manifest whose row.json or artifacts no longer match what was
    committed (one listing per prefix, not one request per item)."""
    rows = list(rows)
    prefixes = {f"items/{stage}"}
    for r in rows:
        prefixes |= {posixpath.dirname(a["key"]) for a in r.get("artifacts") or []
                     if not a["key"].startswith(f"items/{stage}/")}
    sizes: dict[str, int] = {}
    for prefix in sorted(prefixes):
        sizes |= store.sizes(prefix)
    bad = []
    for r in rows:
        row_file = row_key(stage, r["item_key"]) if r.get("item_key") else None
        if row_file and sizes.get(row_file) != r.get("row_size"):
            bad.append(r)
        elif artifact_problems(r, sizes):
            bad.append(r)
    return bad


def row_sizes(store: Store, stage: str, rows: list[dict]) -> list[dict]:
    """The rows with the size of their committed row.json (what reuse checks against)."""
    sizes = store.sizes(f"items/{stage}")
    return [r | {"row_size": sizes.get(row_key(stage, r["item_key"]))} if r.get("item_key")
            else r for r in rows]


def input_manifest(store: Store, run: str, stage: str, entry: str | None = None
                   ) -> tuple[list[dict], dict]:
    """The committed manifest `stage` produced for `run` (via the run index, under `entry`:
    a Dual-IPO round's `<stage>.r<k>`, else the stage's own name)."""
    index, entry = store.read_run(run), entry or stage
    if not index or entry not in index.get("stages", {}):
        raise LookupError(
            f"run {run!r} has no committed {entry!r} stage in {store.url}: run `regdpo run CONFIG "
            f"--run {run} --only {stage}` (or the {stage} deployment) first"
        )
    table, success = store.read_manifest(stage_dir(stage, index["stages"][entry]["key"]))
    return table.to_pylist(), success

