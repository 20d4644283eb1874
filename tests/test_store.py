"""Storage contract tests for infra.store, on a local file:// store and a real S3 server."""

from __future__ import annotations

import subprocess
import sys
import hashlib
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.store import (
    MANIFEST,
    SUCCESS,
    NotCommittedError,
    PathEscapeError,
    Store,
    StoreError,
    digest,
    join_key,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path: Path) -> Store:
    if request.param == "file":
        return Store(f"file://{tmp_path / 'store'}")
    return Store(request.getfixturevalue("s3_store_url"))


@pytest.fixture
def local_store(tmp_path: Path) -> Store:
    s = Store(f"file://{tmp_path / 'store'}")
    assert s.local
    return s


def _disk_files(root: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
    )


def _parquet_bytes(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


ROWS = [
    {"id": "a1", "status": "ok", "reason": "", "score": 0.1, "frames": 81,
     "tags": ["x", "y"], "uri": "clips/a1.mp4"},
    {"id": "b2", "status": "rejected", "reason": "static scene", "score": -2.5, "frames": 0,
     "tags": [], "uri": "clips/b2.mp4"},
    {"id": "c3", "status": "failed", "reason": "no video stream", "score": 1e-12, "frames": 7,
     "tags": ["z"], "uri": "clips/c3.mp4"},
]


# -- basic round trips ------------------------------------------------------------------


def test_store_kind(store: Store):
    assert store.local == store.url.startswith("file://")
    assert repr(store) == f"Store({store.url!r})"


def test_write_read_bytes_roundtrip(store: Store):
    data = bytes(range(256)) * 5
    key = store.write_bytes("items/abc/blob.bin", data)
    assert key == "items/abc/blob.bin"  # rows hold keys: relative to the root, so a store moves
    assert store.uri(key) == f"{store.url}/items/abc/blob.bin"
    assert store.key_of(store.uri(key)) == store.key_of(key) == key
    assert store.exists("items/abc/blob.bin")
    assert not store.exists("items/abc/other.bin")
    assert store.read_bytes("items/abc/blob.bin") == data

    store.write_bytes("items/abc/blob.bin", b"second")  # overwrite replaces whole object
    assert store.read_bytes("items/abc/blob.bin") == b"second"

    with pytest.raises(FileNotFoundError):
        store.read_bytes("items/abc/missing.bin")


def test_json_roundtrip(store: Store):
    obj = {"b": [1, 2.5, "x"], "a": {"nested": True}, "none": None}
    store.write_json("cfg/run.json", obj)
    assert store.read_json("cfg/run.json") == obj


def test_put_get_file_and_local_copy(store: Store, tmp_path: Path):
    src = tmp_path / "src.bin"
    payload = os.urandom(300_000)
    src.write_bytes(payload)
    key = store.put_file(src, "videos/v1.mp4")
    assert key == "videos/v1.mp4"
    assert store.exists("videos/v1.mp4")

    dst = tmp_path / "dst.bin"
    store.get_file("videos/v1.mp4", dst)
    assert dst.read_bytes() == payload

    with store.local_copy("videos/v1.mp4") as p:
        assert Path(p).read_bytes() == payload
        assert p.endswith(".mp4")
        assert (store.local_path("videos/v1.mp4") == p) if store.local else (
            store.local_path("videos/v1.mp4") is None)


def test_list_and_delete(store: Store):
    for key in ("stage/b.json", "stage/a.json", "stage/sub/c.json", "other/x.json"):
        store.write_json(key, {"k": key})
    assert store.list("stage") == ["stage/a.json", "stage/b.json", "stage/sub"]
    assert store.list("stage/sub") == ["stage/sub/c.json"]
    assert store.list("nothing/here") == []

    store.delete("stage/a.json")
    assert not store.exists("stage/a.json")
    assert store.list("stage") == ["stage/b.json", "stage/sub"]
    store.delete("stage/a.json")  # deleting a missing key is a no-op
    store.delete("stage")
    assert store.list("stage") == []
    assert store.exists("other/x.json")


# -- atomicity --------------------------------------------------------------------------


def test_writes_leave_only_the_written_objects_visible(store: Store, tmp_path: Path):
    src = tmp_path / "f.bin"
    src.write_bytes(b"f" * 1000)
    for i in range(5):
        store.write_bytes(f"atom/b{i}.bin", b"x" * i)
    store.put_file(src, "atom/f.bin")
    store.commit_manifest("atom/stage", ROWS, {"stage": "t"})
    assert store.list("atom") == [f"atom/b{i}.bin" for i in range(5)] + ["atom/f.bin", "atom/stage"]
    assert store.list("atom/stage") == sorted([f"atom/stage/{MANIFEST}", f"atom/stage/{SUCCESS}"])
    if store.local:
        on_disk = _disk_files(store.root)
        assert not [f for f in on_disk if ".tmp-" in f], on_disk


def test_local_list_hides_stray_temp_files(local_store: Store):
    local_store.write_bytes("d/real.bin", b"1")
    # A writer killed between open() and os.replace() leaves a .tmp-* file behind.
    Path(local_store.root, "d", ".tmp-deadbeef").write_bytes(b"partial")
    assert local_store.list("d") == ["d/real.bin"]
    with pytest.raises(PathEscapeError):
        local_store.read_bytes("d/.tmp-deadbeef")


@pytest.mark.parametrize("writer", ["write_bytes", "put_file"])
def test_local_interrupted_write_leaves_nothing_visible(
    local_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
):
    src = tmp_path / "src.bin"
    src.write_bytes(b"new contents")
    local_store.write_bytes("w/existing.bin", b"old contents")

    def boom(*_a, **_k):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", boom)

    def write(key: str):
        if writer == "write_bytes":
            local_store.write_bytes(key, b"new contents")
        else:
            local_store.put_file(src, key)

    with pytest.raises(OSError, match="simulated crash"):
        write("w/new.bin")
    with pytest.raises(OSError, match="simulated crash"):
        write("w/existing.bin")
    monkeypatch.undo()

    assert not local_store.exists("w/new.bin")
    assert local_store.read_bytes("w/existing.bin") == b"old contents"  # old object intact
    assert local_store.list("w") == ["w/existing.bin"]
    assert _disk_files(local_store.root) == ["w/existing.bin"]  # temp files cleaned up


# -- manifests --------------------------------------------------------------------------


def test_commit_and_read_manifest(store: Store):
    assert not store.is_committed("stages/filter/k1")
    record = store.commit_manifest("stages/filter/k1", ROWS, {"stage": "filter", "counts": {"ok": 1}})
    assert store.is_committed("stages/filter/k1")
    assert record["rows"] == 3
    assert record["stage"] == "filter" and record["counts"] == {"ok": 1}
    assert record["manifest"] == f"stages/filter/k1/{MANIFEST}"
    assert record["manifest_sha256"] == hashlib.sha256(
        store.read_bytes(f"stages/filter/k1/{MANIFEST}")).hexdigest()

    table, success = store.read_manifest("stages/filter/k1")
    assert success == record == store.read_success("stages/filter/k1")
    assert table.to_pylist() == ROWS
    assert table.schema.field("score").type == pa.float64()
    assert table.schema.field("frames").type == pa.int64()
    assert table.schema.field("tags").type == pa.list_(pa.string())


def test_commit_empty_manifest(store: Store):
    record = store.commit_manifest("stages/empty", [], {"stage": "acquire"})
    table, success = store.read_manifest("stages/empty")
    assert record["rows"] == 0 == table.num_rows
    assert table.column_names == ["id"]
    assert success["stage"] == "acquire"


def test_manifest_without_success_is_not_committed(store: Store):
    store.write_bytes(f"stages/half/{MANIFEST}", _parquet_bytes(ROWS))
    assert not store.is_committed("stages/half")
    with pytest.raises(NotCommittedError, match="has not committed") as exc:
        store.read_manifest("stages/half")
    assert isinstance(exc.value, FileNotFoundError)
    with pytest.raises(NotCommittedError):
        store.read_manifest("stages/never-written")


def test_tampered_manifest_is_rejected(store: Store):
    store.commit_manifest("stages/t", ROWS, {"stage": "t"})
    store.write_bytes(f"stages/t/{MANIFEST}", _parquet_bytes(ROWS[:1]))  # changed after commit
    with pytest.raises(StoreError, match="does not match") as exc:
        store.read_manifest("stages/t")
    assert not isinstance(exc.value, NotCommittedError)


# -- run index --------------------------------------------------------------------------


def test_update_and_read_run(store: Store):
    assert store.read_run("nightly") is None
    store.update_run("nightly", "acquire", {"key": "stages/acquire/k1", "rows": 3})
    first = store.read_run("nightly")
    assert first["name"] == "nightly" and list(first["stages"]) == ["acquire"]
    store.update_run("nightly", "filter", {"key": "stages/filter/k2"}, config={"fps": [16, 45]})
    created = store.read_run("nightly")["created_at"]
    store.update_run("nightly", config={"fps": [16, 45]})
    run = store.read_run("nightly")
    assert run["name"] == "nightly"
    assert run["created_at"] == created  # kept when the config is rewritten
    assert run["config"] == {"fps": [16, 45]}
    assert run["stages"] == {
        "acquire": {"key": "stages/acquire/k1", "rows": 3},
        "filter": {"key": "stages/filter/k2"},
    }
    store.update_run("nightly", "acquire", {"key": "stages/acquire/k3"})  # re-run one stage
    run = store.read_run("nightly")
    assert run["stages"]["acquire"] == {"key": "stages/acquire/k3"}
    assert run["config"] == {"fps": [16, 45]}  # kept when not given
    assert store.exists("runs/nightly/run.json")
    assert store.read_run("other") is None


_UPDATER = """
import sys
from infra.store import Store
store, me, n = Store(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for i in range(n):
    store.update_run("race", f"{me}-{i:03d}", {"key": f"k-{me}-{i}", "writer": me})
    if i % 20 == 0:
        store.update_run("race", config={"writer": me})
"""


def test_two_processes_updating_one_run_index_lose_no_entry(store: Store):
    # A pipeline run and a UI re-run of one stage update runs/<name>/ at the same time.
    n = 60
    procs = [subprocess.Popen([sys.executable, "-c", _UPDATER, store.url, me, str(n)], cwd=REPO)
             for me in ("a", "b")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    stages = store.read_run("race")["stages"]
    assert len(stages) == 2 * n
    assert all(stages[f"{me}-{i:03d}"] == {"key": f"k-{me}-{i}", "writer": me}
               for me in ("a", "b") for i in range(n))
    assert store.read_run("race")["config"]["writer"] in ("a", "b")


@pytest.mark.parametrize("run", ["../evil", "a/../../b", ".hidden", "", "a b"])
def test_run_names_are_contained(store: Store, run: str):
    with pytest.raises(PathEscapeError):
        store.update_run(run, "acquire", {})
    with pytest.raises(PathEscapeError):
        store.read_run(run)


# -- path containment -------------------------------------------------------------------

BAD_KEYS = [
    "../x", "a/../../x", "a/..", "..", "/abs", "/etc/passwd", ".hidden", "a/.hidden",
    ".tmp-123", "a\\b", "..\\x", "", "a/", "a//b", "./a", "a/./b", "a b", "a\nb", "~/x",
    "s3://bucket/x", "a:b", "é", "x" * 201,
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_unsafe_keys_are_refused(store: Store, key: str, tmp_path: Path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    for call in (
        lambda: store.path(key),
        lambda: store.uri(key),
        lambda: store.exists(key),
        lambda: store.read_bytes(key),
        lambda: store.write_bytes(key, b"x"),
        lambda: store.put_file(src, key),
        lambda: store.list(key),
        lambda: store.delete(key),
        lambda: store.commit_manifest(key, ROWS, {}),
    ):
        with pytest.raises(PathEscapeError):
            call()
    if store.local:
        parent = Path(store.root).parent
        assert not (parent / "x").exists() and _disk_files(store.root) == []


@pytest.mark.parametrize("key", [b"a", ["a"], ("a",), {"a": 1}])
def test_non_str_keys_are_refused(store: Store, key):
    with pytest.raises(PathEscapeError):
        store.path(key)
    with pytest.raises(PathEscapeError):
        store.write_bytes(key, b"x")


@pytest.mark.parametrize("key", [None, 123, 1.5])
def test_non_str_scalar_keys_are_refused(store: Store, key):
    with pytest.raises(PathEscapeError):
        store.path(key)


def test_join_key_and_digest():
    assert join_key("stages", "filter/k1", "x.json") == "stages/filter/k1/x.json"
    for parts in [("a", ".."), ("a", "b/../c"), ("/a",), ("a", "")]:
        with pytest.raises(PathEscapeError):
            join_key(*parts)
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
    assert len(digest("x")) == 20 and len(digest("x", n=8)) == 8


def test_key_of_roundtrip_and_rejections(store: Store):
    assert store.key_of(store.uri("a/b.json")) == "a/b.json"
    assert store.key_of("a/b.json") == "a/b.json"  # what rows hold: relative keys
    bad = [
        f"{store.url}/../x",
        f"{store.url}/a/../b",
        f"{store.url}/a/../../x",
        f"{store.url}/a//b",
        f"{store.url}/./a",
        f"{store.url}/a/",
        f"{store.url}/",
        store.url,
        f"{store.url}x/a",  # sibling prefix sharing a string prefix
        f"{store.url}/.hidden",
        "../x", "a/../../x", "./a", ".hidden/x",  # relative keys that leave or hide
        "s3://some-other-bucket/a",
        "file:///etc/passwd",
        "/etc/passwd",
    ]
    for uri in bad:
        with pytest.raises(PathEscapeError):
            store.key_of(uri)


# -- credentials ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "s3://AKIAEXAMPLE:TOPSECRETvalue123@bucket/prefix",
        "s3://AKIAEXAMPLE:TOPSECRETvalue123@bucket",
        "s3://TOPSECRETvalue123@bucket/prefix",
    ],
)
def test_credentials_in_url_are_refused(url: str):
    with pytest.raises(StoreError) as exc:
        Store(url)
    assert "TOPSECRETvalue123" not in str(exc.value)
    assert "TOPSECRETvalue123" not in repr(exc.value)
    assert "AWS_ACCESS_KEY_ID" in str(exc.value)  # tells the user what to do instead


def test_credentials_with_slash_in_secret_are_refused():
    # Real AWS secret keys are base64-like and often contain '/'.
    with pytest.raises(StoreError) as exc:
        Store("s3://AKIAEXAMPLE:TOP/SECRET+value@bucket/prefix")
    assert "TOP/SECRET" not in str(exc.value)


def test_no_credentials_leak_from_s3_store(s3_store_url: str, s3_server, tmp_path: Path):
    secrets = [s3_server.access_key, s3_server.secret_key]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == s3_server.secret_key  # creds come from env
    store = Store(s3_store_url)
    src = tmp_path / "f.bin"
    src.write_bytes(b"abc")

    outputs = [repr(store), str(store), store.url, store.root, store.uri("a/b")]
    outputs.append(store.write_bytes("a/b.bin", b"1"))
    outputs.append(store.write_json("a/c.json", {"v": 1}))
    outputs.append(store.put_file(src, "a/f.bin"))
    outputs += store.list("a")
    record = store.commit_manifest("stages/s", ROWS, {"stage": "s"})
    outputs.append(json.dumps(record))
    outputs.append(json.dumps(store.read_success("stages/s")))
    outputs.append(json.dumps(store.update_run("r", "s", {"manifest": record["manifest"]})))
    try:
        store.read_manifest("stages/missing")
    except NotCommittedError as e:
        outputs.append(str(e))
    assert store.read_bytes("a/b.bin") == b"1"  # the store really talked to the server

    for out in outputs:
        for secret in secrets:
            assert secret not in out, f"credential leaked into {out!r}"
