"""The artifact store: one fsspec root (file:// or s3://), atomic writes, committed manifests.

Contract (docs/architecture.md, "The stage contract"):
- every key is a relative path of safe parts; nothing derived from data can leave the root;
- an object becomes visible whole or not at all (temp + rename locally, one PUT on S3);
- a stage manifest exists for readers only once its `_SUCCESS.json` is written, last,
  and the manifest's bytes match the digest recorded there.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

SUCCESS = "_SUCCESS.json"
MANIFEST = "manifest.parquet"

# Letters, digits and . _ = - only; no leading dot (temp files and `..` both start with one).
_SAFE_PART = re.compile(r"^[A-Za-z0-9_=-][A-Za-z0-9._=-]{0,199}$")


_S3_CREATE = threading.Lock()  # see Store.create_bytes


class StoreError(RuntimeError):
    """Something about the store itself (not an item) is wrong."""


class PathEscapeError(StoreError, ValueError):
    """A key or URI would land outside the store root."""


class NotCommittedError(StoreError, FileNotFoundError):
    """A stage output has no `_SUCCESS.json`: for readers it does not exist."""


def digest(obj: Any, n: int = 20) -> str:
    """Deterministic short digest of a JSON-able value (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def safe_part(part: str) -> str:
    """Return `part` if it is one safe path component, else raise PathEscapeError."""
    if not isinstance(part, str) or not _SAFE_PART.match(part):
        raise PathEscapeError(
            f"unsafe store path component {part!r}: use letters, digits and . _ = - "
            "(no slashes, no leading dot)"
        )
    return part


def join_key(*parts: str) -> str:
    """Join key parts; each part may itself contain '/' separated safe components."""
    out: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise PathEscapeError(f"store key parts must be str, not {type(part).__name__}")
        for p in part.split("/"):
            out.append(safe_part(p))
    return "/".join(out)


def check_store_url(url: str) -> str:
    """Refuse a store URL that carries credentials (user:password@, or a query string, where
    presigned secrets live): credentials come from the environment, and a URL ends up in logs.
    The message never repeats the URL."""
    scheme, sep, rest = url.partition("://")
    authority = rest.split("/", 1)[0] if sep else ""
    if "@" in authority or (sep and scheme != "file" and "@" in rest):
        raise StoreError(
            "store URL must not carry credentials (user:password@): set AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL) in the environment instead"
        )
    if "?" in url or "#" in url:
        raise StoreError(
            "store URL must not have a query string or fragment (that is where presigned "
            "secrets live): give only scheme://bucket/prefix, credentials in the environment"
        )
    return url


class Store:
    """An artifact store rooted at an fsspec URL.

    Credentials and endpoints come from the environment (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...), never from code, and are never
    part of `url`, so logging a Store or its URIs cannot leak them.
    """

    def __init__(self, url: str):
        check_store_url(url)
        if "://" not in url:
            url = "file://" + os.path.abspath(url)
        elif url.startswith("file://"):
            url = "file://" + os.path.abspath(url[len("file://") :])
        self.url = url.rstrip("/")
        self.fs, root = url_to_fs(self.url, **_fs_options(self.url))
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            os.makedirs(self.root, exist_ok=True)
        self._receipts: dict[str, dict] = {}  # key -> {size, sha256} of what this object wrote
        self._receipts_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- paths ---------------------------------------------------------------------------

    def path(self, key: str) -> str:
        """Filesystem path (in the fs namespace) of a key; refuses anything outside root."""
        key = join_key(key)
        full = posixpath.normpath(f"{self.root}/{key}")
        if not full.startswith(self.root + "/"):
            raise PathEscapeError(f"key {key!r} leaves the store root")
        return full

    def uri(self, key: str) -> str:
        return f"{self.url}/{join_key(key)}"

    def key_of(self, ref: str) -> str:
        """The key a reference names: a store-relative key (what manifests, rows and the run
        index hold), or a full URI inside this store. Raises PathEscapeError for anything else."""
        if not isinstance(ref, str) or not ref:
            raise PathEscapeError(f"{ref!r} is not a store key")
        if "://" in ref:
            prefix = self.url + "/"
            if not ref.startswith(prefix):
                raise PathEscapeError(f"{ref!r} is not inside the store {self.url!r}")
            ref = ref[len(prefix):]
        if posixpath.normpath(ref) != ref:
            raise PathEscapeError(f"{ref!r} is not a normalized store key")
        return join_key(ref)

    def local_path(self, key: str) -> str | None:
        """A path on this machine for the key when the store is local, else None."""
        return self.path(key) if self.local else None

    # -- reads ---------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def list(self, prefix: str) -> list[str]:
        """Keys directly under `prefix` (visible objects only, temp files excluded)."""
        base = self.path(prefix)
        try:
            names = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            leaf = posixpath.basename(name.rstrip("/"))
            if leaf.startswith("."):
                continue
            out.append(f"{join_key(prefix)}/{leaf}")
        return sorted(out)

    def sizes(self, prefix: str) -> dict[str, int]:
        """key -> size of every object under `prefix` (one recursive listing)."""
        base = self.path(prefix)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for path, info in found.items():
            rel = path[len(self.root) + 1:] if path.startswith(self.root + "/") else None
            if rel and not posixpath.basename(rel).startswith(".") and info.get("type") != "directory":
                out[rel] = int(info.get("size") or 0)
        return out

    def get_file(self, key: str, local: str | os.PathLike) -> None:
        self.fs.get_file(self.path(key), os.fspath(local))

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[str]:
        """A local file path for `key`: the file itself on a local store, else a temp copy."""
        if self.local:
            yield self.path(key)
            return
        suffix = posixpath.splitext(key)[1]
        with tempfile.TemporaryDirectory(prefix="regdpo-") as tmp:
            dst = os.path.join(tmp, "object" + suffix)
            self.get_file(key, dst)
            yield dst

    # -- writes (all atomic) -------------------------------------------------------------

    def write_bytes(self, key: str, data: bytes) -> str:
        path = self.path(key)
        if self.local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        else:
            self.fs.pipe_file(path, data)  # one PUT: the object appears whole or not at all
        return self.record(key, len(data), hashlib.sha256(data).hexdigest())

    def write_json(self, key: str, obj: Any) -> str:
        return self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def create_bytes(self, key: str, data: bytes) -> bool:
        """Write `key` only if no object is there yet; False (nothing written) if one was.

        Local: the bytes go to a temp file whole, then link(2) names it: the link fails if the
        name exists, atomically across processes, and readers only ever see the whole object.
        S3: a conditional PUT (If-None-Match: *), which AWS S3 and MinIO enforce; some
        S3-compatible servers (rclone serve s3) ignore the condition, so a process-wide lock and
        a HEAD check make it exact within one process: one writer process per prefix there."""
        path = self.path(key)
        if not self.local:
            with _S3_CREATE:
                if self._head(path):
                    return False
                try:
                    self.fs.pipe_file(path, data, mode="create")
                except FileExistsError:
                    return False
                except OSError:
                    if self._head(path):  # a 412 some servers send without naming it
                        return False
                    raise
                return True
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _head(self, path: str) -> bool:
        try:
            self.fs.info(path, refresh=True)
            return True
        except FileNotFoundError:
            return False

    def put_file(self, local: str | os.PathLike, key: str) -> str:
        """Copy a local file to `key` atomically; returns the key."""
        size, sha = file_digest(local)
        path = self.path(key)
        if self.local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}")
            try:
                shutil.copyfile(local, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        else:
            # S3 objects (single or multipart upload) become visible only when complete.
            self.fs.put_file(os.fspath(local), path)
        return self.record(key, size, sha)

    def record(self, key: str, size: int, sha256: str) -> str:
        """Note that `key` holds these bytes (a row's artifacts come from these receipts)."""
        key = join_key(key)
        with self._receipts_lock:
            self._receipts[key] = {"key": key, "size": int(size), "sha256": sha256}
        return key

    def record_stored(self, key: str) -> str:
        """Note the bytes `key` holds now, written by another process (training ranks, a
        subprocess): hashed as they are read back."""
        with self.fs.open(self.path(key), "rb") as f:
            return self.record(key, *stream_digest(f))

    def take_receipts(self, keep) -> list[dict]:
        """Remove and return the receipts whose key satisfies `keep(key)`, sorted by key."""
        with self._receipts_lock:
            taken = sorted((k for k in self._receipts if keep(k)))
            return [self._receipts.pop(k) for k in taken]

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(key), recursive=True)

    # -- manifests -----------------------------------------------------------------------

    def is_committed(self, stage_dir: str) -> bool:
        return self.exists(f"{stage_dir}/{SUCCESS}")

    def commit_manifest(self, stage_dir: str, rows: list[dict], success: dict) -> dict:
        """Write the Parquet manifest, then `_SUCCESS.json` last; returns the success record."""
        columns = list(dict.fromkeys(k for row in rows for k in row))  # union, first-seen order
        table = (pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
                 if rows else pa.table({"id": pa.array([], pa.string())}))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        self.write_bytes(f"{stage_dir}/{MANIFEST}", data)
        record = {
            **success,
            "manifest": join_key(stage_dir, MANIFEST),
            "manifest_sha256": hashlib.sha256(data).hexdigest(),
            "rows": table.num_rows,
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.write_json(f"{stage_dir}/{SUCCESS}", record)
        return record

    def read_success(self, stage_dir: str) -> dict:
        try:
            return self.read_json(f"{stage_dir}/{SUCCESS}")
        except FileNotFoundError:
            raise NotCommittedError(
                f"{self.uri(stage_dir)} has no {SUCCESS}: the stage has not committed "
                "(run the stage, or use the stage key recorded in runs/<name>/run.json)"
            ) from None

    def read_manifest(self, stage_dir: str) -> tuple[pa.Table, dict]:
        """The committed manifest and its success record; verified against its digest."""
        success = self.read_success(stage_dir)
        data = self.read_bytes(f"{stage_dir}/{MANIFEST}")
        if hashlib.sha256(data).hexdigest() != success["manifest_sha256"]:
            raise StoreError(f"{self.uri(stage_dir)}: manifest does not match its {SUCCESS} digest")
        return pq.read_table(io.BytesIO(data)), success

    # -- run index -----------------------------------------------------------------------
    #
    # runs/<run>/run.json holds the run's name and config; runs/<run>/stages/<stage>.json one
    # entry per stage, each its own object: a pipeline run and a UI re-run of another stage
    # update different objects, so no update is ever lost (no read-modify-write of a shared file).

    def run_key(self, run: str) -> str:
        return join_key("runs", run, "run.json")

    def read_run(self, run: str) -> dict | None:
        """{name, config, stages: {stage: entry}} of a run, or None if it has no index."""
        try:
            index = self.read_json(self.run_key(run))
        except FileNotFoundError:
            index = None
        stages = {}
        for key in self.list(join_key("runs", run, "stages")):
            if key.endswith(".json"):
                with contextlib.suppress(FileNotFoundError):
                    stages[posixpath.basename(key)[: -len(".json")]] = self.read_json(key)
        if index is None and not stages:
            return None
        return {"name": run, **(index or {}), "stages": stages}

    def update_run(self, run: str, stage: str | None = None, entry: dict | None = None,
                   config: dict | None = None) -> None:
        """Record a stage's committed output (its own object) and/or the run's config."""
        if stage is not None:
            self.write_json(join_key("runs", run, "stages", f"{safe_part(stage)}.json"),
                            entry or {})
        if config is not None:
            try:
                created = self.read_json(self.run_key(run)).get("created_at", _now())
            except FileNotFoundError:
                created = _now()
            self.write_json(self.run_key(run), {"name": run, "created_at": created,
                                                "config": config, "updated_at": _now()})


def file_digest(path: str | os.PathLike) -> tuple[int, str]:
    """(size, sha256) of a local file, read in 1 MiB chunks."""
    with open(path, "rb") as f:
        return stream_digest(f)


def stream_digest(f) -> tuple[int, str]:
    """(size, sha256) of what an open binary file has left, read in 1 MiB chunks."""
    h, size = hashlib.sha256(), 0
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fs_options(url: str) -> dict:
    """fsspec options for a URL; S3 endpoint from AWS_ENDPOINT_URL (credentials stay in env)."""
    if url.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
        # No listings cache: other processes (a UI re-run, a second GSB server, cluster
        # workers) write to the same prefixes, and a cached listing would not show it.
        opts: dict = {"skip_instance_cache": True, "use_listings_cache": False}
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def open_url(url: str, mode: str = "rb"):
    """Open any fsspec URL (used for sources outside the store: s3 prefixes, manifests)."""
    return fsspec.open(url, mode, **_fs_options(url))


def filesystem(url: str):
    """(fsspec filesystem, path) for a URL outside the store, e.g. an s3:// source prefix."""
    return url_to_fs(url, **_fs_options(url))


def as_path(url_or_path: str) -> Path | None:
    """A local Path for a plain path or file:// URL, else None."""
    if url_or_path.startswith("file://"):
        return Path(url_or_path[len("file://") :])
    if "://" in url_or_path:
        return None
    return Path(url_or_path)
