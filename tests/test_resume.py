"""Kill and resume (docs/architecture.md, "The stage contract": "killing any stage at any moment
and starting it again must finish with the same result and lose nothing"): `regdpo run` is SIGKILLed mid-normalize, then
run again; committed work is reused byte for byte and readers never see a partial manifest."""

from __future__ import annotations

import csv
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from infra.stage import stage_dir
from infra.store import SUCCESS, NotCommittedError, Store

STAGES = ("acquire", "filter", "normalize")
CLIPS = ["clean_landscape_30fps.mp4", "clean_portrait_24fps.mp4", "clean_3x4_25fps.mp4",
         "clean_square_30fps.mp4"]
DEADLINE_S = 300


def regdpo() -> str:
    exe = Path(sys.executable).parent / "regdpo"
    return str(exe) if exe.exists() else shutil.which("regdpo")


def child_env(prefect_home: Path) -> dict:
    """The CLI as a user runs it: Prefect's ephemeral API in an isolated home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env |= {"PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    return env


def item_rows(root: Path) -> dict[str, bytes]:
    """The bytes of every committed item row (items/<stage>/<key>/row.json)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("items/*/*/row.json"))}


def successes(root: Path, stage: str) -> list[Path]:
    return sorted(root.glob(f"stages/{stage}/*/{SUCCESS}"))


def visible_tree_is_clean(store: Store, root: Path) -> None:
    """Temp files are the only hidden files, and Store.list (what readers use) never shows them."""
    for d, dirs, files in os.walk(root):
        rel = Path(d).relative_to(root)
        for name in dirs + files:
            if name.startswith("."):
                assert name.startswith(".tmp-") and name in files, f"unexpected hidden {rel / name}"
        if rel.parts:
            listed = {k.rsplit("/", 1)[-1] for k in store.list(rel.as_posix())}
            assert listed == {n for n in dirs + files if not n.startswith(".")}, rel


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.mark.slow
def test_kill_mid_normalize_then_resume(toy_dir, tmp_path):
    root = tmp_path / "store"
    manifest = tmp_path / "clips.csv"
    with open(toy_dir / "captions.csv", newline="") as f:
        keep = [r for r in csv.DictReader(f) if r["video"] in CLIPS]
    assert len(keep) == len(CLIPS)
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(keep[0]))
        writer.writeheader()
        writer.writerows(keep)
    config = tmp_path / "resume.yaml"
    config.write_text(yaml.safe_dump({
        "name": "resume",
        "store": f"file://{root}",
        "acquire": {"sources": [{"manifest": str(manifest), "video_root": str(toy_dir / "clips")}]},
        # One item at a time at a real encoder preset: a wide window between item commits.
        "normalize": {"preset": "medium", "workers": 1,
                      "caption": {"model": str(toy_dir / "models" / "tiny-blip")}},
    }))
    cmd = [regdpo(), "run", str(config), "--run", "resume", "--only", "acquire,filter,normalize"]
    env = child_env(tmp_path / "prefect-home")
    store = Store(f"file://{root}")

    # -- first run: SIGKILL the whole process group once normalize has committed an item ------
    log1 = tmp_path / "run1.log"
    with open(log1, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            norm_rows = list(root.glob("items/normalize/*/row.json"))
            if norm_rows and not successes(root, "normalize"):
                break
            assert proc.poll() is None, f"run ended (rc {proc.returncode}) before it could be killed:\n{tail(log1)}"
            assert not successes(root, "normalize"), "normalize committed before it could be killed"
            assert time.monotonic() < deadline, f"no normalize item after {DEADLINE_S}s:\n{tail(log1)}"
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.02)  # returns at once if the run ends early
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    assert successes(root, "normalize") == [], "a normalize manifest was committed"
    for d in store.list("stages/normalize"):  # for readers, no normalize output exists
        with pytest.raises(NotCommittedError):
            store.read_manifest(d)
    visible_tree_is_clean(store, root)
    before = item_rows(root)
    committed_before = {s: sum(1 for k in before if k.startswith(f"items/{s}/")) for s in STAGES}
    assert committed_before["normalize"] >= 1
    assert committed_before["normalize"] < len(CLIPS)
    success_before = {s: [p.read_bytes() for p in successes(root, s)] for s in STAGES}

    # -- second run, with a reader checking every committed manifest all along -----------------
    seen, errors, stop = {}, [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for stage_folder in store.list("stages"):
                for d in store.list(stage_folder):
                    try:
                        table, success = store.read_manifest(d)
                    except NotCommittedError:
                        continue
                    except Exception as e:  # noqa: BLE001 - any other error is a failure
                        errors.append(f"{d}: {type(e).__name__}: {e}")
                        continue
                    if table.num_rows != success["rows"]:
                        errors.append(f"{d}: {table.num_rows} rows, success says {success['rows']}")
                    seen[d] = seen.get(d, 0) + 1
            stop.wait(0.01)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    log2 = tmp_path / "run2.log"
    with open(log2, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        rc = proc.wait(timeout=DEADLINE_S)
    finally:
        stop.set()
        thread.join(timeout=30)
        if proc.poll() is None:  # timed out: take its Prefect server down with it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert rc == 0, tail(log2)
    assert not errors, errors
    assert seen, "the reader never read a committed manifest"

    # -- nothing committed before the kill was redone -----------------------------------------
    after = item_rows(root)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"rows redone or lost: {changed}"
    index = store.read_run("resume")
    for stage in STAGES:
        d = stage_dir(stage, index["stages"][stage]["key"])
        table, success = store.read_manifest(d)
        if success_before[stage]:  # committed before the kill: reused whole, not rewritten
            assert [p.read_bytes() for p in successes(root, stage)] == success_before[stage], stage
            assert seen.get(d), f"the reader never read the committed {stage} manifest"
        else:
            assert success["reused"] >= committed_before[stage], (stage, success)
            assert success["reused"] + success["computed"] == success["rows"], success
    # The interrupted stage: its pre-kill items were reused, the rest computed.
    success = store.read_success(stage_dir("normalize", index["stages"]["normalize"]["key"]))
    assert success["reused"] >= committed_before["normalize"] >= 1
    assert success["computed"] == len(CLIPS) - success["reused"]

    # -- the final manifest holds every expected GT clip ---------------------------------------
    table, _ = store.read_manifest(stage_dir("normalize", index["stages"]["normalize"]["key"]))
    rows = {os.path.basename(r["source"]): r for r in table.to_pylist()}
    assert set(rows) == set(CLIPS)
    for name, row in rows.items():
        assert row["status"] == "ok" and row["reason"] == "", row
        assert row["frames"] == 81 and row["fps"] == 16 and row["prompt"], row
        assert store.exists(store.key_of(row["video"])) and store.exists(store.key_of(row["ref_image"]))
    assert len(successes(root, "normalize")) == 1
    visible_tree_is_clean(store, root)
