"""The task runner of a stage's items (infra/config/runner.py): the flow's own threads, or a
Dask cluster through prefect-dask's DaskTaskRunner (an existing cluster by address, or a
LocalCluster of worker processes started for the map and closed after it).

prefect-dask runs each Prefect task on a Dask worker with the flow's settings context, so task
runs report to the flow's Prefect API from wherever they run. A worker that dies mid-item is
the scheduler's business: it reruns the item elsewhere (the item's row is written last, so a
half-done item is simply done again), and an item it gives up on is a `failed` row that the
next run retries.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from contextlib import contextmanager
from typing import Callable, Iterator
from urllib.parse import urlsplit

from prefect import Task

from infra.config import RunnerConfig
from infra.video import machine_cores

EXTRA = "pip install 'regdpo[dist]'"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

Submit = Callable[[Task, dict], object]


def runner_problems(cfg: RunnerConfig, timeout_s: float = 3.0) -> list[str]:
    """What keeps `cfg` from running items, known before any work: a missing package, a
    scheduler that does not answer."""
    if not cfg.cluster:
        return []
    if importlib.util.find_spec("prefect_dask") is None:
        return [f"runner.kind dask needs prefect-dask, which is not installed: {EXTRA}"]
    if cfg.address is None:
        return []
    parts = urlsplit(cfg.address)
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value() and parts.hostname not in LOOPBACK:
        return [f"runner.address {cfg.address}: the workers of a cluster on other machines "
                "report their task runs to the flow's Prefect API, and without a server that "
                "is an ephemeral one on 127.0.0.1: start `prefect server start` and set "
                "PREFECT_API_URL (here and on the workers)"]
    try:
        with socket.create_connection((parts.hostname, parts.port or 8786), timeout=timeout_s):
            return []
    except (OSError, ValueError) as e:
        return [f"runner.address {cfg.address}: no Dask scheduler answers ({e}); start one "
                "(`dask scheduler`, then `dask worker ADDRESS` on each machine) or fix the "
                "address"]


@contextmanager
def item_runner(cfg: RunnerConfig, workers: int) -> Iterator[tuple[Submit, int, int]]:
    """(submit(task, parameters) -> a Prefect future, how many items to keep in flight, the
    cores one item may use: infra.video.item_cores). Threads: the flow's task runner, `workers`
    at a time, sharing this machine's cores. A cluster: two items per worker thread, so each
    worker has the next one queued when it finishes one; a worker thread is one core (Dask's
    own model: `dask worker --nthreads N` runs N tasks at once, one per core), so N items on
    a worker use its N cores and adding workers adds throughput."""
    if not cfg.cluster:
        cores = max(1, machine_cores() // max(workers, 1))
        yield (lambda task, parameters: task.submit(**parameters)), workers, cores
        return
    from prefect_dask import DaskTaskRunner

    if cfg.address:
        runner = DaskTaskRunner(address=cfg.address)
    else:
        runner = DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
            "n_workers": cfg.workers or os.cpu_count() or 1, "threads_per_worker": 1,
            "processes": True, "dashboard_address": None})
    with runner, api_for_workers():
        threads = sum(runner.client.nthreads().values())
        yield runner.submit, max(2 * threads, 1), 1


@contextmanager
def api_for_workers() -> Iterator[None]:
    """The flow's Prefect API in the settings prefect-dask sends with each task. Without a
    server (PREFECT_API_URL unset), that is the ephemeral API this process started: named
    explicitly, or every worker would start an ephemeral API of its own and the items' task
    runs would report to none the flow can see. (It listens on 127.0.0.1: a cluster on other
    machines needs a Prefect server, see runner_problems.)"""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()  # already running: the flow's client started it
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield
