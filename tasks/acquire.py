"""Acquire (paper A.1): list raw videos from folders, URL lists, S3 prefixes and CSV/Parquet
manifests; fetch, probe and keep those within the fps / duration / size / aspect criteria.
Accepted sources are copied into the store, content-addressed by their sha256."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import posixpath
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar
from urllib.parse import urljoin, urlsplit

import pandas as pd
import requests
import urllib3

from infra import shutdown
from infra.config import AcquireConfig, DownloadConfig, ManifestSource
from infra.errors import TransientError
from infra.store import Store, as_path, digest, filesystem, open_url
from infra.video import ProbeError, nearest_bucket, probe

ALLOWED_SCHEMES = ("http", "https")
T = TypeVar("T")


@dataclass(frozen=True)
class Candidate:
    source: str  # canonical location: absolute path, http(s) URL or s3:// URL
    caption: str | None = None
    root: str | None = None  # a local source's folder (resolved): it must stay inside it

    @property
    def id(self) -> str:
        return digest({"source": self.source}, 16)


# -- listing ---------------------------------------------------------------------------------


def list_candidates(cfg: AcquireConfig) -> tuple[list[Candidate], list[dict]]:
    """Every candidate video of every source, plus rejection rows for unusable entries."""
    found: dict[str, Candidate] = {}
    rejected: list[dict] = []
    for spec in cfg.sources:
        try:
            for cand in _expand(spec, cfg.extensions):
                if isinstance(cand, dict):
                    rejected.append(cand)
                elif cand.source not in found or (cand.caption and not found[cand.source].caption):
                    found[cand.source] = cand
        except (OSError, ValueError) as e:
            src = spec if isinstance(spec, str) else spec.manifest
            rejected.append(_bad(src, f"source unreadable: {e}"))
    return sorted(found.values(), key=lambda c: c.id), rejected


def _bad(source: str, reason: str) -> dict:
    return {"id": digest({"source": source}, 16), "source": source, "status": "rejected", "reason": reason}


def _is_video(name: str, extensions: list[str]) -> bool:
    return os.path.splitext(name)[1].lower() in {e.lower() for e in extensions}


def _expand(spec: str | ManifestSource, extensions: list[str]) -> Iterator[Candidate | dict]:
    if isinstance(spec, ManifestSource):
        yield from _from_manifest(spec)
        return
    scheme = urlsplit(spec).scheme.lower() if "://" in spec else ""
    lower = spec.lower().split("?")[0]
    if lower.endswith((".csv", ".parquet")):
        yield from _from_manifest(ManifestSource(manifest=spec))
    elif lower.endswith(".txt"):
        yield from _from_url_list(spec)
    elif scheme in ALLOWED_SCHEMES:
        yield Candidate(spec)
    elif scheme == "s3":
        yield from _from_s3(spec, extensions)
    elif scheme in ("", "file"):
        path = as_path(spec)
        if path.is_dir():
            yield from _from_folder(path, extensions)
        elif path.is_file():
            yield Candidate(str(path.resolve()))
        else:
            yield _bad(spec, "source not found (no such file or folder)")
    else:
        yield _bad(spec, f"unsupported source scheme {scheme!r}: use a folder, http(s) URL, s3:// prefix, "
                         ".txt URL list or .csv/.parquet manifest")


def _inside(path: str | Path, root: str | Path) -> bool:
    """Whether `path`, after resolving every link, is `root` (resolved) or lies below it."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def _from_folder(folder: Path, extensions: list[str]) -> Iterator[Candidate | dict]:
    """The folder's videos; a link leading out of it is a rejected row, never followed
    (links to folders are not walked; links to files inside are fine)."""
    root = folder.resolve()
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for name in list(dirs):
            link = Path(d, name)
            if link.is_symlink() and not _inside(link, root):
                yield _bad(str(link), f"symlink points outside the source folder {root}")
        for name in sorted(files):
            link = Path(d, name)
            if not _is_video(name, extensions):
                continue
            if _inside(link, root):
                yield Candidate(str(link.resolve()), root=str(root))
            else:
                yield _bad(str(link), f"symlink points outside the source folder {root}")


def _from_s3(prefix: str, extensions: list[str]) -> Iterator[Candidate]:
    fs, root = filesystem(prefix)
    for path in sorted(fs.find(root)):
        if _is_video(path, extensions):
            yield Candidate(f"s3://{path}")


