"""pairs: preference pairs (win = preferred, lose = rejected) and the train/test split.

- gt_pair (Reg-DPO §3.1): each GT clip wins against each of its generated negatives.
- local (LocalDPO): each GT clip wins against its locally corrupted copy; the mask travels along.
- scored (Dual-IPO): a round's critic verdicts above the vote-share and margin thresholds give
  pairs and pointwise (KTO) rows; the train GT clips give `real` rows for the NLL term.
- annotated (paper A.1's manual pairs): external per-video scores; within one GT clip's
  videos every two with different scores make a pair, the higher one wins; the paper's
  options keep pairs with a score gap >= 1 or >= 2 and a positive score >= 4.

The split is by GT clip (paper A.1: held-out GT videos give only reference frames and prompts
to the test set), decided per clip by a hash so adding clips never moves one across; the
negatives of a test clip never reach training.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import Literal

import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from infra.config import AnnotatedConfig, ScoredPairsConfig
from infra.store import Store, digest, open_url
from infra.video import ProbeError, probe

GT_COLUMNS = ("bucket", "width", "height", "fps", "frames")
Split = Literal["train", "test"]


def _split_hash(clip_id: str, seed: int) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{clip_id}".encode()).digest()[:8], "big") / 2**64


def split_of(clip_id: str, test_fraction: float, seed: int) -> Split:
    """'test' for a fixed pseudo-random `test_fraction` of clips, by a hash of (seed, id): a
    clip's split never depends on the other clips, so a dataset that grows keeps its splits."""
    return "test" if _split_hash(clip_id, seed) < test_fraction else "train"


def split_clips(clip_ids: list[str], test_fraction: float, seed: int) -> dict[str, Split]:
    """split_of for every clip; when a small dataset's draw leaves the test split empty although
    test_fraction > 0, the clip with the lowest hash is held out (never the only clip): the
    evaluate stage always has a held-out clip, and large datasets are never touched by this."""
    split = {c: split_of(c, test_fraction, seed) for c in clip_ids}
    if test_fraction > 0 and len(split) >= 2 and "test" not in split.values():
        split[min(split, key=lambda c: _split_hash(c, seed))] = "test"
    return split


def _pair(clip: dict, pair_id: str, split: Split, **fields) -> dict:
    base = {"id": pair_id, "pair_id": pair_id, "gt_id": clip["id"], "prompt": clip["prompt"],
            "ref_image": clip["ref_image"], "win": None, "lose": None, "mask": None,
            "mask_video": None, "generator": None, "split": split, "status": "ok", "reason": ""}
    return base | {k: clip[k] for k in GT_COLUMNS} | fields


def held_out_rows(clips: list[dict], split: dict[str, Split]) -> list[dict]:
    """One row per held-out clip: its reference frame and prompt, no videos."""
    return [_pair(c, f"{c['id']}.test", "test") for c in clips if split[c["id"]] == "test"]


def negative_pairs(clips: list[dict], negatives: list[dict], split: dict[str, Split]) -> list[dict]:
    """(GT, negative) pairs of the train clips; a failed negative is a rejected row saying so."""
    by_id = {c["id"]: c for c in clips}
    rows = []
    for neg in negatives:
        clip = by_id.get(neg["gt_id"])
        if clip is None or split[clip["id"]] == "test":
            continue  # no longer a GT clip of the run, or held out: never trained on
        if neg["status"] != "ok":
            rows.append(_pair(clip, neg["id"], "train", generator=neg.get("generator"),
                              status="rejected",
                              reason=f"no negative from {neg.get('generator')}: {neg['reason']}"))
            continue
        rows.append(_pair(clip, neg["id"], "train", win=clip["video"], lose=neg["video"],
                          mask=neg.get("mask"), mask_video=neg.get("mask_video"),
                          generator=neg["generator"], seed=neg.get("seed")))
    return rows


# ---------------------------------------------------------------------------------------
# annotated
# ---------------------------------------------------------------------------------------


