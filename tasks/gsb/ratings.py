"""GSB ratings: rating tasks from the evaluate manifest, stored ratings, tallies and the Score.

GSB (paper 001 §4.1 and A.6) compares model A with model B on the same prompt with three
labels: Good (A is better), Same (equivalent), Bad (A is worse), on two aspects: Video Quality
(overall visual appeal and smoothness) and Prompt Following (consistency between the video and
its input: the prompt, and the reference frame for I2V). Tables 1, 3, 4 and 8 report
Good/Same/Bad counts and Score = (Good + Same) / (Same + Bad); Score > 1 means A is better.

Here A is the *candidate* (a trained adapter) and B the *baseline* ("base" by default). Raters
never see which side is which: each page shows the two videos on randomized sides, the rater
judges the left video against the right one, and `candidate_label` maps that answer back
onto candidate-vs-baseline before it is counted.

Ratings are objects `runs/<run>/gsb/ratings/<rating id>.json` in the artifact store, the id a
digest of (task, rater): a rater's first rating of a pair is created atomically under that key
and any later or concurrent one finds it taken, so exactly one is stored however many copies of
a form arrive at once. Nothing overwrites or deletes a rating.

Atomic create: Store.create_bytes (a hard link locally; a conditional PUT on S3, which some
S3-compatible servers such as rclone serve s3 ignore: there one `gsb serve` process must serve
a run).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass

from infra.stage import input_manifest
from infra.store import Store, digest, join_key, safe_part

SCHEMA = "regdpo.gsb.rating.v1"
LABELS = ("good", "same", "bad")
ASPECTS = {
    "video_quality": "Video Quality",
    "prompt_following": "Prompt Following",
}
BASELINE = "base"
_RATER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")

log = logging.getLogger("regdpo.gsb")


class GSBError(LookupError):
    """The run's evaluate manifest cannot produce the requested comparisons."""


@dataclass(frozen=True)
class Comparison:
    """Candidate A vs baseline B, as a row of the paper's GSB tables."""

    candidate: str
    baseline: str

    @property
    def name(self) -> str:
        return f"{self.candidate} vs {self.baseline}"


@dataclass(frozen=True)
class RatingTask:
    """One A/B judgement: the candidate's and the baseline's video for one prompt and seed."""

    id: str
    comparison: Comparison
    prompt_id: str
    seed: int | None
    prompt: str
    candidate: dict  # the candidate's evaluate row
    baseline: dict  # the baseline's evaluate row


# -- the Score -------------------------------------------------------------------------------


def gsb_score(good: int, same: int, bad: int) -> float | None:
    """Score = (Good + Same) / (Same + Bad) (paper §4.1).

    Same + Bad = 0 leaves the paper's ratio undefined: with at least one Good the candidate
    won every judgement and the Score is +inf; with no ratings at all there is no Score (None).
    """
    if same + bad == 0:
        return math.inf if good > 0 else None
    return (good + same) / (same + bad)


def format_score(score: float | None) -> str:
    """Two decimals as in Tables 1, 3, 4, 8; '∞' for an unbeaten candidate, '–' for no ratings."""
    if score is None:
        return "–"
    return "∞" if math.isinf(score) else f"{score:.2f}"


def candidate_label(shown: str, candidate_left: bool) -> str:
    """Un-swap a rater's answer about the LEFT video into the candidate's Good/Same/Bad."""
    if shown not in LABELS:
        raise ValueError(f"GSB answer {shown!r} is not one of {', '.join(LABELS)}")
    if candidate_left or shown == "same":
        return shown
    return "bad" if shown == "good" else "good"


def check_rater(rater: str) -> str:
    if not isinstance(rater, str) or not _RATER.match(rater):
        raise ValueError(
            f"rater id {rater!r} is not usable: 1-64 letters, digits or . _ @ - (starting with a "
            "letter or digit), e.g. 'alice' or 'rater-07'"
        )
    return rater


# -- rating tasks from the evaluate manifest -------------------------------------------------


def evaluate_rows(store: Store, run: str) -> list[dict]:
    """The ok rows (one per generated video) of the run's committed evaluate manifest."""
    try:
        rows, _ = input_manifest(store, run, "evaluate")
    except LookupError as e:
        raise GSBError(str(e)) from None
    return sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: str(r["id"]))


