"""The stage template: what every stage flow does around its own item logic.

    s = StageRun(STAGES["filter"], run, config, store)   # config: given, else the run's recorded
    rows_in = s.rows("acquire")                          # committed input via the run index
    if entry := s.reuse(settings): return entry          # same key, verified -> a lookup
    rows = s.map([s.work(identity, settings, label, payload), ...], s.cfg.workers)
    return s.commit(rows)                                # manifest, _SUCCESS, run index, table

Keys: item keys digest (identity, settings, the stage's code version); the stage key digests
(settings, the input manifests' digests, the code version). Items run as Prefect tasks, bounded
by `workers`, in the flow's threads or on the run's cluster runner (flows/runner.py) for the
maps a stage names in `cluster`; an item's committed row in the store is its cache (verified on every lookup), not
Prefect's result cache, which could not see a truncated artifact.
"""

from __future__ import annotations

import importlib
import queue
import re
import time
from collections import Counter, deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.tasks import exponential_backoff

from flows.dag import Stage, round_entry
from flows.runner import Submit, item_runner
from infra import shutdown
from infra.config import RunnerConfig, Section
from infra.progress import Progress
from infra.stage import bad_rows, content_digest, item_dir, output_digest, item_key, load_row, row_sizes, save_row, stage_dir, stage_key
from infra.store import Store, digest
from infra.video import on_cores


def _transient_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import ConnectionError as BotoConnectionError

    from infra.errors import TransientError

    return TransientError, ConnectionError, TimeoutError, BotoConnectionError


# The UI's progress bar of a map moves at most this often (and at its end): each move is an API
# call, which a map of short items (acquire's, normalize's commits) would make per item.
PUBLISH_EVERY_S = 1.0


def transient(task, task_run, state) -> bool:
    """Retry only network/storage hiccups, never bad input."""
    try:
        state.result()
    except _transient_errors():
        return True
    except Exception:
        return False
    return False


