"""SIGTERM/SIGINT (docs/architecture.md, "Failures"): `regdpo run` stops a download that is in
progress, says so in one line, exits 143/130, leaves no temp folder behind, and a rerun
finishes the work. A real `regdpo run` process against a real local HTTP server that trickles."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from infra import shutdown
from infra.video import FFMPEG, run_ffmpeg

ROOT = Path(__file__).resolve().parents[1]


class _Trickle(BaseHTTPRequestHandler):
    """The first GET of /slow.mp4 trickles for minutes; later ones get the clip at once."""

    clip: bytes
    started: threading.Event
    hits: int

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).hits += 1
        self.send_response(200)
        if type(self).hits > 1:
            self.send_header("Content-Length", str(len(self.clip)))
            self.end_headers()
            self.wfile.write(self.clip)
            return
        self.send_header("Content-Length", "100000000")
        self.end_headers()
        try:
            for _ in range(6000):
                self.wfile.write(b"x")
                self.wfile.flush()
                self.started.set()
                time.sleep(0.05)
        except OSError:
            pass  # the client hung up: expected


@pytest.fixture
def trickle(tmp_path):
    clip = tmp_path / "clip.mp4"
    run_ffmpeg([FFMPEG, "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
                "testsrc=size=64x64:rate=16", "-t", "1", "-c:v", "libx264", "-preset", "ultrafast",
                "-pix_fmt", "yuv420p", f"file:{clip}"])
    # A class of its own: a trickle left over from an earlier test must not report this one started.
    handler = type("Trickle", (_Trickle,), {"clip": clip.read_bytes(), "hits": 0, "started": threading.Event()})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", handler.started
    srv.shutdown()
    srv.server_close()


def _regdpo(config: Path, tmp: Path) -> subprocess.Popen:
    """`regdpo run --only acquire` against the session's Prefect API (no server start per run)."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp),
           "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90", "PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(config), "--only", "acquire"],
                            cwd=tmp.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_a_download_and_a_rerun_finishes(prefect_api, trickle, tmp_path, sig, code):
    url, started = trickle
    (tmp_path / "list.txt").write_text(f"{url}/slow.mp4\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"name: stop\nstore: file://{tmp_path / 'store'}\n"
                      f"acquire: {{sources: [{tmp_path / 'list.txt'}], duration_min: 0, "
                      "short_edge_min: 8, buckets: ['1:1'], download: {retries: 0}}\n"
                      "train: null\nevaluate: null\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()

    proc = _regdpo(config, tmp)
    try:
        assert started.wait(60), "the download never started:\n" + proc.stderr.read()
        proc.send_signal(sig)
        t0 = time.monotonic()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
            pytest.fail(f"still running 30 s after {sig.name}:\n{proc.communicate()[1][-30000:]}")
    finally:
        proc.kill()
    assert proc.returncode == code, (proc.returncode, err[-3000:])
    assert time.monotonic() - t0 < 30
    assert "stopped: " in err and "committed work stands, rerun to continue" in err, err[-3000:]
    assert not list(tmp.glob("regdpo-fetch-*")), "a download's temp folder was left behind"

    again = _regdpo(config, tmp)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err[-3000:]
    assert "acquire" in out and "'ok': 1" in out, out
    assert not list(tmp.glob("regdpo-fetch-*"))


def test_a_second_signal_kills_at_once(tmp_path):
    """The first signal asks; a second ends the process by the signal, however it is blocked."""
    code = ("import threading; from infra import shutdown; shutdown.install(); print('ready', flush=True); "
            "threading.Event().wait(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)  # the first one only asks
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == -signal.SIGTERM
    finally:
        proc.kill()


def test_the_first_signal_is_a_request():
    shutdown.reset()
    try:
        shutdown.handle(signal.SIGINT)
        assert shutdown.requested() and shutdown.exit_code() == 130
        with pytest.raises(shutdown.ShutdownRequested):
            shutdown.raise_if_requested("x")
    finally:
        shutdown.reset()
