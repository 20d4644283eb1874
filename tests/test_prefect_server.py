"""The UI path, end to end, with real processes: `prefect server start`, the project's
prefect.yaml deployed with `prefect deploy`, a process worker on the `cpu` pool, and runs
started the way the UI starts them (a flow run of a deployment, polled through the REST API).

1. `curate` for run "ui" over the toy clips -> a committed normalize manifest with ok rows;
2. the single `filter` deployment for the same run, config left empty (the UI's default):
   it reuses the run's recorded config, does no new work and leaves the other stages alone;
3. the `negatives` deployment, on the `gpu` pool's own worker, for the same run: it reads the
   curated GT clips from the run index and commits one negative per clip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import _free_port, toy_config

REPO = Path(__file__).resolve().parents[1]
# The CLI of the interpreter running the tests (its venv), else the one on PATH.
PREFECT = next((p for p in (str(Path(sys.executable).with_name("prefect")), shutil.which("prefect"))
                if p and os.access(p, os.X_OK)), "prefect")
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

SERVER_READY_S = 120.0
CLI_TIMEOUT_S = 180.0
FLOW_RUN_S = 240.0

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def wait_until(cond: Callable[[], Any], timeout: float, what: str,
               watch: subprocess.Popen, on_timeout: Callable[[], str] = lambda: "",
               poll: float = 0.5) -> Any:
    """Call `cond` until it returns something truthy (returned) or `timeout` seconds pass.
    Between checks it waits on `watch` (the server or worker): its exit ends the wait at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}", pytrace=False)
        if watch.poll() is not None:
            pytest.fail(f"{what}: the process it depends on exited ({watch.returncode})\n{on_timeout()}",
                        pytrace=False)
        try:
            watch.wait(timeout=poll)
        except subprocess.TimeoutExpired:
            pass


def _tail(path: Path, n: int = 15000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "<no log>"
    return f"--- {path.name} (last {n} chars) ---\n{text[-n:]}"


def _spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A long-running prefect process in its own process group, output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop a process started by `_spawn`: its process group, then any descendant left in
    another session (the worker starts each flow run in a session of its own)."""
    import psutil  # an accelerate dependency

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=15)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the leader left behind in its group
    except ProcessLookupError:
        pass
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(descendants, timeout=10)
    proc.wait(timeout=15)


class Prefect:
    """A running `prefect server start` plus the env every CLI call and the worker use."""

    def __init__(self, api: str, env: dict, logs: Path):
        self.api, self.env, self.logs = api, env, logs
        self.procs: list[subprocess.Popen] = []

    def cli(self, *args: str) -> str:
        """Run one `prefect` command (argument list, no shell); fail with its output."""
        p = subprocess.run([PREFECT, "--no-prompt", *args], cwd=REPO, env=self.env, capture_output=True,
                           text=True, timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL)
        out = p.stdout + p.stderr
        assert p.returncode == 0, f"`prefect {' '.join(args)}` exited {p.returncode}:\n{out}"
        return out

    def http(self, method: str, path: str, body: Any = None) -> Any:
        req = urllib.request.Request(
            self.api + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def healthy(self) -> bool:
        try:
            return self.http("GET", "/health") is True
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def run_deployment(self, name: str, params: dict) -> str:
        """`prefect deployment run <name> --params <json>` -> the new flow run's id."""
        out = self.cli("deployment", "run", name, "--params", json.dumps(params))
        m = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert m, f"no flow run id in the output of `prefect deployment run {name}`:\n{out}"
        return m.group(1)

    def wait_flow_run(self, run_id: str) -> dict:
        """Poll the flow run until it is terminal; it must be COMPLETED."""
        def terminal():
            fr = self.http("GET", f"/flow_runs/{run_id}")
            return fr if (fr.get("state_type") or "") in TERMINAL else None

        fr = wait_until(terminal, FLOW_RUN_S, f"flow run {run_id} to finish", self.procs[0],
                        self.diagnostics)
        assert fr["state_type"] == "COMPLETED", (
            f"flow run {fr['name']} ({run_id}) ended {fr['state_type']}: "
            f"{(fr.get('state') or {}).get('message')}\n{self.flow_run_logs(run_id)}\n{self.diagnostics()}"
        )
        return fr

    def flow_run_logs(self, run_id: str) -> str:
        try:
            logs = self.http("POST", "/logs/filter",
                             {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200})
        except (urllib.error.URLError, OSError) as e:
            return f"<logs unavailable: {e}>"
        return "\n".join(entry["message"] for entry in logs)

    def diagnostics(self) -> str:
        return "\n".join(_tail(p) for p in sorted(self.logs.glob("*.log")))


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prefect]:
    base = tmp_path_factory.mktemp("prefect-server")
    logs = base / "logs"
    logs.mkdir()
    # Only our settings: nothing from the developer's profile or the in-process test harness.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(base / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",       # pick scheduled runs up promptly
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "PREFECT_CLI_COLORS": "false",
        "PREFECT_CLI_WRAP_LINES": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PWD": str(REPO),                          # prefect.yaml's pull step: {{ $PWD }}
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })

    pf = server = None
    for _attempt in range(3):  # a free port can be taken before the server binds it
        port = _free_port()
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        pf = Prefect(env["PREFECT_API_URL"], dict(env), logs)
        server = _spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                        env, logs / "server.log")
        pf.procs.append(server)
        wait_until(lambda: server.poll() is not None or pf.healthy(), SERVER_READY_S,
                   "the Prefect server to answer /api/health", server, pf.diagnostics)
        if server.poll() is None:
            break
        _kill_group(server)
        pf.procs.clear()
    if not pf.procs:
        pytest.fail(f"`prefect server start` kept exiting:\n{pf.diagnostics()}", pytrace=False)
    try:
        yield pf
    finally:
        for proc in reversed(pf.procs):
            _kill_group(proc)


