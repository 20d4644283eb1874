"""Keys change only when a result would (docs/architecture.md, "Keys").

Each case edits a copy of the project's source and recomputes every stage's code version
(flows/dag.py, infra/code.py) from the copy: a comment, a docstring or an unrelated function
changes nothing; editing the code that computes a stage's output changes that stage's version
and every stage downstream of it, and no stage upstream.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import infra.code
from flows import dag
from infra.stage import item_key, stage_key

REPO = Path(__file__).resolve().parents[1]
DOWNSTREAM = {  # a stage -> itself and every stage that reads it, transitively
    "filter": {"filter", "normalize", "negatives", "pairs", "precompute", "train", "evaluate"},
    "precompute": {"precompute", "train", "evaluate"},
    "train": {"train", "evaluate"},
}


@pytest.fixture
def source(tmp_path, monkeypatch):
    """A copy of the project's packages that the code digests read instead of the checkout."""
    for package in infra.code.PROJECT:
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(infra.code, "ROOT", tmp_path)

    def versions() -> dict[str, str]:
        infra.code._module.cache_clear()
        infra.code.code_digest.cache_clear()
        dag.code_version.cache_clear()
        return {s: dag.code_version(s) for s in dag.ORDER}

    yield tmp_path, versions
    for clear in (infra.code._module, infra.code.code_digest, dag.code_version):
        clear.cache_clear()


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_comments_docstrings_and_unrelated_code_change_no_key(source):
    root, versions = source
    before = versions()
    _edit(root / "tasks/precompute.py", "def video_latent(", "# a new comment\ndef video_latent(")
    _edit(root / "tasks/train.py", '"""Reg-DPO on a LoRA policy', '"""Edited docs. Reg-DPO on a LoRA policy')
    _edit(root / "tasks/filter.py", '    """Every rejection reason that applies',
          '    """An edited docstring of decide. Every rejection reason that applies')
    _edit(root / "tasks/evaluate.py", "def mean_by_model(", "def unused_helper():\n    return 1\n\n\ndef mean_by_model(")
    # An unrelated function's body: the report's markdown is not what any stage computes.
    _edit(root / "tasks/report.py", "def markdown(", "def markdown_v2():\n    return 2\n\n\ndef markdown(")
    assert versions() == before


@pytest.mark.parametrize("stage, path, old, new", [
    ("filter", "tasks/filter.py", "k = max(1, int(0.02 * mag.size))", "k = max(1, int(0.03 * mag.size))"),
    ("precompute", "tasks/precompute.py", 'tensors["mask"] = resample_mask(', 'tensors["mask"] = 1 * resample_mask('),
    ("train", "losses/preference.py", "    b = beta / 2\n", "    b = beta / 3\n"),  # Eq. 4 in dgr
])
def test_editing_what_computes_a_stage_rekeys_it_and_downstream(source, stage, path, old, new):
    root, versions = source
    before = versions()
    _edit(root / path, old, new)
    after = versions()
    changed = {s for s in dag.ORDER if after[s] != before[s]}
    assert changed == DOWNSTREAM[stage]


def test_a_helper_in_another_module_is_followed(source):
    # filter decodes through infra.video.decode_frames: editing it re-keys filter (and on).
    root, versions = source
    before = versions()
    _edit(root / "infra/video.py", 'filter="bilinear"', 'filter="bicubic"')
    after = versions()
    assert after["filter"] != before["filter"] and after["acquire"] == before["acquire"]


def test_keys_hold_no_store_url():
    # Keys are functions of what defines a result; nothing in them names where it is stored.
    code = dag.code_version("filter")
    a = item_key("filter", {"sha256": "ab"}, {"short_edge": 256}, code)
    b = stage_key("filter", {"motion_min": 0.6}, "digest-of-inputs", code)
    assert re.fullmatch(r"[0-9a-f]{20}", a) and re.fullmatch(r"[0-9a-f]{20}", b)
    assert item_key("filter", {"sha256": "ab"}, {"short_edge": 256}, code) == a


def test_an_unknown_code_root_is_an_error():
    with pytest.raises(LookupError, match="tasks.filter:no_such_function"):
        infra.code.code_digest("tasks.filter:no_such_function")


def test_a_parse_racing_another_thread_is_retried(source, monkeypatch):
    """CPython < 3.11.8 raises SystemError when another thread's ast.parse races ours
    (gh-106905); a code version must still come out, and the same one."""
    root, versions = source
    before = versions()
    real = infra.code.ast.parse
    raced = []

    def racy(*args, **kwargs):
        if len(raced) < 3:
            raced.append(1)
            raise SystemError("AST constructor recursion depth mismatch (before=60, after=74)")
        return real(*args, **kwargs)

    monkeypatch.setattr(infra.code.ast, "parse", racy)
    assert versions() == before and len(raced) == 3

    def broken(*args, **kwargs):
        raise SystemError("some other interpreter error")

    monkeypatch.setattr(infra.code.ast, "parse", broken)
    with pytest.raises(SystemError, match="other interpreter error"):
        versions()