def _read_text(location: str) -> str:
    if urlsplit(location).scheme in ALLOWED_SCHEMES:
        resp = requests.get(location, timeout=30)
        resp.raise_for_status()
        return resp.text
    with open_url(location, "rb") as f:
        return f.read().decode()


def _from_url_list(location: str) -> Iterator[Candidate | dict]:
    for line in _read_text(location).splitlines():
        url = line.strip()
        if not url or url.startswith("#"):
            continue
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            yield _bad(url, f"URL scheme {scheme or 'none'!r} not allowed: only http and https are downloaded")
        else:
            yield Candidate(url)


def _from_manifest(spec: ManifestSource) -> Iterator[Candidate | dict]:
    if urlsplit(spec.manifest).scheme in ALLOWED_SCHEMES:
        data = io.BytesIO(requests.get(spec.manifest, timeout=30).content)
    else:
        with open_url(spec.manifest, "rb") as f:
            data = io.BytesIO(f.read())
    table = pd.read_parquet(data) if spec.manifest.lower().endswith(".parquet") else pd.read_csv(data, dtype=str, keep_default_na=False)
    if spec.video_column not in table.columns:
        raise ValueError(f"manifest {spec.manifest} has no column {spec.video_column!r} "
                         f"(columns: {', '.join(map(str, table.columns))}); set video_column")
    base = spec.video_root or posixpath.dirname(spec.manifest) or "."
    for _, rec in table.iterrows():
        name = str(rec[spec.video_column]).strip()
        caption = None
        if spec.caption_column and spec.caption_column in table.columns:
            caption = str(rec[spec.caption_column] or "").strip() or None
        resolved = _resolve_member(base, name)
        if isinstance(resolved, dict):
            yield resolved
        else:
            local = as_path(base) if "://" not in resolved else None
            yield Candidate(resolved, caption, str(local.resolve()) if local is not None else None)


def _resolve_member(base: str, name: str) -> str | dict:
    """A manifest entry as a location; relative names must stay inside the video root."""
    if not name:
        return _bad(f"{base}/<empty>", "manifest row has an empty video name")
    scheme = urlsplit(name).scheme.lower() if "://" in name else ""
    if scheme in ALLOWED_SCHEMES or scheme == "s3":
        return name
    if scheme:
        return _bad(name, f"URL scheme {scheme!r} not allowed: only http, https and s3")
    if name.startswith("/") or "\x00" in name:
        return _bad(name, "absolute paths are not allowed in a manifest: give names relative to video_root")
    joined = posixpath.normpath(posixpath.join("root", name))
    if joined != "root" and not joined.startswith("root/"):
        return _bad(name, "path escapes the manifest's video_root (contains '..')")
    rel = joined[len("root/"):]
    local = as_path(base)
    if local is not None:
        if not _inside(local / rel, local):
            return _bad(name, "symlink points outside the manifest's video_root")
        return str((local / rel).resolve())
    return f"{base.rstrip('/')}/{rel}"


# -- fetching --------------------------------------------------------------------------------
#
# Permanent problems of a source (HTTP 4xx other than 429, a redirect off http(s) or in a
# loop, a missing file, over max_bytes, over deadline_s) are ProbeErrors: rejected rows with
# the reason. A deadline is a property of the server (it sends too slowly), so retrying would
# only spend another deadline: rejected too. Transient ones (5xx, 429, connection errors,
# timeouts) are TransientErrors, retried inside the item (`with_retries`); the item fails with
# the last one once `download.retries` are spent, and a re-run of the stage retries it.

CHUNK = 64 << 10  # bytes per read: the size cap, the deadline and a stop request are checked per chunk
MAX_REDIRECTS = 10
_RETRIED = (TransientError, ConnectionError, TimeoutError)


@contextlib.contextmanager
def fetch(cand: Candidate, cfg: AcquireConfig) -> Iterator[str]:
    """A local file for the candidate: itself if local, else a temporary download."""
    scheme = urlsplit(cand.source).scheme.lower() if "://" in cand.source else ""
    if not scheme:
        if cand.root and not _inside(cand.source, cand.root):
            raise ProbeError(f"symlink points outside the source folder {cand.root}")
        if not os.path.isfile(cand.source):
            raise ProbeError("source file not found (no such file; a manifest may name a file that does not exist)")
        yield cand.source
        return
    with tempfile.TemporaryDirectory(prefix="regdpo-fetch-") as tmp:
        dst = os.path.join(tmp, "video" + _ext(cand.source, cfg.extensions))
        if scheme in ALLOWED_SCHEMES:
            _download(cand.source, dst, cfg.download)
        else:
            _copy_from_storage(cand.source, dst, cfg.download)
        yield dst


