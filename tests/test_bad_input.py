"""Bad input (docs/architecture.md, "The stage contract"): every hostile or odd input ends as a row with a clear
reason or as a good GT clip, the flow finishes, and nothing is written outside the store.

One curation flow runs over the edge-case folder, a URL list served by a real local HTTP
server, and an OpenVid-style CSV whose video column tries to leave its folder."""

from __future__ import annotations

import csv
import functools
import os
import re
import shutil
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import toy_config
from infra.stage import stage_dir
from infra.store import Store

STAGES = ("acquire", "filter", "normalize")

# Edge case file -> the final status and a pattern its reason must match.
EDGE = {
    "empty.mp4": ("rejected", r"empty file \(0 bytes\)"),
    "truncated.mp4": ("rejected", r"truncated or incomplete MP4 \(moov atom not found\)"),
    "not_a_video.mp4": ("rejected", r"not a readable video"),
    "audio_only.mp4": ("rejected", r"no video stream \(streams: audio\)"),
    "three_frames.mp4": ("rejected", r"duration 0\.\d+ s outside"),
    "huge_8k.mp4": ("rejected", r"frame size 7680x4320 exceeds long_edge_max"),
    "vfr.mp4": ("ok", ""),
    "tenbit.mp4": ("ok", ""),
    "odd_dims.mp4": ("ok", ""),
    "rotated_phone.mp4": ("ok", ""),
    "name with spaces ü ñ.mp4": ("ok", ""),
    "-dash; $(rm -rf x).mp4": ("ok", ""),
}
HOSTILE_MANIFEST = {
    "../../etc/passwd": "escapes",
    "clips/../../../etc/shadow.mp4": "escapes",
    "/etc/passwd": "absolute",
}
BAD_SCHEMES = {"ftp://127.0.0.1/clip.mp4": "ftp", "file:///etc/passwd": "file",
               "javascript:alert(1)": "javascript"}
_SAFE = re.compile(r"^[A-Za-z0-9_=-][A-Za-z0-9._=-]*$")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def tree(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every file and folder under root (path -> size, mtime of files), optionally minus one subtree."""
    out = {}
    for d, dirs, files in os.walk(root):
        if skip is not None and Path(d) == skip.parent:
            dirs[:] = [x for x in dirs if Path(d, x) != skip]
        for name in dirs + files:
            p = Path(d, name)
            if skip is not None and p == skip:
                continue
            st = p.lstat()  # a folder's mtime changes when temp files come and go: not compared
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns) if p.is_file() else (-1, 0)
    return out


@pytest.fixture(scope="module")
def http_base(tmp_path_factory, toy_dir) -> str:
    """A real HTTP server on 127.0.0.1 serving one good clip and a URL list."""
    www = tmp_path_factory.mktemp("www")
    shutil.copyfile(toy_dir / "clips" / "clean_landscape_30fps.mp4", www / "good.mp4")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www)))
    base = f"http://127.0.0.1:{server.server_address[1]}"
    lines = ["# a URL list", f"{base}/good.mp4", f"{base}/missing.mp4", *BAD_SCHEMES, ""]
    (www / "list.txt").write_text("\n".join(lines))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield base
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def bad_run(prefect_api, toy_dir, http_base, tmp_path_factory) -> SimpleNamespace:
    from flows.pipeline import curate

    base = tmp_path_factory.mktemp("bad")
    hostile = base / "hostile"
    (hostile / "clips").mkdir(parents=True)
    with open(hostile / "openvid.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["video", "caption"])
        writer.writeheader()
        for name in HOSTILE_MANIFEST:
            writer.writerow({"video": name, "caption": "something"})
    cwd, systmp, store_root = base / "cwd", base / "systmp", base / "store"
    cwd.mkdir()
    systmp.mkdir()
    cfg = toy_config(toy_dir, f"file://{store_root}", acquire={"sources": [
        str(toy_dir / "edge"),
        f"{http_base}/list.txt",
        {"manifest": str(hostile / "openvid.csv")},  # video_root: the CSV's own folder
    ]})

    before, toy_before = tree(base), tree(toy_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)  # a relative write anywhere would land here
        mp.setattr(tempfile, "tempdir", str(systmp))  # and every temp file here
        result = curate(run="bad-input", config=cfg)
    after, toy_after = tree(base, skip=store_root), tree(toy_dir)

    store = Store(f"file://{store_root}")
    rows = {}
    for stage in STAGES:
        table, _ = store.read_manifest(stage_dir(stage, result[stage]["key"]))
        rows[stage] = table.to_pylist()
    return SimpleNamespace(store=store, store_root=store_root, result=result, rows=rows, base=base,
                           before=before, after=after, toy_before=toy_before, toy_after=toy_after,
                           systmp=systmp, cwd=cwd, http_base=http_base)


def final_rows(run) -> dict[str, dict]:
    """Each source's last row: where it was rejected, or its normalize row."""
    later = {stage: {r["id"]: r for r in run.rows[stage]} for stage in ("filter", "normalize")}
    out = {}
    for row in run.rows["acquire"]:
        if row["status"] == "ok":
            row = later["filter"][row["id"]]
            if row["status"] == "ok":
                row = later["normalize"][row["id"]]
        assert row["source"] not in out, f"two rows for {row['source']}"
        out[row["source"]] = row
    return out


def test_the_flow_finishes_and_commits_every_stage(bad_run):
    index = bad_run.store.read_run("bad-input")
    for stage in STAGES:
        assert index["stages"][stage]["key"] == bad_run.result[stage]["key"]
        assert bad_run.store.is_committed(stage_dir(stage, bad_run.result[stage]["key"]))
    for stage, rows in bad_run.rows.items():
        for row in rows:
            assert row["id"] and row["status"] in ("ok", "rejected"), (stage, row)
            if row["status"] == "rejected":
                assert row["reason"].strip(), (stage, row)


@pytest.mark.parametrize("name", list(EDGE))
def test_edge_case_ends_with_a_clear_reason_or_ok(bad_run, toy_dir, name):
    source = str((toy_dir / "edge" / name).resolve())
    rows = final_rows(bad_run)
    assert source in rows, f"{name} has no row"
    row = rows[source]
    status, pattern = EDGE[name]
    assert row["status"] == status, row
    if status == "rejected":
        assert re.search(pattern, row["reason"]), row["reason"]
    else:
        assert row["reason"] == "" and row["frames"] == 81 and row["fps"] == 16, row
        assert bad_run.store.exists(bad_run.store.key_of(row["video"]))
        assert bad_run.store.exists(bad_run.store.key_of(row["ref_image"]))


def test_rotated_phone_video_comes_out_portrait(bad_run, toy_dir):
    row = final_rows(bad_run)[str((toy_dir / "edge" / "rotated_phone.mp4").resolve())]
    assert (row["bucket"], row["width"], row["height"]) == ("9:16", 720, 1280)


def test_url_sources(bad_run):
    rows = final_rows(bad_run)
    good = rows[f"{bad_run.http_base}/good.mp4"]
    assert good["status"] == "ok" and good["video"].startswith("items/normalize/"), good
    acquired = {r["source"]: r for r in bad_run.rows["acquire"]}
    assert acquired[f"{bad_run.http_base}/good.mp4"]["video"].startswith("objects/")
    missing = rows[f"{bad_run.http_base}/missing.mp4"]
    assert missing["status"] == "rejected" and "HTTP 404" in missing["reason"], missing
    for url, scheme in BAD_SCHEMES.items():
        row = rows[url]
        assert row["status"] == "rejected", row
        assert f"scheme '{scheme}' not allowed" in row["reason"], row["reason"]


def test_manifest_paths_cannot_escape_the_video_root(bad_run):
    rows = final_rows(bad_run)
    for name, word in HOSTILE_MANIFEST.items():
        row = rows[name]  # the row names the entry, never a resolved file outside the root
        assert row["status"] == "rejected" and word in row["reason"], row
        assert not row.get("video")
    # Only clips from the declared sources were accepted.
    for row in bad_run.rows["acquire"]:
        if row["status"] == "ok":
            assert "/edge/" in row["source"] or row["source"].startswith(bad_run.http_base), row


def test_every_source_has_exactly_one_row(bad_run, toy_dir):
    sources = {r["source"] for r in bad_run.rows["acquire"]}
    expected = ({str((toy_dir / "edge" / n).resolve()) for n in EDGE}
                | {f"{bad_run.http_base}/good.mp4", f"{bad_run.http_base}/missing.mp4"}
                | set(BAD_SCHEMES) | set(HOSTILE_MANIFEST))
    assert sources == expected
    assert len(bad_run.rows["acquire"]) == len(expected)


def test_nothing_is_written_outside_the_store(bad_run):
    assert bad_run.after == bad_run.before, "files appeared or changed outside the store root"
    assert bad_run.toy_after == bad_run.toy_before, "the source folders were modified"
    assert not any(bad_run.cwd.iterdir()) and not any(bad_run.systmp.iterdir())


def test_store_keys_are_safe_names(bad_run):
    """Every object in the store has a key of safe parts: no data-derived file names."""
    files = []
    for d, _, names in os.walk(bad_run.store_root):
        for name in names:
            rel = Path(d, name).relative_to(bad_run.store_root)
            files.append(rel)
            assert all(_SAFE.match(part) for part in rel.parts), rel
    assert files
    assert {f.parts[0] for f in files} <= {"objects", "items", "stages", "runs", "cache"}