def comparisons(rows: list[dict], pairs: list[str] | None = None) -> list[Comparison]:
    """`pairs` as 'A,B' strings; default: every model other than the baseline vs the baseline."""
    models = sorted({str(r["model"]) for r in rows})
    if pairs:
        comps = [_parse_pair(p) for p in pairs]
    elif BASELINE in models:
        comps = [Comparison(m, BASELINE) for m in models if m != BASELINE]
    else:
        raise GSBError(f"no {BASELINE!r} videos in the evaluate manifest (models: {models}); "
                       "choose the comparison with --pair CANDIDATE,BASELINE")
    for c in comps:
        missing = [m for m in (c.candidate, c.baseline) if m not in models]
        if missing:
            raise GSBError(f"comparison {c.name!r}: no ok videos for {missing} in the evaluate "
                           f"manifest; models there: {models}")
    if not comps:
        raise GSBError(f"nothing to compare: the evaluate manifest only has {models}")
    return comps


def _parse_pair(pair: str) -> Comparison:
    parts = [p.strip() for p in pair.split(",")]
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise GSBError(f"--pair {pair!r} must be two different model labels CANDIDATE,BASELINE, "
                       "e.g. reg-dpo,base")
    return Comparison(parts[0], parts[1])


def rating_tasks(rows: list[dict], comps: list[Comparison]) -> list[RatingTask]:
    """A task per comparison and (prompt_id, seed) that both models rendered.

    Evaluate renders every model with the same seeds, so (prompt_id, seed) pairs the videos
    that differ only by the model. The task id digests both row ids and video URIs: a
    re-rendered video is a new task, and ratings of videos no longer in the manifest stop
    counting."""
    by_model: dict[str, dict[tuple, dict]] = {}
    for r in rows:
        by_model.setdefault(str(r["model"]), {}).setdefault((str(r["prompt_id"]), r.get("seed")), r)
    tasks = []
    for c in comps:
        cand, base = by_model[c.candidate], by_model[c.baseline]
        for key in sorted(cand.keys() & base.keys(), key=str):
            a, b = cand[key], base[key]
            # The videos' URIs too: row ids repeat when a stage is re-run (a new adapter under the
            # same label), the URIs (under content-keyed item dirs) do not.
            tid = digest([a["id"], b["id"], a.get("video"), b.get("video")], 16)
            tasks.append(RatingTask(tid, c, key[0], key[1],
                                    str(a.get("prompt") or ""), a, b))
        if not cand.keys() & base.keys():
            raise GSBError(f"comparison {c.name!r}: no prompt_id/seed rendered by both models")
    return tasks


# -- stored ratings ---------------------------------------------------------------------------


def ratings_prefix(run: str) -> str:
    return join_key("runs", run, "gsb", "ratings")


def rating_id(task: RatingTask, rater: str) -> str:
    """One id per (task, rater): the key a rater's first rating of the pair is created under."""
    return digest({"task": task.id, "rater": check_rater(rater)}, 24)


