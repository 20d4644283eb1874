"""Prefect wiring shared by the stage flows: the cached per-item task, bounded submission with
a progress artifact, and the stage commit (manifest, `_SUCCESS.json`, run index, table)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from collections import Counter, deque
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.context import get_run_context
from prefect.filesystems import RemoteFileSystem
from prefect.futures import as_completed
from prefect.tasks import exponential_backoff

from infra.stage import load_row, save_row, stage_dir
from infra.store import Store, digest

# stage name -> fn(store, item_key, payload) -> row fields; registered by each stage flow module.
ITEM_FUNCS: dict[str, Callable[[Store, str, dict], dict]] = {}


def _cache_key(context, params: dict) -> str:
    # The item key already digests the item's inputs, its settings and the stage's source.
    return digest([params["store_url"], params["stage"], params["ikey"]], 32)


def _transient_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from tasks.acquire import TransientError

    return TransientError, ConnectionError, TimeoutError, BotoConnectionError


def _transient(task, task_run, state) -> bool:
    """Retry only network/storage hiccups, never bad input."""
    try:
        state.result()
    except _transient_errors():
        return True
    except Exception:
        return False
    return False


@task(
    name="item",
    task_run_name="{stage}:{label}",
    cache_key_fn=_cache_key,
    persist_result=True,
    result_serializer="json",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=_transient,
)
def process_item(stage: str, store_url: str, ikey: str, label: str, payload: dict) -> dict:
    """Do one item's work unless its row is already committed in the store."""
    store = Store(store_url)
    row = load_row(store, stage, ikey)
    if row is None:
        fields = ITEM_FUNCS[stage](store, ikey, payload)
        row = save_row(store, stage, ikey, fields | {"flow_run": _flow_run_id()})
    return row


def _flow_run_id() -> str:
    ctx = get_run_context()
    run = getattr(ctx, "flow_run", None) or getattr(getattr(ctx, "task_run", None), "flow_run_id", None)
    return str(getattr(run, "id", run) or "")


def result_storage(store: Store):
    """Prefect's persisted task results live in the artifact store, as JSON (never pickle).

    A remote store gets a saved RemoteFileSystem block that holds only the base URL;
    credentials and the endpoint stay in the environment (AWS_* variables)."""
    if store.local:
        return Path(store.path("cache/prefect"))
    block = RemoteFileSystem(basepath=store.uri("cache/prefect"))
    block.save(f"regdpo-results-{digest(store.url, 12)}", overwrite=True)
    return block


def run_items(stage: str, store: Store, work: list[tuple[str, str, dict]], workers: int) -> list[dict]:
    """Run (item key, label, payload) work items, `workers` at a time; failures become rows.
    Rows come back in the order of `work`."""
    log = get_run_logger()
    item = process_item.with_options(result_storage=result_storage(store))
    total = len(work)
    progress = create_progress_artifact(0.0, description=f"{stage}: {total} items")
    pending, inflight, rows = deque(enumerate(work)), {}, [None] * total
    while pending or inflight:
        while pending and len(inflight) < workers:
            i, (ikey, label, payload) = pending.popleft()
            inflight[item.submit(stage, store.url, ikey, label, payload)] = i
        done = next(as_completed(list(inflight)))
        i = inflight.pop(done)
        try:
            rows[i] = done.result()
        except Exception as e:  # one bad item never stops the stage; a re-run retries it
            label, payload = work[i][1], work[i][2]
            log.warning("%s item %s failed: %s", stage, label, e)
            rows[i] = {"id": payload.get("id", label), "status": "failed",
                       "reason": f"{type(e).__name__}: {e}"[:500]}
        update_progress_artifact(progress, 100.0 * (total - len(pending) - len(inflight)) / max(total, 1))
    return rows


def reason_kind(reason: str | None) -> str:
    """A short category for counting: the reason up to its first ':', '(' or number."""
    return re.split(r"[:(]|\s\d", reason or "")[0].strip() or "-"


@task(name="commit", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_condition_fn=_transient, cache_policy=NO_CACHE)
def commit_stage(store_url: str, run: str, stage: str, key: str, rows: list[dict], config: dict,
                 inputs: dict, started: float) -> dict:
    """Commit the manifest (then `_SUCCESS.json`), record it in the run index, publish a table."""
    store = Store(store_url)
    this_run = _flow_run_id()
    counts = Counter((r["status"], reason_kind(r.get("reason"))) for r in rows)
    table = [{"status": s, "reason": k, "count": n} for (s, k), n in sorted(counts.items())]
    success = {
        "stage": stage, "key": key, "run": run, "config": config, "inputs": inputs,
        "counts": {s: sum(n for (st, _), n in counts.items() if st == s) for s in ("ok", "rejected", "failed")},
        "by_reason": table,
        "reused": sum(1 for r in rows if r.get("flow_run") and r.get("flow_run") != this_run),
        "computed": sum(1 for r in rows if r.get("flow_run") == this_run),
        "seconds": round(time.time() - started, 2),
    }
    record = store.commit_manifest(stage_dir(stage, key), rows, success)
    entry = {"key": key, "manifest": record["manifest"], "counts": success["counts"], "config": config}
    store.update_run(run, stage, entry)
    publish_summary(run, stage, record)
    return entry


def publish_summary(run: str, stage: str, record: dict) -> None:
    slug = re.sub(r"[^a-z0-9-]+", "-", f"{run}-{stage}".lower()).strip("-")
    create_table_artifact(
        key=slug, table=record["by_reason"],
        description=f"**{stage}** for run `{run}`: {record['counts']} "
                    f"(computed {record['computed']}, reused {record['reused']}); manifest {record['manifest']}",
    )


def committed_entry(store: Store, run: str, stage: str, key: str, config: dict) -> dict | None:
    """If this exact stage output is already committed, record it for the run and return it.
    An output with failed rows is not reused: the re-run retries those items (committed items
    are found by their rows) and commits the stage again."""
    if not store.is_committed(stage_dir(stage, key)):
        return None
    success = store.read_success(stage_dir(stage, key))
    if success["counts"].get("failed"):
        get_run_logger().info("%s: retrying the %d failed item(s) of %s", stage,
                              success["counts"]["failed"], success["manifest"])
        return None
    get_run_logger().info("%s: inputs and config unchanged, reusing %s", stage, success["manifest"])
    entry = {"key": key, "manifest": success["manifest"], "counts": success["counts"], "config": config}
    store.update_run(run, stage, entry)
    return entry


def recorded_config(store: Store, run: str, stage: str, cls: type) -> Any:
    """The config a run last used for `stage` (so a UI re-run repeats it), else the defaults."""
    index = store.read_run(run) or {}
    data = (index.get("stages", {}).get(stage) or {}).get("config")
    if data is None:
        data = (index.get("config") or {}).get(stage, {})
    return cls.model_validate(data)
