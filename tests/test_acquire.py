"""Acquire against hostile sources (issue 10): symlinks out of a source folder or video_root
are rejected, never followed; downloads are bounded by a wall-clock deadline and a size cap
checked per chunk; transient errors are retried inside the item with backoff, permanent ones
are rejected rows; every row names its source.

A real HTTP server on 127.0.0.1 plays each kind of server."""

from __future__ import annotations

import csv
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from infra.config import AcquireConfig
from infra.errors import TransientError
from infra.store import Store
from infra.video import FFMPEG, run_ffmpeg
from tasks.acquire import acquire_item, list_candidates

RETRIES = 2


def small_clip(path: Path, fps: int = 16) -> Path:
    """A 1 s 64x64 clip; distinct `fps` give distinct bytes (acquire dedupes by content)."""
    run_ffmpeg([FFMPEG, "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
                f"testsrc=size=64x64:rate={fps}", "-t", "1", "-c:v", "libx264", "-preset", "ultrafast",
                "-pix_fmt", "yuv420p", f"file:{path}"])
    return path


def loose_config(sources: list, **download) -> AcquireConfig:
    """Criteria any small test clip meets; fast retries."""
    return AcquireConfig(sources=sources, duration_min=0, short_edge_min=8, buckets=["1:1"],
                         download={"retries": RETRIES, "backoff_s": 0.01, **download})


