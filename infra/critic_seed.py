"""The critic's seed data, format regdpo.critic-seed.v1: human-labelled video pairs with CoT
rationales (Dual-IPO starts its critic from ~6,000 of them). One module owns the format: the
columns, the reader and the validator.

A seed file is a CSV (UTF-8, header row) or a Parquet file, one pair per row:

    column                 required  value
    prompt                 yes       the text prompt both videos were generated for
    video_a, video_b       yes       the two videos: paths relative to the seed file's folder,
                                     absolute paths, or URLs (s3://, https://); not the same
    preferred              yes       a or b: the video the human preferred
    rationale              yes       the human's reasoning (free text; the CoT the critic learns)
    prompt_alignment,      no        per-dimension notes (infra.config.critic.CRITIC_DIMENSIONS
    subject_consistency,             with spaces as underscores); empty = no note
    motion_smoothness,
    aesthetic_quality
    id                     no        a unique name for the row; default: its row number

Unknown columns are errors (a typo such as `prefered` would otherwise drop a label). Every error
names the row (1 = the first data row) and the column, and all of them are reported at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from infra.config.critic import CRITIC_DIMENSIONS

SEED_FORMAT = "regdpo.critic-seed.v1"
REQUIRED = ("prompt", "video_a", "video_b", "preferred", "rationale")
NOTES = tuple(d.replace(" ", "_") for d in CRITIC_DIMENSIONS)
OPTIONAL = (*NOTES, "id")
_URL_SCHEMES = ("s3://", "gs://", "http://", "https://", "file://")


class SeedDataError(ValueError):
    """A seed file that does not follow regdpo.critic-seed.v1; the message lists every problem."""


@dataclass(frozen=True)
class SeedPair:
    """One human-labelled pair (videos resolved to absolute paths or URLs)."""

    id: str
    prompt: str
    video_a: str
    video_b: str
    preferred: str  # "a" | "b"
    rationale: str
    notes: dict[str, str] = field(default_factory=dict)  # dimension name (with spaces) -> note


def read_table(path: str | Path) -> pd.DataFrame:
    """The seed file as strings (CSV or Parquet by suffix); empty cells are ''."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    elif suffix in (".parquet", ".pq"):
        table = pd.read_parquet(path)
    else:
        raise SeedDataError(f"seed file {str(path)!r}: a .csv or .parquet file is needed "
                            f"(format {SEED_FORMAT}, infra/critic_seed.py)")
    return table.fillna("").astype(str)


def _video(value: str, root: Path, check_files: bool) -> tuple[str, str | None]:
    if value.startswith(_URL_SCHEMES):
        return value, None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    if check_files and not path.is_file():
        return str(path), f"no file {str(path)!r}"
    return str(path), None


def validate(table: pd.DataFrame, root: Path, check_files: bool = True) -> tuple[list[SeedPair], list[str]]:
    """(pairs, problems): each problem names the row and the column and what to do."""
    problems = [f"column {c!r} is missing (required: {', '.join(REQUIRED)})"
                for c in REQUIRED if c not in table.columns]
    problems += [f"column {c!r} is not part of {SEED_FORMAT} (allowed: "
                 f"{', '.join(REQUIRED + OPTIONAL)})" for c in table.columns
                 if c not in REQUIRED + OPTIONAL]
    if problems:
        return [], problems
    pairs, seen = [], {}
    for i, row in enumerate(table.to_dict("records"), start=1):
        cell = {k: str(v).strip() for k, v in row.items()}
        where = f"row {i}"
        for c in ("prompt", "video_a", "video_b", "rationale"):
            if not cell[c]:
                problems.append(f"{where}, column {c!r}: empty; every pair needs a {c}")
        preferred = cell["preferred"].lower()
        if preferred not in ("a", "b"):
            problems.append(f"{where}, column 'preferred': {cell['preferred']!r} is not a or b")
        videos = {}
        for c in ("video_a", "video_b"):
            if cell[c]:
                videos[c], why = _video(cell[c], root, check_files)
                if why:
                    problems.append(f"{where}, column {c!r}: {why}")
        if videos.get("video_a") and videos.get("video_a") == videos.get("video_b"):
            problems.append(f"{where}, columns 'video_a'/'video_b': the same video twice")
        pair_id = cell.get("id") or str(i)
        if pair_id in seen:
            problems.append(f"{where}, column 'id': {pair_id!r} already names row {seen[pair_id]}")
        seen[pair_id] = i
        notes = {d: cell[n] for d, n in zip(CRITIC_DIMENSIONS, NOTES) if cell.get(n)}
        pairs.append(SeedPair(pair_id, cell["prompt"], videos.get("video_a", ""),
                              videos.get("video_b", ""), preferred, cell["rationale"], notes))
    return pairs, problems


def read_seed_pairs(path: str | Path, check_files: bool = True) -> list[SeedPair]:
    """The seed file's pairs, or SeedDataError listing every problem (row, column, fix)."""
    path = Path(path)
    if not path.is_file():
        raise SeedDataError(f"seed file {str(path)!r} does not exist: write one in format "
                            f"{SEED_FORMAT} (infra/critic_seed.py)")
    pairs, problems = validate(read_table(path), path.parent, check_files)
    if problems:
        raise SeedDataError(f"seed file {str(path)!r} ({SEED_FORMAT}) has {len(problems)} "
                            "problem(s):\n  " + "\n  ".join(problems))
    if not pairs:
        raise SeedDataError(f"seed file {str(path)!r} has no rows: add labelled pairs")
    return pairs
