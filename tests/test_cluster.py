"""Scale-out (issue 11): curate on a Dask cluster of 2 worker processes (distributed's
LocalCluster, reached by address through prefect-dask), the store on a real S3 server (rclone
serve s3), commits the thread runner's manifests; a worker killed mid-stage loses nothing; a
cluster whose workers cannot reach the store, or that does not answer, is refused before any
work."""

from __future__ import annotations

import csv
import os
import signal
import time
from pathlib import Path

import pytest
from distributed.diagnostics.plugin import WorkerPlugin

from tests.conftest import toy_config

pytestmark = pytest.mark.slow

STAGES = ("acquire", "filter", "normalize")
# A few clips of the toy manifest: clean ones (one without a caption, rejected at normalize:
# no captioner, so the workers load no model), a static clip (filter rejects it) and a short
# one (acquire rejects it); normalized small, so the test's time is the runner's.
CLIPS = ("clean_landscape_30fps.mp4", "clean_portrait_24fps.mp4", "clean_square_30fps.mp4",
         "reject_static.mp4", "reject_short.mp4")


@pytest.fixture(scope="module")
def sources(toy_dir: Path, tmp_path_factory) -> dict:
    rows = list(csv.DictReader((toy_dir / "captions.csv").open()))
    path = tmp_path_factory.mktemp("sources") / "few.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["video"] in CLIPS)
    return {"manifest": str(path), "video_root": str(toy_dir / "clips")}


def _config(toy_dir: Path, sources: dict, store: str, **runner):
    return toy_config(toy_dir, store, acquire={"sources": [sources]},
                      normalize={"caption": {"model": None}, "short_edge": 128, "frames": 17},
                      runner=runner)


def _outputs(store_url: str, stages: tuple[str, ...] = STAGES) -> dict:
    """stage -> (stage key, content digest, rows without what differs between runs)."""
    from infra.stage import VOLATILE, input_manifest
    from infra.store import Store

    st = Store(store_url)
    index = st.read_run("t")["stages"]
    out = {}
    for stage in stages:
        rows, success = input_manifest(st, "t", stage)
        out[stage] = (index[stage]["key"], success["content_digest"],
                      [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows])
    return out


@pytest.fixture(scope="module")
def cluster(s3_server):
    """2 worker processes, 1 thread each; started after the S3 env is set, so they inherit it."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as c, Client(c) as client:
        yield client


@pytest.fixture(scope="module")
def threads_run(prefect_api, toy_dir: Path, sources: dict, s3_admin_fs) -> dict:
    """The outputs of the thread runner's curate on its own S3 bucket."""
    import uuid

    from flows.pipeline import curate

    bucket = f"regdpo-test-{uuid.uuid4().hex[:12]}"
    s3_admin_fs.mkdir(bucket)
    store = f"s3://{bucket}/store"
    results = curate(run="t", config=_config(toy_dir, sources, store))
    assert all(results[s]["counts"]["failed"] == 0 for s in STAGES), results
    return _outputs(store)