class _Server(BaseHTTPRequestHandler):
    clip: bytes = b""
    other_clip: bytes = b""
    hits: Counter = Counter()

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def _send(self, code: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        self.hits[path] += 1
        if path == "/good.mp4":
            self._send(200, self.clip)
        elif path == "/flaky.mp4":  # 503 twice, then the clip
            self._send(503) if self.hits[path] <= 2 else self._send(200, self.other_clip)
        elif path == "/down.mp4":
            self._send(503)
        elif path == "/busy.mp4":
            self._send(429)
        elif path == "/gone.mp4":
            self._send(404)
        elif path == "/to-file.mp4":
            self._send(302, Location="file:///etc/passwd")
        elif path in ("/loop-a.mp4", "/loop-b.mp4"):
            self._send(302, Location="/loop-b.mp4" if path == "/loop-a.mp4" else "/loop-a.mp4")
        elif path == "/big.mp4":  # no Content-Length: only the per-chunk cap can stop it
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self._pour(b"x" * 65536, 0.0, 64)
        elif path in ("/trickle.mp4", "/stall.mp4"):
            self.send_response(200)
            self.send_header("Content-Length", "100000000")
            self.end_headers()
            if path == "/stall.mp4":
                self._pour(b"abc", 60.0, 1)  # then one read blocks for a minute
            self._pour(b"x", 0.02, 100000)
        else:
            self._send(404)

    def _pour(self, data: bytes, pause: float, times: int) -> None:
        try:
            for _ in range(times):
                self.wfile.write(data)
                self.wfile.flush()
                time.sleep(pause)
        except OSError:
            pass  # the client hung up: expected


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    clips = tmp_path_factory.mktemp("clip")
    _Server.clip = small_clip(clips / "c.mp4", 17).read_bytes()
    _Server.other_clip = small_clip(clips / "d.mp4", 18).read_bytes()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def fetch_row(store: Store, url: str, **download) -> dict:
    """What the acquire item returns for one URL."""
    cfg = loose_config([url], **download)
    return acquire_item(store, "items/acquire/x", {"candidate": {"source": url}, "config": cfg.model_dump()})


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(f"file://{tmp_path / 'store'}")


# -- symlinks --------------------------------------------------------------------------------


@pytest.fixture
def linked(tmp_path) -> dict[str, Path]:
    """A source folder with a clip, a link to it (inside), a link to a clip outside the folder,
    a link to a folder outside; and a manifest whose video_root holds the same links."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = small_clip(outside / "secret.mp4", 19)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    small_clip(src / "sub" / "real.mp4")
    (src / "inside.mp4").symlink_to(src / "sub" / "real.mp4")
    (src / "escape.mp4").symlink_to(secret)
    (src / "escape_dir").symlink_to(outside, target_is_directory=True)
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["video", "caption"])
        w.writeheader()
        for name in ("sub/real.mp4", "inside.mp4", "escape.mp4", "escape_dir/secret.mp4", "nope.mp4"):
            w.writerow({"video": name, "caption": "c"})
    return {"src": src, "manifest": tmp_path / "m.csv", "secret": secret}


def test_symlinks_out_of_a_source_folder_are_rejected(linked):
    cands, bad = list_candidates(loose_config([str(linked["src"])]))
    sources = {c.source for c in cands}
    assert sources == {str((linked["src"] / "sub" / "real.mp4").resolve())}  # the inside link is the same file
    assert str(linked["secret"].resolve()) not in sources
    by_source = {r["source"]: r for r in bad}
    root = linked["src"].resolve()
    assert set(by_source) == {str(root / "escape.mp4"), str(root / "escape_dir")}
    for row in bad:
        assert row["status"] == "rejected" and "symlink points outside the source folder" in row["reason"]


def test_symlinks_out_of_a_video_root_are_rejected(linked, store):
    cfg = loose_config([{"manifest": str(linked["manifest"]), "video_root": str(linked["src"])}])
    cands, bad = list_candidates(cfg)
    assert {r["source"]: r["reason"] for r in bad} == {
        "escape.mp4": "symlink points outside the manifest's video_root",
        "escape_dir/secret.mp4": "symlink points outside the manifest's video_root",
    }
    real = str((linked["src"] / "sub" / "real.mp4").resolve())
    assert sorted(c.source for c in cands) == sorted([real, str(linked["src"].resolve() / "nope.mp4")])
    rows = {c.source: acquire_item(store, "items/acquire/x", {
        "candidate": {"source": c.source, "caption": c.caption, "root": c.root},
        "config": cfg.model_dump()}) for c in cands}
    assert rows[real]["status"] == "ok"
    missing = rows[str(linked["src"].resolve() / "nope.mp4")]
    assert missing["status"] == "rejected" and "source file not found" in missing["reason"], missing


def test_a_link_swapped_out_after_listing_is_rejected(linked, store):
    """The item checks containment again: the folder may change between listing and fetching."""
    cfg = loose_config([str(linked["src"])])
    (cand,), _ = list_candidates(cfg)
    Path(cand.source).unlink()
    Path(cand.source).symlink_to(linked["secret"])
    row = acquire_item(store, "items/acquire/x", {
        "candidate": {"source": cand.source, "root": cand.root}, "config": cfg.model_dump()})
    assert row["status"] == "rejected" and "symlink points outside" in row["reason"], row
    assert not store.list("objects")


# -- downloads -------------------------------------------------------------------------------


def test_a_trickling_server_is_stopped_at_the_deadline(server, store):
    t0 = time.monotonic()
    row = fetch_row(store, f"{server}/trickle.mp4", deadline_s=1.0)
    assert time.monotonic() - t0 < 5
    assert row["status"] == "rejected" and "deadline_s 1 s" in row["reason"], row


def test_a_read_blocked_past_the_deadline_is_cut(server, store):
    """One read waits a minute (under timeout_s): the watchdog ends it at the deadline."""
    t0 = time.monotonic()
    row = fetch_row(store, f"{server}/stall.mp4", deadline_s=1.0, timeout_s=120)
    assert time.monotonic() - t0 < 5
    assert row["status"] == "rejected" and "deadline_s" in row["reason"], row


def test_size_cap_is_checked_per_chunk(server, store):
    row = fetch_row(store, f"{server}/big.mp4", max_bytes=100_000)
    assert row["status"] == "rejected" and "over max_bytes 100000" in row["reason"], row


def test_transient_errors_are_retried_with_backoff(server, store):
    _Server.hits.clear()
    row = fetch_row(store, f"{server}/flaky.mp4")
    assert row["status"] == "ok" and _Server.hits["/flaky.mp4"] == 3, (row, _Server.hits)


def test_retries_are_bounded_and_then_the_item_fails(server, store):
    _Server.hits.clear()
    t0 = time.monotonic()
    with pytest.raises(TransientError, match=r"HTTP 503 .*gave up after 3 attempts"):
        fetch_row(store, f"{server}/down.mp4", backoff_s=0.2)
    assert _Server.hits["/down.mp4"] == RETRIES + 1
    assert time.monotonic() - t0 >= 0.2 + 0.4  # backoff_s x 2^attempt


@pytest.mark.parametrize("path, reason", [
    ("/to-file.mp4", "redirected to a 'file' URL: only http and https are followed"),
    ("/loop-a.mp4", "redirect loop"),
    ("/gone.mp4", "HTTP 404"),
])
def test_permanent_errors_are_rejected_at_once(server, store, path, reason):
    _Server.hits.clear()
    row = fetch_row(store, f"{server}{path}")
    assert row["status"] == "rejected" and reason in row["reason"], row
    assert sum(_Server.hits.values()) <= 2  # no retries (a loop takes two hops)


def test_download_limits_must_be_finite_and_positive():
    from pydantic import ValidationError

    for bad in ({"deadline_s": 0}, {"deadline_s": float("inf")}, {"backoff_s": -1},
                {"backoff_s": float("nan")}):
        with pytest.raises(ValidationError):
            AcquireConfig(download=bad)


# -- one run over the mix --------------------------------------------------------------------


def test_a_run_gives_each_case_its_status_and_names_its_source(prefect_api, server, linked, tmp_path):
    from flows.acquire import acquire
    from infra.stage import stage_dir

    urls = {"good": "ok", "flaky": "ok", "down": "failed", "busy": "failed", "gone": "rejected",
            "to-file": "rejected", "loop-a": "rejected", "trickle": "rejected"}
    (tmp_path / "list.txt").write_text("\n".join(f"{server}/{u}.mp4" for u in urls))
    cfg = loose_config([str(tmp_path / "list.txt"), str(linked["src"]),
                        {"manifest": str(linked["manifest"]), "video_root": str(linked["src"])}],
                       deadline_s=1.0)
    store = Store(f"file://{tmp_path / 'store'}")
    _Server.hits.clear()
    entry = acquire(run="mix", config=cfg, store=store.url)
    rows = store.read_manifest(stage_dir("acquire", entry["key"]))[0].to_pylist()
    assert all(r.get("source") for r in rows), [r for r in rows if not r.get("source")]
    by_source = {r["source"]: r for r in rows}
    assert len(by_source) == len(rows)
    for name, status in urls.items():
        assert by_source[f"{server}/{name}.mp4"]["status"] == status, by_source[f"{server}/{name}.mp4"]
    # Retried inside the item only: Prefect does not multiply the attempts.
    assert _Server.hits["/down.mp4"] == RETRIES + 1 and _Server.hits["/busy.mp4"] == RETRIES + 1
    root = linked["src"].resolve()
    for source in (str(root / "escape.mp4"), str(root / "escape_dir"), "escape.mp4", "escape_dir/secret.mp4"):
        assert by_source[source]["status"] == "rejected", by_source[source]
    assert "source file not found" in by_source[str(root / "nope.mp4")]["reason"]
    assert by_source[str(root / "sub" / "real.mp4")]["status"] == "ok"