def resolve(ref: str) -> Callable:
    """The function named "module:function" (item functions are named, not registered)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@task(name="item", task_run_name="{stage}:{label}", cache_policy=NO_CACHE, retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=transient)
def process_item(stage: str, fn: str, store_url: str, ikey: str, label: str, payload: dict,
                 cores: int | None = None) -> dict:
    """Do one item's work unless its row is committed (and still matches its artifacts), its
    ffmpeg on `cores` cores (flows/runner.py)."""
    store = Store(store_url)
    row = load_row(store, stage, ikey)
    if row is None:
        with on_cores(cores):
            fields = resolve(fn)(store, item_dir(stage, ikey), payload)
        row = save_row(store, stage, ikey, fields | {"flow_run": flow_run_id()})
    return row


def _next_finished(finished: queue.SimpleQueue):
    """The next finished future, waited for in short slices: the kernel may hand SIGTERM to
    any thread, and its Python handler runs only once the main thread wakes (a wait without
    a timeout would never wake)."""
    while True:
        try:
            return finished.get(timeout=0.25)
        except queue.Empty:
            continue


def flow_run_id() -> str:
    ctx = get_run_context()
    run = getattr(ctx, "flow_run", None) or getattr(getattr(ctx, "task_run", None), "flow_run_id", None)
    return str(getattr(run, "id", run) or "")


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def reason_kind(reason: str | None) -> str:
    """A short category for counting: the reason up to its first ':', '(' or number."""
    return re.split(r"[:(]|\s\d", reason or "")[0].strip() or "-"


class StageRun:
    """One execution of a stage for a run: config, inputs, keys, reuse, items, commit."""

    def __init__(self, stage: Stage, run: str, config: Section | dict | None, store: str,
                 overrides: list[str] | None = None, round: int | None = None):
        shutdown.rearm()  # SIGTERM asks the items to stop, not Prefect to abandon them
        self.stage, self.run, self.started = stage, run, time.time()
        # A Dual-IPO round's stage: its run-index entry and the inputs it reads are the round's.
        self.round, self.entry = round, round_entry(stage.name, round)
        tag_flow_run(f"run:{run}", f"stage:{stage.name}",  # first: a refused run is found too
                     *([f"round:{round}"] if round is not None else []))
        self.store = Store(store)
        cfg = stage.config.model_validate(config) if config is not None else \
            recorded_config(self.store, run, self.entry, stage.config, stage.name)
        mine = [o for o in overrides or [] if not o.strip().startswith("runner.")]
        self.cfg = with_overrides(cfg, stage.name, mine)
        self.runner = run_runner(self.store, run, [o for o in overrides or [] if o not in mine])
        if stage.cluster:  # before any work: a store the workers cannot reach, no prefect-dask
            from flows.runner import runner_problems
            from infra.config import ConfigError, store_problem

            if problems := [p for p in [store_problem(self.runner, self.store.url)] if p] + \
                    runner_problems(self.runner):
                raise ConfigError(f"{stage.name} for run {run!r}: " + "; ".join(problems))
        self.code = stage.code_version
        self._inputs: dict[str, tuple[list[dict], dict]] = {}
        self.key: str | None = None

    # -- inputs --------------------------------------------------------------------------

    def input(self, stage: str) -> tuple[list[dict], dict]:
        """(rows, success record) of the run's committed `stage` (one of `reads`)."""
        if stage not in self.stage.reads + self.stage.mode_reads:
            raise ValueError(f"{self.stage.name} does not read {stage} (flows/dag.py)")
        if stage not in self._inputs:
            from infra.stage import input_manifest

            self._inputs[stage] = input_manifest(self.store, self.run, stage,
                                                 round_entry(stage, self.round))
        return self._inputs[stage]

    def rows(self, stage: str, status: str | None = "ok") -> list[dict]:
        rows = self.input(stage)[0]
        return [r for r in rows if status is None or r.get("status") == status]

    # -- keys and reuse ------------------------------------------------------------------

    def item_key(self, identity: dict, settings: dict) -> str:
        return item_key(self.stage.name, identity, settings, self.code)

    def work(self, identity: dict, settings: dict, label: str, payload: dict) -> tuple[str, str, dict]:
        return self.item_key(identity, settings), label, payload

    def reuse(self, settings: dict, extra: list | None = None) -> dict | None:
        """Fix the stage key; if that output is committed, whole and without failed items,
        record it for the run and return its entry (else None: the stage runs, reusing every
        committed item). Bad items of a committed output (row or artifact missing, torn or
        resized) are found here and recomputed, never served."""
        # The inputs this run read (a stage may read a subset: annotated pairs need no negatives).
        digests = [output_digest(self._inputs[s][1]) for s in
                   self.stage.reads + self.stage.mode_reads if s in self._inputs] + list(extra or [])
        self.key = stage_key(self.stage.name, settings, digest(digests), self.code)
        st, out = self.store, stage_dir(self.stage.name, self.key)
        if not st.is_committed(out):
            return None
        success = st.read_success(out)
        log = get_run_logger()
        if success["counts"].get("failed"):
            log.info("%s: retrying the %d failed item(s) of %s", self.stage.name,
                     success["counts"]["failed"], success["manifest"])
            return None
        rows = st.read_manifest(out)[0].to_pylist()
        if bad := bad_rows(st, self.stage.name, rows):
            log.warning("%s: %d committed item(s) of %s no longer match their artifacts; "
                        "recomputing them", self.stage.name, len(bad), success["manifest"])
            return None
        log.info("%s: inputs and config unchanged, reusing %s", self.stage.name, success["manifest"])
        entry = {"key": self.key, "manifest": success["manifest"], "counts": success["counts"],
                 "config": self.cfg.model_dump(mode="json")}
        st.update_run(self.run, self.entry, entry)
        return entry

    # -- items ---------------------------------------------------------------------------

    def map(self, work: list[tuple[str, str, dict]], workers: int, fn: str | None = None,
            name: str | None = None, retries: int | None = None) -> list[dict]:
        """Run (item key, label, payload) work items, `workers` at a time (on the run's
        cluster runner when the stage names `name` in its `cluster` maps: as many as its
        workers take); failures become rows (naming the item's source). Rows come back in the
        order of `work`. Stops submitting when the process is asked to shut down
        (SIGTERM/SIGINT)."""
        name, fn = name or self.stage.name, fn or self.stage.item
        if not work:
            return []
        with item_runner(self.runner if name in self.stage.cluster else THREADS, workers) as \
                (submit, window, cores):
            return self._map(work, submit, window, cores, fn, name, retries)

    def _map(self, work: list[tuple[str, str, dict]], submit: Submit, window: int, cores: int,
             fn: str, name: str, retries: int | None) -> list[dict]:
        log = get_run_logger()
        item = process_item if retries is None else process_item.with_options(retries=retries)
        total = len(work)
        progress = create_progress_artifact(0.0, description=f"{name}: {total} items")
        published, shown = time.monotonic(), 0  # the artifact's last update (an API call each)
        counter = Progress(total, name, log.info)  # count, rate, ETA: a line every 10 s, a TTY bar
        pending, inflight, rows = deque(enumerate(work)), {}, [None] * total
        finished: queue.SimpleQueue = queue.SimpleQueue()
        while pending or inflight:
            while pending and len(inflight) < window and not shutdown.requested():
                i, (ikey, label, payload) = pending.popleft()
                future = submit(item, {"stage": name, "fn": fn, "store_url": self.store.url,
                                       "ikey": ikey, "label": label, "payload": payload,
                                       "cores": cores})
                inflight[future] = i
                future.add_done_callback(finished.put)
            if not inflight:
                break
            try:
                done = _next_finished(finished)
            except BaseException:  # Prefect's SIGTERM bridge, ^C: the running items stop too
                shutdown.request()
                raise
            i = inflight.pop(done)
            try:
                rows[i] = done.result()
            except Exception as e:  # one bad item never stops the stage; a re-run retries it
                label, payload = work[i][1], work[i][2]
                log.warning("%s item %s failed: %s", name, label, e)
                rows[i] = {"id": payload.get("id", label), "source": payload.get("source"),
                           "status": "failed", "reason": f"{type(e).__name__}: {e}"[:500]}
            counter.update()
            if time.monotonic() - published >= PUBLISH_EVERY_S:
                shown, published = counter.done, time.monotonic()
                update_progress_artifact(progress, 100.0 * shown / max(total, 1))
        counter.close()
        if counter.done != shown:  # the end, or where a shutdown stopped it
            update_progress_artifact(progress, 100.0 * counter.done / max(total, 1))
        shutdown.raise_if_requested(f"{name}: stopped with {len(pending)} item(s) not started")
        return rows

    # -- commit --------------------------------------------------------------------------

    def commit(self, rows: list[dict], inputs: dict | None = None) -> dict:
        """The manifest (then `_SUCCESS.json`), the run index entry, a summary table."""
        if self.key is None:
            raise RuntimeError("StageRun.reuse() fixes the stage key before commit()")
        inputs = {s: self._inputs[s][1]["manifest"] for s in self.stage.reads + self.stage.mode_reads
                  if s in self._inputs} | (inputs or {})
        return commit_stage(self.store.url, self.run, self.stage.name, self.key, rows,
                            self.cfg.model_dump(mode="json"), inputs, self.started, self.entry)

    @property
    def out(self) -> str:
        """The stage output's own dir (reports, plots, the adapter) beside its manifest."""
        return stage_dir(self.stage.name, self.key)


@task(name="commit", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_condition_fn=transient, cache_policy=NO_CACHE)
def commit_stage(store_url: str, run: str, stage: str, key: str, rows: list[dict], config: dict,
                 inputs: dict, started: float, entry_name: str | None = None) -> dict:
    """Commit the manifest (then `_SUCCESS.json`), record it in the run index (under
    `entry_name`: a Dual-IPO round's `<stage>.r<k>`, else the stage), publish a table."""
    store = Store(store_url)
    this_run = flow_run_id()
    rows = row_sizes(store, stage, rows)
    counts = Counter((r["status"], reason_kind(r.get("reason"))) for r in rows)
    table = [{"status": s, "reason": k, "count": n} for (s, k), n in sorted(counts.items())]
    success = {
        "stage": stage, "key": key, "run": run, "config": config, "inputs": inputs,
        "counts": {s: sum(n for (st, _), n in counts.items() if st == s) for s in ("ok", "rejected", "failed")},
        "by_reason": table,
        "reused": sum(1 for r in rows if r.get("flow_run") and r.get("flow_run") != this_run),
        "computed": sum(1 for r in rows if r.get("flow_run") == this_run),
        "seconds": round(time.time() - started, 2),
        "content_digest": content_digest(rows),
    }
    record = store.commit_manifest(stage_dir(stage, key), rows, success)
    entry = {"key": key, "manifest": record["manifest"], "counts": success["counts"], "config": config}
    store.update_run(run, entry_name or stage, entry)
    create_table_artifact(
        key=artifact_key(run, entry_name or stage), table=record["by_reason"],
        description=f"**{entry_name or stage}** for run `{run}`: {record['counts']} (computed "
                    f"{record['computed']}, reused {record['reused']}); manifest "
                    f"{store.uri(record['manifest'])}")
    return entry