def with_retries(fn: Callable[[], T], d: DownloadConfig) -> T:
    """fn(), retried `d.retries` times on transient errors, waiting backoff_s x 2^attempt
    (a stop request cuts the wait short and stops)."""
    for attempt in range(d.retries + 1):
        try:
            return fn()
        except _RETRIED as e:
            if attempt == d.retries:
                raise TransientError(f"{e} (gave up after {attempt + 1} attempts)") from e
            if shutdown.wait(d.backoff_s * 2 ** attempt):
                shutdown.raise_if_requested("acquire: waiting to retry a download")
    raise AssertionError("unreachable")


def _download(url: str, dst: str, d: DownloadConfig) -> None:
    deadline = time.monotonic() + d.deadline_s
    try:
        resp = _get(url, d, deadline)
        with resp, _watchdog(resp, deadline):
            _check_response(resp, d)
            with open(dst, "wb") as out:
                _copy_capped(_chunks(resp), out, d.max_bytes, deadline, d.deadline_s)
    except (ProbeError, TransientError, shutdown.ShutdownRequested):
        raise
    except Exception as e:  # the watchdog cut a read short, or the network failed
        shutdown.raise_if_requested("acquire: download interrupted")
        if time.monotonic() >= deadline:
            raise _over_deadline(d.deadline_s) from e
        if isinstance(e, (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError, OSError)):
            raise TransientError(f"network error: {type(e).__name__}") from e
        if isinstance(e, requests.RequestException):  # InvalidURL and kin: the URL itself is bad
            raise ProbeError(f"download failed: {type(e).__name__}") from e
        raise


def _get(url: str, d: DownloadConfig, deadline: float) -> requests.Response:
    """GET `url`, following redirects by hand so that every hop must be http(s) and new."""
    seen = {url}
    for _ in range(MAX_REDIRECTS + 1):
        connect = min(d.timeout_s, max(deadline - time.monotonic(), 0.01))
        resp = requests.get(url, stream=True, timeout=(connect, d.timeout_s), allow_redirects=False)
        if not resp.is_redirect:
            return resp
        target = urljoin(url, resp.headers["location"])
        resp.close()
        scheme = urlsplit(target).scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise ProbeError(f"download redirected to a {scheme or 'relative'!r} URL: only http and https are followed")
        if target in seen:
            raise ProbeError("redirect loop: the server redirects back to a URL it already sent")
        if time.monotonic() >= deadline:
            raise _over_deadline(d.deadline_s)
        seen.add(url := target)
    raise ProbeError(f"too many redirects (more than {MAX_REDIRECTS})")


def _check_response(resp: requests.Response, d: DownloadConfig) -> None:
    code, host = resp.status_code, urlsplit(resp.url).hostname  # never the URL: it may hold a token
    if code >= 500 or code == 429:
        raise TransientError(f"HTTP {code} from {host}")
    if not 200 <= code < 300:
        raise ProbeError(f"download failed: HTTP {code} from {host}")
    length = int(resp.headers.get("content-length") or 0)
    if length > d.max_bytes:
        raise ProbeError(f"download too large: {length} bytes > max_bytes {d.max_bytes}")


def _chunks(resp: requests.Response) -> Iterator[bytes]:
    """The body as it arrives (read1: whatever the socket has, at most CHUNK), decoded."""
    while chunk := resp.raw.read1(CHUNK, decode_content=True):
        yield chunk