# ---------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------


def test_ui_path_curate_then_rerun_one_stage(prefect_server: Prefect, toy_dir: Path, tmp_path: Path):
    from infra.stage import input_manifest
    from infra.store import Store

    pf = prefect_server
    ui = urllib.request.urlopen(pf.api.removesuffix("/api") + "/", timeout=10)
    assert ui.status == 200 and b"<html" in ui.read().lower(), "the Prefect UI is not served"

    # Infrastructure and deployments exactly as an operator sets them up (prefect.yaml).
    pf.cli("work-pool", "create", "cpu", "--type", "process")
    pf.cli("work-pool", "create", "gpu", "--type", "process")
    pf.cli("deploy", "--all")
    deployments = {d["name"]: d for d in pf.http("POST", "/deployments/filter", {})}
    gpu_stages = {"negatives", "precompute", "train", "evaluate", "sample", "critique", "refine",
                  "ipo"}
    assert set(deployments) == {"acquire", "filter", "normalize", "pairs", "curate", "pipeline"} | gpu_stages
    assert {n: d["work_pool_name"] for n, d in deployments.items()} == {
        n: "gpu" if n in gpu_stages else "cpu" for n in deployments}
    assert deployments["train"]["parameters"] == {
        "run": "toy", "store": "file://./artifacts", "nproc": 1, "nnodes": 1, "node_rank": 0, "rdzv": None}
    assert deployments["filter"]["parameters"] == {"run": "toy", "store": "file://./artifacts"}
    assert deployments["filter"]["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    nightly = deployments["pipeline"]["schedules"]
    assert [s["schedule"]["cron"] for s in nightly] == ["0 3 * * *"] and not nightly[0]["active"]

    worker = _spawn([PREFECT, "worker", "start", "--pool", "cpu", "--name", "test-worker"],
                    pf.env, pf.logs / "worker.log")
    pf.procs.append(worker)

    # 1. curate for run "ui": one small source keeps it quick on CPU.
    store_url = f"file://{tmp_path / 'store'}"
    config = toy_config(toy_dir, store_url, acquire={"sources": [
        {"manifest": str(toy_dir / "captions.csv"), "video_root": str(toy_dir / "clips")}]})
    run_id = pf.run_deployment("curate/curate", {"run": "ui", "config": config.model_dump(mode="json")})
    pf.wait_flow_run(run_id)
    assert worker.poll() is None, "the worker died\n" + pf.diagnostics()

    store = Store(store_url)
    index = store.read_run("ui")
    assert index and set(index["stages"]) >= {"acquire", "filter", "normalize"}, index
    rows, success = input_manifest(store, "ui", "normalize")
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and success["counts"]["ok"] == len(ok), (success["counts"], rows)
    keys = {stage: index["stages"][stage]["key"] for stage in ("acquire", "filter", "normalize")}
    filter_success = store.read_success(f"stages/filter/{keys['filter']}")
    assert filter_success["computed"] > 0

    # 2. Re-run only `filter` for run "ui", config left empty (as the UI form's default).
    run_id = pf.run_deployment("filter/filter", {"run": "ui", "store": store_url})
    fr = pf.wait_flow_run(run_id)
    assert "config" not in fr["parameters"], fr["parameters"]

    after = store.read_run("ui")
    assert {stage: after["stages"][stage]["key"] for stage in keys} == keys, after["stages"]
    assert store.read_success(f"stages/filter/{keys['filter']}") == filter_success  # nothing recommitted
    logs = wait_until(lambda: (t := pf.flow_run_logs(run_id)) and "reusing" in t and t, 30,
                      "the filter run's logs", pf.procs[0], lambda: pf.flow_run_logs(run_id))
    assert "inputs and config unchanged" in logs, logs
    items = pf.http("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    assert not [t["name"] for t in items if t["name"].startswith("filter:")], "filter re-ran items"

    # 3. A GPU-pool stage from its own deployment and worker: negatives for run "ui".
    gpu_worker = _spawn([PREFECT, "worker", "start", "--pool", "gpu", "--name", "test-gpu-worker"],
                        pf.env, pf.logs / "gpu-worker.log")
    pf.procs.append(gpu_worker)
    negatives = {"generators": [{"name": "tiny-i2v", "model": str(toy_dir / "models" / "tiny-wan-i2v"),
                                 "kind": "i2v", "dtype": "float32", "steps": 2, "short_edge": 32,
                                 "frames": 5}]}
    run_id = pf.run_deployment("negatives/negatives", {"run": "ui", "store": store_url, "config": negatives})
    pf.wait_flow_run(run_id)
    final = store.read_run("ui")
    assert {stage: final["stages"][stage]["key"] for stage in keys} == keys
    assert final["stages"]["negatives"]["counts"] == {"ok": len(ok), "rejected": 0, "failed": 0}