def with_overrides(cfg: Section, stage: str, overrides: list[str]) -> Section:
    """`cfg` with `--set`-style overrides ("train.steps=60") applied; each must name a key of
    this stage's section. Errors name the override and the key path, before any work."""
    from infra.config import ConfigError, apply_overrides, load_section

    if not overrides:
        return cfg
    for item in overrides:
        if not item.strip().startswith(f"{stage}."):
            raise ConfigError(f"override {item!r}: a {stage} run takes only {stage}.<key>=<value>")
    data = apply_overrides({stage: cfg.model_dump(mode="json")}, overrides)
    return load_section(type(cfg), data[stage], f"{stage} overrides {overrides}")


def tag_flow_run(*tags: str) -> None:
    """Add tags to the current flow run (the UI filters runs by them); outside a flow run, or
    where the API refuses, the run simply goes untagged."""
    from prefect import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    try:
        with get_client(sync_client=True) as client:  # its tags as created: no read back
            client.update_flow_run(flow_run.id, tags=sorted(set(flow_run.tags) | set(tags)))
    except Exception as e:  # noqa: BLE001 - tags are for browsing; they never fail a stage
        get_run_logger().debug("could not tag the flow run: %s", e)


@contextmanager
def quiet_subflows() -> Iterator[None]:
    """Subflows started in the block send no heartbeat of their own: they run in the calling
    flow's process, whose heartbeat already says it is alive, and Prefect joins a flow's
    heartbeat thread (which sleeps in 1 s slices) at its end, up to a second per stage.

    The same as temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}) without
    its price: that re-validates every Prefect setting from the environment and profile
    files (0.1 s a call, measured); this copies the current settings with the one change."""
    from prefect.context import SettingsContext, get_settings_context

    ctx = get_settings_context()
    flows = ctx.settings.flows.model_copy(update={"heartbeat_frequency": None})
    with SettingsContext(profile=ctx.profile, settings=ctx.settings.model_copy(update={"flows": flows})):
        yield


@contextmanager
def heartbeats_if_watched() -> Iterator[None]:
    """A top-level flow run started in the block (`regdpo run`, the benchmarks) sends heartbeats
    only where something can watch them: a Prefect server that outlives this process
    (PREFECT_API_URL set), whose zombie-run automation marks a run crashed once its heartbeats
    stop. Prefect's ephemeral API (PREFECT_API_URL unset) stops with this process, so no one
    could; there the flow sends none, and its end does not wait up to a second for Prefect to
    join the heartbeat thread (which sleeps in 1 s slices)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield
    else:
        with quiet_subflows():
            yield


THREADS = RunnerConfig()


def run_runner(store: Store, run: str, overrides: list[str]) -> RunnerConfig:
    """The run's runner (`runner` of the config recorded in the run index: what the pipeline
    ran with, so a stage deployment started alone runs where the pipeline did), with
    `runner.*` overrides for this stage run only. A run never recorded runs on threads."""
    from infra.config import apply_overrides, load_section

    data = ((store.read_run(run) or {}).get("config") or {}).get("runner") or {}
    data = apply_overrides({"runner": data}, overrides)["runner"]
    return load_section(RunnerConfig, data, f"runner of run {run!r} (overrides {overrides})")


def recorded_config(store: Store, run: str, entry: str, cls: type, stage: str | None = None) -> Any:
    """The config a run last used for its run-index `entry` (a stage, or a round's
    `<stage>.r<k>`; so a UI re-run repeats it), else the run config's section of `stage`
    (SECTION_PATHS: sample and critique live under `ipo`), else the defaults."""
    from infra.config import SECTION_PATHS

    index = store.read_run(run) or {}
    data = (index.get("stages", {}).get(entry) or {}).get("config")
    if data is None:
        data = index.get("config") or {}
        for part in SECTION_PATHS.get(stage or entry, (stage or entry,)):
            data = (data or {}).get(part) or {}
    return cls.model_validate(data)


def flow_run_name(stage: str) -> Callable[[], str]:
    """A stage flow's run name: `<stage>/<run>`, and `<stage>/<run>/r<k>` in a Dual-IPO round."""
    def name() -> str:
        from prefect.runtime import flow_run

        params = flow_run.parameters
        round = params.get("round")
        return f"{stage}/{params.get('run')}" + (f"/r{round}" if round is not None else "")

    name.__name__ = f"{stage}_run_name"
    return name