@contextlib.contextmanager
def _watchdog(resp: requests.Response, deadline: float) -> Iterator[None]:
    """Cut the connection if one read blocks past the deadline or a stop is requested: the
    per-chunk checks cannot run while a read waits (and closing alone does not wake it)."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.1):
            if shutdown.requested() or time.monotonic() >= deadline:
                with contextlib.suppress(Exception):
                    resp.raw.shutdown()
                return

    dog = threading.Thread(target=watch, name="regdpo-download-watchdog", daemon=True)
    dog.start()
    try:
        yield
    finally:
        done.set()
        dog.join()


def _copy_from_storage(url: str, dst: str, d: DownloadConfig) -> None:
    deadline = time.monotonic() + d.deadline_s
    try:
        with open_url(url, "rb") as src, open(dst, "wb") as out:
            _copy_capped(iter(lambda: src.read(CHUNK), b""), out, d.max_bytes, deadline, d.deadline_s)
    except FileNotFoundError:
        raise ProbeError("source object not found (no such key)") from None
    except (ConnectionError, TimeoutError) as e:
        raise TransientError(f"storage read failed: {type(e).__name__}") from e


def _copy_capped(chunks: Iterable[bytes], out, cap: int, deadline: float, deadline_s: float) -> None:
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > cap:
            raise ProbeError(f"download too large: over max_bytes {cap}")
        if time.monotonic() >= deadline:
            raise _over_deadline(deadline_s)
        shutdown.raise_if_requested("acquire: download stopped")
        out.write(chunk)


def _over_deadline(deadline_s: float) -> ProbeError:
    return ProbeError(f"download exceeded deadline_s {deadline_s:g} s (the server sends too slowly); "
                      "raise acquire.download.deadline_s to allow slower sources")


def _ext(source: str, extensions: list[str]) -> str:
    ext = os.path.splitext(urlsplit(source).path)[1].lower()
    return ext if ext in {e.lower() for e in extensions} else ".video"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- criteria --------------------------------------------------------------------------------


def criteria(info, cfg: AcquireConfig) -> list[str]:
    """Every metadata criterion the video fails, most fundamental first."""
    reasons = []
    if info.long_edge > cfg.long_edge_max:
        reasons.append(f"frame size {info.display_width}x{info.display_height} exceeds long_edge_max {cfg.long_edge_max}")
    if not cfg.fps_min <= info.fps <= cfg.fps_max:
        reasons.append(f"frame rate {info.fps:g} fps outside {cfg.fps_min:g}-{cfg.fps_max:g} fps")
    if not cfg.duration_min <= info.duration <= cfg.duration_max:
        reasons.append(f"duration {info.duration:.2f} s outside {cfg.duration_min:g}-{cfg.duration_max:g} s")
    if info.short_edge < cfg.short_edge_min:
        reasons.append(f"short edge {info.short_edge} px < short_edge_min {cfg.short_edge_min}")
    bucket, dist = nearest_bucket(info.aspect, cfg.buckets)
    if dist > cfg.aspect_tolerance:
        reasons.append(f"aspect {info.display_width}:{info.display_height} not near an allowed bucket "
                       f"(nearest {bucket}, |log ratio| {dist:.2f} > {cfg.aspect_tolerance})")
    return reasons


def acquire_one(store: Store, cand: Candidate, cfg: AcquireConfig) -> dict:
    """Fetch, probe and judge one candidate; copy it into the store when accepted."""
    row = {"id": cand.id, "source": cand.source, "caption": cand.caption}
    try:
        with fetch(cand, cfg) as local:
            sha = sha256_file(local)
            info = probe(local)
            row |= {"sha256": sha, **info.as_row()}
            reasons = criteria(info, cfg)
            if reasons:
                return row | {"status": "rejected", "reason": "; ".join(reasons)}
            key = f"objects/{sha[:2]}/{sha}{_ext(cand.source, cfg.extensions)}"
            if store.exists(key):
                store.record(key, os.path.getsize(local), sha)  # the row's artifact all the same
            else:
                store.put_file(local, key)
    except ProbeError as e:
        return row | {"status": "rejected", "reason": str(e)}
    return row | {"status": "ok", "reason": "", "video": key, "bucket": nearest_bucket(info.aspect, cfg.buckets)[0]}


def dedupe(rows: list[dict]) -> list[dict]:
    """Reject accepted rows whose content duplicates an earlier accepted row."""
    first: dict[str, str] = {}
    out = []
    for row in sorted(rows, key=lambda r: r["id"]):
        if row.get("status") == "ok":
            if row["sha256"] in first:
                row = {**row, "status": "rejected", "reason": f"duplicate of {first[row['sha256']]}"}
            else:
                first[row["sha256"]] = row["id"]
        out.append(row)
    return out


def acquire_item(store: Store, out_dir: str, payload: dict) -> dict:
    """The acquire stage's item: one candidate (accepted sources go to objects/, by content),
    retried here on transient errors (the stage's Prefect task does not retry it again)."""
    cand, cfg = Candidate(**payload["candidate"]), AcquireConfig.model_validate(payload["config"])
    return with_retries(lambda: acquire_one(store, cand, cfg), cfg.download)
