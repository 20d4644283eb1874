"""The run config: defaults from the paper, key-path errors, overrides, path resolution, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from infra.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers_spec():
    cfg = RunConfig()
    a, n = cfg.acquire, cfg.normalize
    assert (a.fps_min, a.fps_max, a.duration_min, a.duration_max, a.short_edge_min) == (16, 45, 5, 6, 512)
    assert (n.fps, n.frames, n.short_edge) == (16, 81, 720)
    assert n.buckets == ["16:9", "9:16", "3:4", "1:1"]


def test_toy_config_loads_and_resolves_paths_against_the_file():
    cfg = load_config(REPO / "configs" / "toy.yaml")
    manifest = cfg.acquire.sources[0]
    assert Path(manifest.manifest) == REPO / "toy" / "captions.csv"
    assert Path(manifest.video_root) == REPO / "toy" / "clips"
    assert Path(cfg.normalize.caption.model) == REPO / "toy" / "models" / "tiny-blip"


def test_errors_name_every_key_path_and_reason(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("filter: {motion_min: -1, bogus: 3}\nnormalize: {short_edge: 700}\n"
                    "acquire: {buckets: ['16-9'], fps_min: 50, fps_max: 40}\nextra_section: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    for needle in ("filter.motion_min", "greater than or equal to 0", "filter.bogus", "unknown key",
                   "normalize.short_edge", "multiple of 16", "acquire.buckets", "W:H", "extra_section"):
        assert needle in msg, (needle, msg)


def test_range_errors_between_fields():
    with pytest.raises(ConfigError, match="fps_min 50.0 > fps_max 40.0"):
        load_config(None, ["acquire.fps_min=50", "acquire.fps_max=40"])


def test_overrides_use_yaml_values():
    cfg = load_config(None, ["filter.max_cuts=2", "normalize.buckets=[16:9]", "name=other"])
    assert cfg.filter.max_cuts == 2 and cfg.normalize.buckets == ["16:9"] and cfg.name == "other"
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["filter.max_cuts"])


def test_run_name_must_be_a_safe_store_key():
    with pytest.raises(ConfigError, match="name"):
        load_config(None, ["name=../escape"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("filter: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_rejects_a_bad_config_with_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("filter: {max_cuts: -3}\n")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "filter.max_cuts" in out.stderr and "greater than or equal to 0" in out.stderr


def test_cli_report_names_a_missing_run(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flows.cli", "report", "--run", "nope",
                          "--store", f"file://{tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "run 'nope' has no runs/nope/run.json" in out.stderr