def read_scores(cfg: AnnotatedConfig) -> list[dict]:
    """The scores table (CSV or Parquet) as rows of (gt, video, score)."""
    with open_url(cfg.scores) as f:
        table = pq.read_table(f) if cfg.scores.lower().endswith(".parquet") else pa_csv.read_csv(f)
    columns = (cfg.gt_column, cfg.video_column, cfg.score_column)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"scores file {cfg.scores} has no column(s) {missing} (it has "
                         f"{table.column_names}); set pairs.annotated.gt_column / video_column "
                         "/ score_column")
    rows = []
    for i, r in enumerate(table.select(list(columns)).to_pylist()):
        try:
            score = float(r[cfg.score_column])
        except (TypeError, ValueError):
            raise ValueError(f"scores file {cfg.scores} row {i + 1}: score "
                             f"{r[cfg.score_column]!r} is not a number") from None
        rows.append({"gt": str(r[cfg.gt_column]), "video": str(r[cfg.video_column]), "score": score})
    return rows


def score_counts(candidates: list[tuple[float, float]]) -> dict[str, int]:
    """The paper's A.1 tally over (win score, gap) of every strict preference."""
    return {"candidates": len(candidates),
            "gap>=1": sum(g >= 1 for _, g in candidates),
            "gap>=2": sum(g >= 2 for _, g in candidates),
            "win>=4": sum(w >= 4 for w, _ in candidates),
            "gap>=2 & win>=4": sum(g >= 2 and w >= 4 for w, g in candidates)}


def annotated_candidates(clips: list[dict], scores: list[dict], cfg: AnnotatedConfig,
                         split: dict[str, Split]) -> tuple[list[dict], dict[str, int]]:
    """Pair rows (win/lose still paths under video_root) and the counts, thresholds applied."""
    by_id = {c["id"]: c for c in clips}
    groups: dict[str, list[dict]] = {}
    for s in scores:
        groups.setdefault(s["gt"], []).append(s)
    rows, tally = [], []
    for gt, videos in groups.items():
        clip = by_id.get(gt)
        if clip is None:
            rows.append({"id": f"{gt}.unknown", "gt_id": gt, "split": None, "status": "rejected",
                         "reason": f"scores name GT clip {gt!r}, which is not an ok clip of the "
                                   "run's normalize stage"})
            continue
        if split[gt] == "test":
            continue
        for a, b in combinations(videos, 2):
            if a["score"] == b["score"]:
                continue  # a tie states no preference
            win, lose = (a, b) if a["score"] > b["score"] else (b, a)
            gap = win["score"] - lose["score"]
            tally.append((win["score"], gap))
            pair_id = f"{gt}.{digest([win['video'], lose['video']], 12)}"
            reason = ""
            if gap < cfg.min_gap:
                reason = f"score gap {gap:g} < min_gap {cfg.min_gap:g}"
            elif cfg.min_win_score is not None and win["score"] < cfg.min_win_score:
                reason = f"positive score {win['score']:g} < min_win_score {cfg.min_win_score:g}"
            rows.append(_pair(clip, pair_id, "train", win=win["video"], lose=lose["video"],
                              generator="annotated", win_score=win["score"],
                              lose_score=lose["score"], status="rejected" if reason else "ok",
                              reason=reason))
    counts = score_counts(tally) | {"kept": sum(r["status"] == "ok" and r.get("win") is not None
                                                for r in rows)}
    return rows, counts


def inside(root: str, name: str) -> Path:
    """The file `name` under `root`; a name that leaves the root (.., absolute, URL) is refused."""
    base = Path(root).resolve()
    if "://" in name or os.path.isabs(name):
        raise ValueError(f"video {name!r} must be a path relative to video_root {root}")
    path = (base / name).resolve()
    if not path.is_relative_to(base):
        raise ValueError(f"video {name!r} leaves video_root {root}")
    return path


def import_video(store: Store, root: str, name: str) -> str:
    """Copy an annotated video into the store (content-addressed) after probing it."""
    path = inside(root, name)
    if not path.is_file():
        raise ValueError(f"video {name!r} not found under video_root {root}")
    try:
        probe(path)
    except ProbeError as e:
        raise ValueError(f"video {name!r}: {e}") from None
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    key = f"items/pairs/annotated/{sha[:32]}{path.suffix.lower()}"
    return key if store.exists(key) else store.put_file(path, key)


