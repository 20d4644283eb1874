"""Bad configs and bad CLI input fail before any work: a short error naming the key or input,
exit code 2, no traceback, nothing written to the store, no secret repeated (issue 10)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.preflight import PreflightError, preflight
from tests.conftest import toy_config

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3tVALUE"


def _cli(*args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# (case, config file bytes, extra CLI args, what the error must say)
CONFIG_CASES = [
    ("credentials in an s3 store URL", b"store: s3://AKIA:" + SECRET.encode() + b"@bucket/p\n",
     [], "must not carry credentials"),
    ("credentials in an http store URL", b"store: http://user:" + SECRET.encode() + b"@host/p\n",
     [], "must not carry credentials"),
    ("a secret in the store URL's query", b"store: s3://bucket/p?X-Amz-Signature=" + SECRET.encode()
     + b"\n", [], "must not have a query string"),
    ("credentials through --set", b"name: x\n", ["--set", f"store=s3://k:{SECRET}@b/p"],
     "must not carry credentials"),
    ("an infinite timeout", b"acquire: {download: {timeout_s: .inf}}\n", [],
     "acquire.download.timeout_s"),
    ("a NaN threshold", b"filter: {flash_delta: .nan}\n", [], "filter.flash_delta"),
    ("deeply nested YAML", b"filter: " + b"[" * 20000 + b"]" * 20000 + b"\n", [],
     "nested too deeply"),
    ("a non-UTF-8 config", b"name: caf\xe9\n", [], "not UTF-8"),
    ("a typo'd stage in --only", b"name: x\n", ["--only", "filtr"], "unknown stage(s) ['filtr']"),
]


@pytest.mark.parametrize("case,body,args,says", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_refused_before_any_work(tmp_path, case, body, args, says):
    (tmp_path / "run.yaml").write_bytes(body)
    out = _cli("run", "run.yaml", *args, cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert says in text, text
    assert "Traceback" not in text and SECRET not in text, text
    assert not (tmp_path / "artifacts").exists(), "nothing may be written before the checks pass"


@pytest.mark.parametrize("args", [["report", "--run", "../x"], ["gsb", "tally", "--run", "../x"],
                                  ["gsb", "serve", "--run", "a/b"]])
def test_a_bad_run_name_is_refused_without_a_traceback(tmp_path, args):
    out = _cli(*args, "--store", f"file://{tmp_path}", cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 2 and "is not a run name" in text and "Traceback" not in text, text


def test_a_store_with_credentials_is_refused_by_report_without_repeating_it(tmp_path):
    out = _cli("report", "--run", "x", "--store", f"s3://k:{SECRET}@b/p", cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 2 and "must not carry credentials" in text and SECRET not in text


# -- preflight: what the config names must exist before the first stage -------------------

ALL = ["acquire", "filter", "normalize", "negatives", "pairs", "precompute", "train", "evaluate"]


def _problems(cfg, stages=ALL) -> list[str]:
    try:
        preflight(cfg, stages)
    except PreflightError as e:
        return e.problems
    return []


def test_the_toy_config_passes(toy_dir, tmp_path):
    assert _problems(_toy(toy_dir, tmp_path)) == []


def _toy(toy_dir: Path, tmp_path: Path, **sections):
    models = toy_dir / "models"
    tiny = {"name": "g", "model": str(models / "tiny-wan-i2v"), "kind": "i2v", "dtype": "float32"}
    base = dict(negatives={"generators": [tiny]},
                train={"model": str(models / "tiny-wan-i2v"), "kind": "i2v", "dtype": "float32"},
                evaluate={"evaluators": ["proxy"]})
    return toy_config(toy_dir, f"file://{tmp_path}/store", **(base | sections))


def test_empty_sources_are_an_error(toy_dir, tmp_path):
    cfg = _toy(toy_dir, tmp_path)
    cfg.acquire.sources = []
    assert any("acquire.sources is empty" in p for p in _problems(cfg))


def test_sources_without_captions_need_a_captioner(toy_dir, tmp_path):
    cfg = _toy(toy_dir, tmp_path)
    cfg.normalize.caption.model = None
    (problem,) = _problems(cfg)
    assert str(toy_dir / "edge") in problem and "normalize.caption.model" in problem
    assert "captions.csv" not in problem  # that manifest has its caption column
    no_column = tmp_path / "videos.csv"
    no_column.write_text("video\na.mp4\n")
    cfg.acquire.sources = [{"manifest": str(no_column)}]
    cfg = type(cfg).model_validate(cfg.model_dump())
    assert "videos.csv" in _problems(cfg)[0]
    # Only normalize needs them: a re-run of filter alone is not refused.
    assert _problems(cfg, ["acquire", "filter"]) == []


def test_every_missing_model_is_named_with_its_key_and_the_fix(toy_dir, tmp_path):
    cfg = _toy(toy_dir, tmp_path,
               negatives={"generators": [{"name": "g", "model": "Wan-AI/Nope-Diffusers", "kind": "i2v"}]},
               train={"model": str(tmp_path / "no-model"), "kind": "i2v"},
               evaluate={"evaluators": ["vbench", "proxy"], "vbench": {"python": str(tmp_path / "nopy")}},
               normalize={"caption": {"model": str(tmp_path / "no-captioner")}})
    problems = _problems(cfg)
    assert len(problems) == 4, problems
    neg, trained, cap, vb = problems
    assert neg.startswith("negatives.generators[0].model") and "hf download Wan-AI/Nope-Diffusers" in neg
    assert trained.startswith("precompute") and "train.model" in trained and "no-model" in trained
    assert cap.startswith("normalize.caption.model") and "no-captioner" in cap
    assert vb.startswith("evaluate.vbench") and "make vbench-env" in vb
    # A stage that is not run does not need its model.
    assert len(_problems(cfg, ["acquire", "filter"])) == 0


def test_a_model_folder_missing_a_component_is_named(toy_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(toy_dir / "models" / "tiny-wan-i2v", broken)
    shutil.rmtree(broken / "image_encoder")
    cfg = _toy(toy_dir, tmp_path, train={"model": str(broken), "kind": "i2v"})
    (problem,) = _problems(cfg, ["train"])
    assert "image_encoder" in problem and str(broken) in problem


def test_the_cli_stops_before_prefect_and_writes_nothing(toy_dir, tmp_path):
    (tmp_path / "run.yaml").write_text(
        f"name: x\nstore: file://{tmp_path}/store\n"
        f"acquire: {{sources: ['{toy_dir / 'edge'}']}}\n"
        f"train: {{model: {tmp_path / 'no-model'}, kind: i2v}}\n")
    out = _cli("run", "run.yaml", cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "carry no captions" in text and "train.model" in text, text
    assert "Traceback" not in text and "Beginning flow run" not in text, text
    assert not (tmp_path / "store").exists()


def test_an_ffmpeg_without_zscale_is_named_before_the_video_stages(toy_dir, tmp_path, monkeypatch):
    """The video stages resize with zscale (libzimg): an ffmpeg built without it, or none at
    all, is one problem naming the binary and the fix; stages that never resize do not care."""
    import infra.video

    cfg = _toy(toy_dir, tmp_path)
    fake = tmp_path / "ffmpeg"  # an ffmpeg whose filter list has swscale's scale only
    fake.write_text("#!/bin/sh\necho 'Filters:'\necho ' ..C scale             V->V       Scale'\n")
    fake.chmod(0o755)
    for binary, says in ((str(fake), "has no zscale filter (it is built without libzimg)"),
                         (str(tmp_path / "nowhere"), "does not run")):
        monkeypatch.setattr(infra.video, "FFMPEG", binary)
        infra.video.ffmpeg_problem.cache_clear()
        try:
            (problem,) = _problems(cfg, ["filter", "normalize"])
            assert problem.startswith(f"ffmpeg ({binary!r}) {says}") and "REGDPO_FFMPEG" in problem
            assert _problems(cfg, ["pairs", "train"]) == []
        finally:
            infra.video.ffmpeg_problem.cache_clear()
