"""The critic's seed data format (regdpo.critic-seed.v1): reads CSV and Parquet, and every
problem is reported with its row and column."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from infra.critic_seed import SeedDataError, read_seed_pairs

ROWS = [
    {"prompt": "a red cat walks", "video_a": "v/1.mp4", "video_b": "v/2.mp4", "preferred": "a",
     "rationale": "A keeps the cat's shape; B melts it.", "motion_smoothness": "A is smoother"},
    {"prompt": "a dog runs", "video_a": "v/3.mp4", "video_b": "s3://bucket/4.mp4",
     "preferred": "B", "rationale": "B follows the prompt.", "motion_smoothness": ""},
]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "v").mkdir()
    for i in (1, 2, 3):
        (tmp_path / "v" / f"{i}.mp4").write_bytes(b"\0")
    return tmp_path


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_reads_csv_and_parquet(folder: Path, suffix: str):
    path = folder / f"seed{suffix}"
    table = pd.DataFrame(ROWS)
    table.to_csv(path, index=False) if suffix == ".csv" else table.to_parquet(path)
    a, b = read_seed_pairs(path)
    assert (a.id, a.preferred, a.video_a) == ("1", "a", str(folder / "v" / "1.mp4"))
    assert a.notes == {"motion smoothness": "A is smoother"} and b.notes == {}
    assert (b.preferred, b.video_b) == ("b", "s3://bucket/4.mp4")  # URLs are kept as they are


def test_every_problem_names_its_row_and_column(folder: Path):
    rows = [dict(ROWS[0], id="x"), dict(ROWS[1], id="x", preferred="c", rationale=" "),
            dict(ROWS[0], video_b="v/1.mp4", video_a="v/missing.mp4")]
    path = folder / "seed.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises(SeedDataError) as e:
        read_seed_pairs(path)
    text = str(e.value)
    assert "row 2, column 'preferred': 'c' is not a or b" in text
    assert "row 2, column 'rationale': empty" in text
    assert "row 2, column 'id': 'x' already names row 1" in text
    assert "row 3, column 'video_a': no file" in text and "missing.mp4" in text
    assert "4 problem(s)" in text  # row 3's videos are not the same file: no further error


def test_columns_are_checked_before_rows(folder: Path):
    path = folder / "seed.csv"
    pd.DataFrame([{**ROWS[0], "prefered": "a"}]).drop(columns="preferred").to_csv(path, index=False)
    with pytest.raises(SeedDataError, match="column 'preferred' is missing") as e:
        read_seed_pairs(path)
    assert "column 'prefered' is not part of regdpo.critic-seed.v1" in str(e.value)


def test_wrong_file_kind_and_missing_file(folder: Path):
    with pytest.raises(SeedDataError, match=r"\.csv or \.parquet"):
        (folder / "seed.json").write_text("{}")
        read_seed_pairs(folder / "seed.json")
    with pytest.raises(SeedDataError, match="does not exist"):
        read_seed_pairs(folder / "nope.csv")