def import_pairs(store: Store, rows: list[dict], root: str) -> list[dict]:
    """Kept annotated pairs with their videos in the store; a bad video rejects its pairs."""
    uris: dict[str, str | Exception] = {}
    out = []
    for row in rows:
        if row["status"] != "ok" or row.get("win") is None:
            out.append(row)
            continue
        for name in (row["win"], row["lose"]):
            if name not in uris:
                try:
                    uris[name] = import_video(store, root, name)
                except ValueError as e:
                    uris[name] = e
        bad = [uris[n] for n in (row["win"], row["lose"]) if isinstance(uris[n], Exception)]
        out.append(row | ({"status": "rejected", "reason": str(bad[0])} if bad else
                          {"win": uris[row["win"]], "lose": uris[row["lose"]]}))
    return out


def split_counts(rows: list[dict]) -> dict[str, int]:
    c = Counter((r.get("split"), r["status"]) for r in rows)
    return {f"{split} {status}": n for (split, status), n in sorted(c.items(), key=str)}


# ---------------------------------------------------------------------------------------
# scored (Dual-IPO): the critic's verdicts
# ---------------------------------------------------------------------------------------


def verdict_margin(judgment: dict) -> float:
    """(majority − minority votes) over all chains: the certainty of the preference (abstains
    count in the denominator, as in the vote share)."""
    votes = {k: n for k, n in judgment["votes"].items() if k != "abstain"}
    total = sum(judgment["votes"].values())
    if judgment["verdict"] is None or not total:
        return 0.0
    other = max((n for k, n in votes.items() if k != judgment["verdict"]), default=0)
    return (votes[judgment["verdict"]] - other) / total


def _kept(judgment: dict, cfg: ScoredPairsConfig) -> str:
    """"" when the judgment's majority clears the thresholds, else why not."""
    if judgment["verdict"] is None:
        return f"no majority verdict (votes {judgment['votes']})"
    if judgment["vote_share"] < cfg.min_vote_share:
        return f"vote share {judgment['vote_share']:.3g} < min_vote_share {cfg.min_vote_share:g}"
    if (margin := verdict_margin(judgment)) < cfg.min_margin:
        return f"margin {margin:.3g} < min_margin {cfg.min_margin:g}"
    return ""


def scored_rows(clips: list[dict], critiques: list[dict], split: dict[str, Split],
                cfg: ScoredPairsConfig) -> list[dict]:
    """A Dual-IPO round's training rows from the critique manifest (no VLM runs here):
    a pair (kind `pair`, preferred = win) per pairwise judgment whose majority clears
    min_vote_share and min_margin; a `pointwise` row (desirable = the majority said good) per
    such pointwise judgment; a `real` row per train GT clip (the NLL regulariser's data).
    A judgment that does not clear them is a rejected row saying why. Held-out clips' videos
    never reach training."""
    by_id = {c["id"]: c for c in clips}
    rows = []
    for crit in critiques:
        if crit.get("kind") == "human":
            continue  # the critic's held-out human-label check, not this round's videos
        clip = by_id.get(crit["gt_id"])
        if clip is None or split[clip["id"]] == "test":
            continue
        videos = {v["id"]: v for v in json.loads(crit["videos"])}
        for j in json.loads(crit["judgments"]):
            votes = {"vote_share": j["vote_share"], "margin": verdict_margin(j),
                     "verdict": j["verdict"], "round": crit["round"]}
            reason = _kept(j, cfg)
            if j["kind"] == "pair":
                win, lose = (j["a"], j["b"]) if j["verdict"] != "b" else (j["b"], j["a"])
                rows.append(_pair(clip, f"{j['a']}~{j['b']}", "train", kind="pair", generator="policy",
                                  win=None if reason else videos[win]["video"],
                                  lose=None if reason else videos[lose]["video"],
                                  status="rejected" if reason else "ok", reason=reason, **votes))
            elif cfg.pointwise:
                v = videos[j["video_id"]]
                rows.append(_pair(clip, f"{v['id']}.point", "train", kind="pointwise",
                                  generator="policy", video=None if reason else v["video"],
                                  desirable=None if reason else j["verdict"] == "good",
                                  status="rejected" if reason else "ok", reason=reason, **votes))
    if cfg.real:
        rows += [_pair(c, f"{c['id']}.real", "train", kind="real", video=c["video"],
                       generator="real") for c in clips if split[c["id"]] == "train"]
    return rows