def new_rating(run: str, task: RatingTask, rater: str, candidate_left: bool,
               shown: dict[str, str]) -> dict:
    """The stored record: what the rater saw (sides, answers about the left video) and the
    un-swapped candidate-vs-baseline labels that the tallies count."""
    left, right = (task.candidate, task.baseline) if candidate_left else (task.baseline, task.candidate)
    return {
        "schema": SCHEMA, "id": rating_id(task, rater),
        "run": run, "task": task.id, "rater": rater,
        "candidate": task.comparison.candidate, "baseline": task.comparison.baseline,
        "prompt_id": task.prompt_id, "seed": task.seed,
        "left": {"model": left["model"], "video": left["id"]},
        "right": {"model": right["model"], "video": right["id"]},
        "shown": {a: shown[a] for a in ASPECTS},  # left video relative to the right one
        "labels": {a: candidate_label(shown[a], candidate_left) for a in ASPECTS},
        "rated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def is_rating(obj) -> bool:
    """Whether a stored object has what `counted` and `tally` read."""
    return (isinstance(obj, dict) and all(isinstance(obj.get(k), str) for k in ("id", "task", "rater", "rated_at"))
            and isinstance(obj.get("labels"), dict) and all(obj["labels"].get(a) in LABELS for a in ASPECTS))


class RatingLog:
    """The run's stored ratings, read incrementally (each object once) and created one by one."""

    def __init__(self, store: Store, run: str):
        self.store, self.run = store, run
        self._ratings: dict[str, dict] = {}
        self.unreadable: set[str] = set()  # listed keys that are not ratings
        self._lock = threading.Lock()

    def refresh(self) -> list[dict]:
        """All ratings in the store, including ones other servers wrote. An object that is not
        a rating (truncated, hand-edited, foreign) is skipped and logged once; it is re-read on
        every refresh, so a repaired file counts from then on."""
        prefix = ratings_prefix(self.run)
        keys = [k for k in self.store.list(prefix) if k.endswith(".json")]
        for key in keys:
            if key not in self._ratings:
                self._read(key)
        with self._lock:
            self.unreadable &= set(keys)
            return list(self._ratings.values())

    def _read(self, key: str) -> None:
        try:
            rating = self.store.read_json(key)
        except FileNotFoundError:
            return  # removed since the listing
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            rating, why = None, f"not JSON ({e})"
        else:
            why = "not a GSB rating (needs id, task, rater, rated_at and Good/Same/Bad labels)"
        with self._lock:
            if is_rating(rating):
                self._ratings[key] = rating
                self.unreadable.discard(key)
            elif key not in self.unreadable:
                self.unreadable.add(key)
                log.warning("skipping unreadable GSB rating %s: %s", self.store.uri(key), why)

    def create(self, rating: dict) -> bool:
        """Store a rating under its own id; False (nothing written) when that id is taken,
        i.e. this rater already rated this pair."""
        key = f"{ratings_prefix(self.run)}/{safe_part(rating['id'])}.json"
        data = json.dumps(rating, indent=2, sort_keys=True, default=str).encode()
        created = self.store.create_bytes(key, data)
        if created:
            with self._lock:
                self._ratings[key] = rating
        return created


def counted(ratings: list[dict], tasks: list[RatingTask]) -> list[dict]:
    """The ratings that count: of a current task, the first one per (rater, task)."""
    current = {t.id for t in tasks}
    first: dict[tuple[str, str], dict] = {}
    for r in sorted(ratings, key=lambda r: (r["rated_at"], r["id"])):
        if r["task"] in current:
            first.setdefault((r["rater"], r["task"]), r)
    return list(first.values())


def tally(ratings: list[dict], tasks: list[RatingTask], comps: list[Comparison]) -> list[dict]:
    """Per comparison and aspect: Good/Same/Bad counts and the Score, as in Tables 1, 3, 4, 8."""
    task_comp = {t.id: t.comparison for t in tasks}
    counts = {c: {a: Counter() for a in ASPECTS} for c in comps}
    raters: dict[Comparison, set] = {c: set() for c in comps}
    for r in counted(ratings, tasks):
        comp = task_comp[r["task"]]
        raters[comp].add(r["rater"])
        for aspect in ASPECTS:
            counts[comp][aspect][r["labels"][aspect]] += 1
    out = []
    for c in comps:
        row = {"comparison": c.name, "candidate": c.candidate, "baseline": c.baseline,
               "tasks": sum(1 for t in tasks if t.comparison == c), "raters": len(raters[c])}
        for aspect in ASPECTS:
            g, s, b = (counts[c][aspect][label] for label in LABELS)
            row[aspect] = {"good": g, "same": s, "bad": b, "score": gsb_score(g, s, b)}
        row["ratings"] = sum(row["video_quality"][k] for k in LABELS)
        out.append(row)
    return out


def run_tally(store: Store, run: str, pairs: list[str] | None = None) -> list[dict]:
    """The GSB table of a run from its evaluate manifest and stored ratings."""
    rows = evaluate_rows(store, run)
    comps = comparisons(rows, pairs)
    return tally(RatingLog(store, run).refresh(), rating_tasks(rows, comps), comps)


def markdown_table(rows: list[dict]) -> str:
    """The tally in the layout of the paper's GSB tables (VQ and PF as Good/Same/Bad)."""
    lines = ["| Comparison (A vs B) | Ratings | VQ | VQ Score | PF | PF Score |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[a]['good']}/{r[a]['same']}/{r[a]['bad']} | {format_score(r[a]['score'])}" for a in ASPECTS]
        lines.append(f"| {r['comparison']} | {r['ratings']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