def _item_runs(flow_run_id: str, stage: str, want: int) -> list:
    """The Completed task runs of `stage`'s items in a flow run, as the Prefect API records
    them (task states reach the API as events: wait, bounded, until `want` have arrived)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, TaskRunFilter

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}),
                task_run_filter=TaskRunFilter(name={"like_": f"{stage}:"}))
            done = [r for r in runs if r.state and r.state.is_completed()]
            if len(done) >= want or time.monotonic() > deadline:
                return done
            time.sleep(0.5)


def test_curate_on_a_two_process_cluster_commits_the_thread_runners_manifests(
        threads_run, cluster, toy_dir, sources, s3_store_url):
    from flows.pipeline import curate

    results = curate(run="t", config=_config(toy_dir, sources, s3_store_url, kind="dask",
                                             address=cluster.scheduler.address))
    expected = threads_run
    got = _outputs(s3_store_url)
    for stage in STAGES:
        assert got[stage][0] == expected[stage][0], f"{stage}: another stage key"
        assert got[stage][2] == expected[stage][2], f"{stage}: other rows than on threads"
        assert got[stage][1] == expected[stage][1], f"{stage}: another content digest"
    assert results["normalize"]["counts"] == {"ok": 2, "rejected": 1, "failed": 0}
    # The items ran on the workers as Prefect task runs of the stage's flow run, reported to
    # the flow's API (prefect-dask forwards the settings context).
    from infra.stage import input_manifest
    from infra.store import Store

    rows, _ = input_manifest(Store(s3_store_url), "t", "normalize")
    flow_runs = {r["flow_run"] for r in rows}
    assert len(flow_runs) == 1 and "" not in flow_runs, flow_runs
    assert len(_item_runs(flow_runs.pop(), "normalize", len(rows))) == len(rows)


class KillAt(WorkerPlugin):
    """SIGKILL the worker process that starts the `nth` task (0-based, counted across the
    cluster by exclusive-create marker files), as a node lost mid-stage would die."""

    name = "kill-at"

    def __init__(self, marks: str, nth: int):
        self.marks, self.nth = marks, nth

    def transition(self, key, start, finish, **kwargs):
        if finish != "executing":
            return
        i = 0
        while True:
            try:
                os.close(os.open(os.path.join(self.marks, str(i)), os.O_CREAT | os.O_EXCL))
                break
            except FileExistsError:
                i += 1
        if i == self.nth:
            Path(self.marks, "killed").write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_mid_stage_loses_nothing(threads_run, cluster, toy_dir, sources,
                                                 s3_store_url, tmp_path):
    from flows.pipeline import curate

    expected = threads_run
    # The kill lands on the second filter item (the stage that decodes): acquire's run first.
    nth = len(expected["acquire"][2]) + 1
    before = set(cluster.run(os.getpid).values())
    cluster.register_plugin(KillAt(str(tmp_path), nth))
    try:
        results = curate(run="t", config=_config(toy_dir, sources, s3_store_url, kind="dask",
                                                 address=cluster.scheduler.address),
                         only=["acquire", "filter"])
    finally:
        cluster.unregister_worker_plugin(KillAt.name)
    killed = int((tmp_path / "killed").read_text())
    assert killed in before and killed not in set(cluster.run(os.getpid).values())
    got = _outputs(s3_store_url, ("acquire", "filter"))
    # The killed worker's item was redone elsewhere, once: the thread runner's manifests.
    assert got == {s: expected[s] for s in ("acquire", "filter")}
    ids = [r["id"] for r in got["filter"][2]]
    assert len(ids) == len(set(ids)) == len(expected["filter"][2])
    assert results["filter"]["counts"]["failed"] == 0, results


def test_a_cluster_that_cannot_run_is_refused_before_any_work(tmp_path):
    """A scheduler that does not answer is a preflight problem naming runner.address; a
    cluster elsewhere with a local store is a config error (the workers would write where no
    stage reads), unless the path is declared shared and absolute."""
    import socket

    from flows.preflight import PreflightError, preflight
    from infra.config import ConfigError, RunConfig, load_config

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = RunConfig.model_validate({"store": "s3://b/p", "acquire": {"sources": ["./x"]},
                                    "runner": {"kind": "dask", "address": f"tcp://127.0.0.1:{port}"}})
    with pytest.raises(PreflightError, match=r"runner.address tcp://127.0.0.1:\d+: no Dask scheduler"):
        preflight(cfg, ["acquire"])
    preflight(cfg, ["pairs"])  # no cluster stage selected: nothing to check

    (tmp_path / "run.yaml").write_text(f"store: file://{tmp_path}/store\n"
                                       "runner: {kind: dask, address: 'tcp://sched:8786'}\n")
    with pytest.raises(ConfigError, match="Use an s3:// store, or put the store on a path every "
                                          "worker mounts"):
        load_config(tmp_path / "run.yaml")
    shared = [f"store=file://{tmp_path}/store", "runner.shared_store=true"]
    assert load_config(tmp_path / "run.yaml", shared).runner.shared_store
    with pytest.raises(ConfigError, match="relative"):
        load_config(tmp_path / "run.yaml", ["store=file://./store", "runner.shared_store=true"])
    assert not (tmp_path / "store").exists()
