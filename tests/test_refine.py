"""The critic's refinement (Dual-IPO's SRPO, the `refine` stage): round 0's answers from the
human seed pairs, pseudo-labels from a round's recorded chains, and the rounds wired so the
critic that judges round r+1 is the one round r refined (its adapter's sha256 in the keys)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from infra.config.critic import CriticConfig
from infra.critic_seed import SeedPair
from models.critic import PAIR_VERDICTS, POINT_VERDICTS, load_critic, parse_verdict
from tasks.critic_refine import batches, pseudo_labels, seed_answer, seed_examples
from tests.gt_clips import commit_gt_run
from tests.test_ipo import _ipo_config, models  # noqa: F401 - the module's fixture

DIMS = ("prompt alignment", "motion smoothness")


def test_seed_answers_parse_and_the_label_flips_with_the_order(models: dict):  # noqa: F811
    critic = load_critic(CriticConfig(model=models["critic"], dimensions=list(DIMS)))
    pair = SeedPair("p1", "a cat", "va.mp4", "vb.mp4", "b", "B moves\nsmoothly; A jitters.",
                    {"motion smoothness": "A jitters"})
    text = seed_answer(pair, DIMS, "B")
    assert text.splitlines() == ["Prompt alignment: B moves smoothly; A jitters.",
                                 "Motion smoothness: A jitters", "Verdict: B"]
    frames = {"va.mp4": [Image.new("RGB", (28, 28), "red")],
              "vb.mp4": [Image.new("RGB", (28, 28), "blue")]}
    examples = seed_examples(critic, [pair], frames.__getitem__)
    assert [e.label for e in examples] == ["seed.p1.ab", "seed.p1.ba", "seed.p1.point_a",
                                           "seed.p1.point_b"]
    said = [critic.tokenizer.decode(e.target, skip_special_tokens=True) for e in examples]
    verdicts = [parse_verdict(t, PAIR_VERDICTS + POINT_VERDICTS, DIMS) for t in said]
    # b preferred: B when shown second (ab), A when shown first (ba); b good, a bad.
    assert verdicts == [("B", ""), ("A", ""), ("bad", ""), ("good", "")]


def test_batches_see_every_example_once_per_pass():
    got = list(batches(5, 2, 5, seed=3))
    assert [len(b) for b in got] == [2] * 5
    flat = [i for b in got for i in b]
    assert sorted(flat[:5]) == [0, 1, 2, 3, 4]  # the first pass: each example once
    assert list(batches(5, 2, 5, seed=3)) == got  # seeded
    assert [len(b) for b in batches(1, 4, 2, 0)] == [1, 1]


def _chains(order_verdicts: dict[str, list[str | None]]) -> list[dict]:
    return [{"order": o, "index": i, "seed": 10 * k + i, "text": f"{o} chain {i}: {v}",
             "verdict": v} for k, (o, vs) in enumerate(order_verdicts.items())
            for i, v in enumerate(vs)]


def test_pseudo_labels_keep_what_rebuilds_the_judgment():
    from models.critic import pair_tally, tally

    pair = _chains({"ab": ["a", "a", "b"], "ba": ["a", None, "a"]})
    point = _chains({"point": ["bad", "good", "good"]})
    row = {"id": "g.r1", "source": "clip.mp4", "prompt": "a cat", "status": "ok",
           "videos": json.dumps([{"id": "v0", "video": "k/v0.mp4"}, {"id": "v1", "video": "k/v1.mp4"}]),
           "judgments": json.dumps([{"kind": "pair", "a": "v0", "b": "v1", "chains": pair,
                                     **pair_tally(pair)},
                                    {"kind": "point", "video_id": "v1", "chains": point,
                                     **tally([c["verdict"] for c in point])}])}
    labels = pseudo_labels([row, {**row, "status": "failed"}, {**row, "kind": "human"}])
    # ab: the b chain dissents from majority a; ba: no dissent (an abstain is neither side);
    # point: the bad chain dissents from good.
    assert [(lb["kind"], lb["order"], lb["shown"], lb["chosen"], lb["rejected"]) for lb in labels] == [
        ("pair", "ab", ["k/v0.mp4", "k/v1.mp4"], "ab chain 0: a", "ab chain 2: b"),
        ("point", "point", ["k/v1.mp4"], "point chain 1: good", "point chain 0: bad")]
    assert len({lb["id"] for lb in labels}) == 2


def _judge_with_dissent(critic, cfg, prompt, videos, frames):
    """A judge with a known, not unanimous, preference: the first video wins each pair 4-2 (a
    dissenting chain in each order), and only it is judged good, 2-1."""
    from itertools import combinations

    from models.critic import pair_tally, tally

    out = []
    for a, b in combinations(videos, 2):
        chains = _chains({"ab": ["a", "a", "b"], "ba": ["a", "b", "a"]})
        out.append({"a": a["id"], "b": b["id"], "kind": "pair", "seed": 0, "chains": chains,
                    **pair_tally(chains)})
    for i, v in enumerate(videos):
        good, bad = ("good", "bad") if i == 0 else ("bad", "good")
        chains = _chains({"point": [good, bad, good]})
        out.append({"video_id": v["id"], "kind": "point", "seed": 0, "chains": chains,
                    **tally([c["verdict"] for c in chains])})
    return out


def _seed_file(tmp: Path, rows: list[dict]) -> Path:
    """A regdpo.critic-seed.v1 CSV over the GT clips of the store (local files)."""
    path = tmp / "seed.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "video_a", "video_b", "preferred", "rationale"])
        w.writeheader()
        for i, (a, b) in enumerate(zip(rows, rows[1:] + rows[:1])):
            w.writerow({"prompt": a["prompt"], "video_a": a["video"], "video_b": b["video"],
                        "preferred": "ab"[i % 2], "rationale": f"video {'ab'[i % 2]} is steadier"})
    return path


def test_rounds_refine_the_critic_that_judges_the_next_round(prefect_api, models: dict,  # noqa: F811
                                                             tmp_path: Path, monkeypatch):
    """Round 0 fine-tunes the critic on the seed pairs; round 1's critique judges with that
    adapter; round 1's refine goes on from it with round 1's own chains (PCE-filtered) and
    round 2's critique judges with the result; the last round does not refine. A re-run of
    round 2's critique from the UI (no adapter given) reuses it; another critic re-keys it."""
    import tasks.critique
    from flows.critique import critique
    from flows.ipo import ipo
    from flows.refine import adapter_sha256
    from infra.stage import input_manifest, stage_dir
    from infra.store import Store

    monkeypatch.setattr(tasks.critique, "critique_prompt", _judge_with_dissent)
    root = tmp_path / "store"
    url = f"file://{root}"
    st = Store(url)
    gt = commit_gt_run(url, "t", n=3, frames=17, short_edge=32)
    seed = _seed_file(tmp_path, [{"prompt": r["prompt"], "video": str(root / r["video"])}
                                 for r in gt])
    cfg = _ipo_config(models, url)
    cfg.ipo.srpo = cfg.ipo.srpo.model_copy(update={
        "seed_data": str(seed), "seed_steps": 2, "steps": 2, "batch": 2, "rank": 4, "alpha": 8,
        "lr": 1e-3, "seed_lr": 1e-3})
    results = ipo(run="t", config=cfg, curate=False)
    index = st.read_run("t")["stages"]
    assert {"refine.r0", "refine.r1"} <= set(index) and "refine.r2" not in index
    r0 = results["r0"]["stages"]["refine"]
    r1 = results["r1"]["stages"]["refine"]
    assert r0["trained"] and r1["trained"] and r0["adapter"] != r1["adapter"]
    assert adapter_sha256(st, r0["adapter"]) != adapter_sha256(st, r1["adapter"])
    crit = {r: input_manifest(st, "t", "critique", f"critique.r{r}")[0] for r in (1, 2)}
    assert {row["critic_adapter"] for row in crit[1]} == {r0["adapter"]}
    assert {row["critic_adapter"] for row in crit[2]} == {r1["adapter"]}
    rows = st.read_manifest(stage_dir("refine", index["refine.r1"]["key"]))[0].to_pylist()
    labels = [r for r in rows if r["id"] != "adapter"]
    # 3 prompts x 2 videos: per prompt one pair (a dissent per order) and two pointwise.
    assert len(labels) == 2 * 2 * len(gt)
    assert all(0 < r["pce"] < 1 for r in labels)
    assert any(r["kept"] for r in labels) and not all(r["kept"] for r in labels)
    assert all(r["kept"] == (r["pce"] > 0.5) for r in labels)
    seed_rows = st.read_manifest(stage_dir("refine", index["refine.r0"]["key"]))[0].to_pylist()
    assert sum(r.get("kind") == "seed" for r in seed_rows) == 4 * len(gt)

    # The UI re-run of round 2's critique: the recorded critic (round 1's refinement), reused.
    again = critique(run="t", store=url, round=2)
    assert again["key"] == index["critique.r2"]["key"]
    base = critique(run="t", store=url, round=2, critic_adapter="none")
    assert base["key"] != index["critique.r2"]["key"]  # another critic, other keys
