"""Dual-IPO's round stages: the `ipo` config, sample (the policy's identity and the round in its
keys, round 2 from round 1's adapter), critique (every chain in the manifest, reproducible from
its seed; a re-run of one round's critique reuses the rest), scored pairs (thresholds on
constructed judgments; re-deciding them never runs the VLM)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from infra.config import ConfigError, load_config
from tests.gt_clips import commit_gt_run


def _round_config(tmp: Path, **ipo) -> dict:
    return {"train": {"model": str(tmp / "wan"), "kind": "t2v", "dtype": "float32"},
            "ipo": {"rounds": 2, **ipo}}


def _write(tmp: Path, data: dict) -> Path:
    import yaml

    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_ipo_config_validates_and_names_keys(tmp_path: Path):
    cfg = load_config(_write(tmp_path, _round_config(
        tmp_path, sample={"samples_per_prompt": 3}, critique={"critic": {"model": "./critic"}})))
    assert cfg.ipo.rounds == 2 and cfg.ipo.sample.samples_per_prompt == 3
    assert cfg.ipo.critique.critic.model == str(tmp_path / "critic")  # resolved like the others
    bad = [({"ipo": {"rounds": 0}, "train": {"kind": "t2v"}}, "ipo.rounds"),
           ({"ipo": {}}, "ipo needs a `train` section"),
           ({"ipo": {"sample": {"samples_per_prompt": 1}}, "train": {"kind": "t2v"}},
            "ipo.sample.samples_per_prompt"),
           ({"ipo": {"critique": {"pairwise": False, "pointwise": False}}, "train": {"kind": "t2v"}},
            "judges nothing"),
           ({"ipo": {}, "train": {"kind": "t2v", "init_adapter": "x"}}, "init_adapter"),
           ({"pairs": {"mode": "scored"}}, "mode 'scored' needs the `scored` section")]
    for data, words in bad:
        with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
            load_config(_write(tmp_path, data))


def test_pairs_settings_of_the_other_modes_are_unchanged():
    """The `scored` slot stays out of the stage key of gt_pair/local/annotated pairs."""
    from infra.config import PairsConfig

    assert PairsConfig().settings() == {"mode": "gt_pair", "annotated": None,
                                        "test_fraction": 0.04, "split_seed": 0}


def _judgment(kind: str, votes: dict, **ids) -> dict:
    from models.critic import tally

    verdicts = [v for v, n in votes.items() for _ in range(n)]
    t = tally([None if v == "abstain" else v for v in verdicts])
    return {"kind": kind, "chains": [], **ids, **t}


def test_scored_rows_apply_vote_share_and_margin():
    from infra.config import ScoredPairsConfig
    from tasks.pairs import scored_rows, verdict_margin

    clips = [{"id": c, "prompt": f"p {c}", "ref_image": f"{c}.png", "video": f"{c}.mp4",
              "bucket": "16:9", "width": 32, "height": 18, "fps": 16, "frames": 17}
             for c in ("g1", "g2")]
    videos = [{"id": f"v{i}", "video": f"s{i}.mp4"} for i in range(3)]
    judgments = [
        _judgment("pair", {"b": 4, "a": 0}, a="v0", b="v1"),             # share 1, margin 1
        _judgment("pair", {"a": 2, "b": 1, "abstain": 1}, a="v0", b="v2"),  # 0.5, 0.25
        _judgment("pair", {"abstain": 4}, a="v1", b="v2"),                # no verdict
        _judgment("point", {"good": 3, "bad": 1}, video_id="v0"),          # 0.75, 0.5
        _judgment("point", {"bad": 2, "good": 2}, video_id="v1"),          # tie
    ]
    assert verdict_margin(judgments[1]) == pytest.approx(0.25)
    crit = [{"gt_id": g, "round": 1, "videos": json.dumps(videos),
             "judgments": json.dumps(judgments)} for g in ("g1", "g2")]
    cfg = ScoredPairsConfig(min_vote_share=0.6, min_margin=0.2)
    rows = scored_rows(clips, crit, {"g1": "train", "g2": "test"}, cfg)
    assert {r["gt_id"] for r in rows} == {"g1"}  # a held-out clip's videos never train
    ok = [r for r in rows if r["status"] == "ok"]
    pairs = [r for r in ok if r["kind"] == "pair"]
    assert [(p["win"], p["lose"]) for p in pairs] == [("s1.mp4", "s0.mp4")]
    assert [(r["video"], r["desirable"]) for r in ok if r["kind"] == "pointwise"] == [("s0.mp4", True)]
    assert [r["video"] for r in ok if r["kind"] == "real"] == ["g1.mp4"]
    reasons = sorted(r["reason"] for r in rows if r["status"] == "rejected")
    assert any("vote share 0.5 < min_vote_share 0.6" in r for r in reasons)
    assert sum("no majority verdict" in r for r in reasons) == 2
    looser = scored_rows(clips, crit, {"g1": "train", "g2": "test"},
                         ScoredPairsConfig(min_vote_share=0.5, min_margin=0.25, real=False))
    assert sum(r["status"] == "ok" and r["kind"] == "pair" for r in looser) == 2
    assert not any(r["kind"] == "real" for r in looser)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    from models.tiny import build_tiny, build_tiny_critic

    root = tmp_path_factory.mktemp("ipo-models")
    return {"wan": build_tiny("t2v", root / "wan"), "critic": build_tiny_critic(root / "critic")}


def _adapter(store, models: dict, key: str) -> str:
    """A round-1 adapter with random (non-zero) LoRA weights, saved as the train stage saves it."""
    import tempfile

    from models.wan import WanSpec, add_lora, load_transformer, lora_parameters, save_lora

    transformer = load_transformer(WanSpec("t2v", models["wan"], "float32"))
    add_lora(transformer, rank=4, alpha=8)
    gen = torch.Generator().manual_seed(3)
    for p in lora_parameters(transformer):
        p.data = torch.randn(p.shape, generator=gen) * 0.5
    with tempfile.TemporaryDirectory() as tmp:
        path = save_lora(transformer, tmp)
        return store.put_file(path, f"{key}/pytorch_lora_weights.safetensors")


def test_round_stages_sample_critique_pairs(prefect_api, models: dict, tmp_path: Path):
    from flows.critique import critique
    from flows.pairs import pairs
    from flows.sample import sample
    from infra.config import CritiqueConfig, PairsConfig, SampleConfig, ScoredPairsConfig, TrainConfig
    from infra.stage import input_manifest, stage_dir
    from infra.store import Store
    from models.critic import chain_seed

    url = f"file://{tmp_path / 'store'}"
    st = Store(url)
    gt = {r["id"]: r for r in commit_gt_run(url, "i", n=2, frames=17, short_edge=32)}
    policy = TrainConfig(model=models["wan"], kind="t2v", dtype="float32")
    scfg = SampleConfig(samples_per_prompt=2, steps=1, short_edge=16, frames=5, device="cpu")
    ccfg = CritiqueConfig(critic={"model": models["critic"], "chains": 2, "max_new_tokens": 6,
                                  "frames": 2, "frame_short_edge": 28})
    pcfg = PairsConfig(mode="scored", test_fraction=0.0, scored=ScoredPairsConfig())

    r1 = sample(run="i", config=scfg, store=url, round=1, policy=policy)
    rows1, _ = input_manifest(st, "i", "sample", "sample.r1")
    assert r1["counts"]["ok"] == 4 and {r["round"] for r in rows1} == {1}
    assert all(r["adapter"] is None for r in rows1)
    assert all((r["width"], r["height"], r["frames"]) == tuple(gt[r["gt_id"]][k] for k in
               ("width", "height", "frames")) for r in rows1)  # renormalized to the GT spec

    assert set(st.read_run("i")["stages"]) == {"normalize", "sample.r1"}

    # A policy with an adapter makes other videos from the same seed and prompt (the
    # adapter's identity in sample's keys: the rounds flow test).
    from tasks.sample import load_policy, sample_video

    adapter = _adapter(st, models, "stages/train/fake-r1/adapter")

    base_pipe = load_policy(st, {"kind": "t2v", "model": models["wan"], "dtype": "float32"}, torch.device("cpu"))
    tuned = load_policy(st, {"kind": "t2v", "model": models["wan"], "dtype": "float32",
                             "adapter": adapter}, torch.device("cpu"))
    a, b = (sample_video(p, "t2v", "a cat", None, 7, (16, 16, 5), scfg) for p in (base_pipe, tuned))
    assert a.shape == b.shape and not (a == b).all()

    # Critique round 1: every chain in the manifest, each reproducible from its recorded seed;
    # plus one held-out human-labelled pair (regdpo.critic-seed.v1) for the critic's accuracy.
    labels = tmp_path / "human"
    labels.mkdir()
    for i, r in enumerate(rows1[:2]):
        (labels / f"v{i}.mp4").write_bytes(st.read_bytes(r["video"]))
    (labels / "labels.csv").write_text("id,prompt,video_a,video_b,preferred,rationale\n"
                                       f"h1,{rows1[0]['prompt']},v0.mp4,v1.mp4,a,sharper\n")
    ccfg = ccfg.model_copy(update={"human_labels": str(labels / "labels.csv")})
    c1 = critique(run="i", config=ccfg, store=url, round=1)
    crit, _ = input_manifest(st, "i", "critique", "critique.r1")
    assert c1["counts"]["ok"] == 3
    human = [r for r in crit if r.get("kind") == "human"]
    assert len(human) == 1 and human[0]["preferred"] == "a"
    assert human[0]["verdict"] is None and human[0]["agrees"] is False  # an abstain is a miss
    assert len(json.loads(human[0]["judgments"])[0]["chains"]) == 4
    crit = [r for r in crit if r.get("kind") != "human"]
    judgments = [j for r in crit for j in json.loads(r["judgments"])]
    assert sorted(j["kind"] for j in judgments) == ["pair", "pair"] + ["point"] * 4
    pair = next(j for j in judgments if j["kind"] == "pair")
    assert [c["order"] for c in pair["chains"]] == ["ab", "ab", "ba", "ba"]
    assert [c["seed"] for c in pair["chains"]] == [chain_seed(pair["seed"], o, i)
                                                     for o in ("ab", "ba") for i in range(2)]
    from models.critic import judgment_inputs, load_critic, pair_messages, sample_chain, video_frames

    critic = load_critic(ccfg.critic)
    videos = {v["id"]: v for r in crit for v in json.loads(r["videos"])}
    frames = []
    for vid in (pair["a"], pair["b"]):
        with st.local_copy(st.key_of(videos[vid]["video"])) as local:
            frames.append(video_frames(local, 2, 28))
    inputs = judgment_inputs(critic, pair_messages(crit[0]["prompt"] if pair in json.loads(
        crit[0]["judgments"]) else crit[1]["prompt"], frames[0], frames[1], ccfg.critic.dimensions))
    assert sample_chain(critic, inputs, pair["chains"][0]["seed"]) == pair["chains"][0]["text"]
    # A random-weight critic abstains on every chain: no verdict, so no pair and no pointwise row.
    assert all(j["verdict"] is None for j in judgments)

    p1 = pairs(run="i", config=pcfg, store=url, round=1)
    prow, _ = input_manifest(st, "i", "pairs", "pairs.r1")
    assert p1["counts"]["ok"] == 2 and {r["kind"] for r in prow if r["status"] == "ok"} == {"real"}
    assert all("no majority verdict" in r["reason"] for r in prow if r["status"] == "rejected")
    # ... so the round cannot train DPO, and says why (flows/ipo.py skips its train).
    from flows.ipo import untrainable
    from flows.precompute import precompute
    from infra.config import PrecomputeConfig, RunConfig

    pre = precompute(run="i", config=PrecomputeConfig(model=models["wan"], kind="t2v",
                                                      dtype="float32", short_edge=16, frames=5),
                     store=url, round=1)
    run_cfg = RunConfig(train=policy.model_dump() | {"loss": {"kind": "dpo", "nll_lambda": 0.1}},
                        ipo={})
    why = untrainable(run_cfg, st, pre, 1)
    assert "of round 1 (" in why and "has 2 real" in why and "needs rows of kind 'pair'" in why

    # Re-deciding a threshold re-runs pairs only; a UI re-run of round 1's critique with its
    # recorded config reuses everything (no row written anywhere).
    rows_before = {p: p.stat().st_mtime_ns for p in (tmp_path / "store").glob("items/*/*/row.json")}
    looser = pcfg.model_copy(update={"scored": ScoredPairsConfig(min_vote_share=0.1, min_margin=0.0)})
    p1b = pairs(run="i", config=looser, store=url, round=1)
    assert p1b["key"] != p1["key"]
    again = critique(run="i", store=url, round=1)  # config from the run index's critique.r1
    assert again["key"] == c1["key"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "store").glob("items/*/*/row.json")} == rows_before
    assert st.read_success(stage_dir("critique", c1["key"]))["computed"] == 3


def test_preflight_names_a_missing_critic_and_policy(tmp_path: Path):
    from flows.preflight import PreflightError, preflight

    cfg = load_config(_write(tmp_path, _round_config(
        tmp_path, critique={"critic": {"model": "./no-critic"}})))
    with pytest.raises(PreflightError) as err:
        preflight(cfg, ["sample", "critique"])
    text = str(err.value)
    assert "ipo.critique.critic.model" in text and "no-critic" in text and "save_pretrained" in text
    assert "train.model (ipo.sample)" in text


def _ipo_config(models: dict, url: str, rounds: int = 2):
    from infra.config import RunConfig

    return RunConfig.model_validate({
        "name": "k", "store": url,
        "pairs": {"test_fraction": 0.34},
        "precompute": {"dtype": "float32", "short_edge": 16, "frames": 5},
        "train": {"model": models["wan"], "kind": "t2v", "dtype": "float32", "steps": 2,
                  "lora": {"rank": 4, "alpha": 8}, "loss": {"kind": "dpo", "nll_lambda": 0.1}},
        "evaluate": {"evaluators": ["proxy"], "generate": {"num_inference_steps": 1,
                                                            "short_edge": 16, "num_frames": 5}},
        "ipo": {"rounds": rounds,
                "sample": {"samples_per_prompt": 2, "steps": 1, "short_edge": 16, "frames": 5,
                           "device": "cpu"},
                "critique": {"critic": {"model": models["critic"], "chains": 2,
                                        "max_new_tokens": 6, "frames": 2,
                                        "frame_short_edge": 28}}}})


def _rows(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.glob("items/*/*/row.json")}


def _constructed_judgments(critic, cfg, prompt, videos, frames):
    """A judge with a known preference (constructed chains, as the vote tests use): the first
    sampled video wins every pair 4-0, and is the only one judged good."""
    from itertools import combinations

    from models.critic import pair_tally, tally

    out = []
    for a, b in combinations(videos, 2):
        chains = [{"order": o, "index": i, "seed": i, "text": "", "verdict": "a"}
                  for o in ("ab", "ba") for i in range(2)]
        out.append({"a": a["id"], "b": b["id"], "kind": "pair", "seed": 0, "chains": chains,
                    **pair_tally(chains)})
    for i, v in enumerate(videos):
        verdict = "good" if i == 0 else "bad"
        chains = [{"order": "point", "index": k, "seed": k, "text": "", "verdict": verdict}
                  for k in range(2)]
        out.append({"video_id": v["id"], "kind": "point", "seed": 0, "chains": chains,
                    **tally([c["verdict"] for c in chains])})
    return out


def test_rounds_train_from_the_previous_adapter_and_a_kill_in_round_2_redoes_nothing(
        prefect_api, models: dict, tmp_path: Path, monkeypatch):
    """Two rounds with verdicts (a constructed judge). A stop is asked for while round 2
    samples (what SIGTERM does); the rerun redoes nothing of round 1 (no row rewritten, every
    round-1 stage a lookup) and finishes round 2, which sampled from round 1's adapter (its
    sha256 in round 2's rows and keys) and trained from it; round 2's evaluate compares the
    base and both rounds on the same prompts and seeds."""
    import threading

    import tasks.critique
    from flows.ipo import ipo
    from infra import shutdown
    from infra.stage import input_manifest, stage_dir
    from infra.store import Store

    monkeypatch.setattr(tasks.critique, "critique_prompt", _constructed_judgments)
    root = tmp_path / "store"
    url = f"file://{root}"
    st = Store(url)
    commit_gt_run(url, "t", n=3, frames=17, short_edge=32)
    cfg = _ipo_config(models, url)

    def stop_in_round_2() -> None:
        while not shutdown.requested():
            if any(json.loads(p.read_text()).get("round") == 2
                   for p in root.glob("items/sample/*/row.json")):
                shutdown.request()
                return
            threading.Event().wait(0.05)

    watcher = threading.Thread(target=stop_in_round_2, daemon=True)
    watcher.start()
    try:
        with pytest.raises(shutdown.ShutdownRequested):
            ipo(run="t", config=cfg, curate=False)
    finally:
        shutdown.request()  # ends the watcher if the run never reached round 2
        watcher.join()
        shutdown.reset()
    index = st.read_run("t")["stages"]
    round1 = {n: e["key"] for n, e in index.items() if n.endswith(".r1")}
    assert set(round1) == {f"{s}.r1" for s in ("sample", "critique", "pairs", "precompute",
                                                 "train", "evaluate")}
    assert "sample.r2" not in index  # killed inside round 2's sample
    successes = {n: (root / stage_dir(n[:-3], k) / "_SUCCESS.json").read_bytes()
                 for n, k in round1.items()}
    rows = _rows(root)
    r2_done = [k for k in rows if k.startswith("items/sample/")
               and json.loads((root / k).read_text())["round"] == 2]
    assert 1 <= len(r2_done) < 6

    results = ipo(run="t", config=cfg, curate=False)
    index = st.read_run("t")["stages"]
    assert {n: index[n]["key"] for n in round1} == round1
    assert {n: (root / stage_dir(n[:-3], k) / "_SUCCESS.json").read_bytes()
            for n, k in round1.items()} == successes  # round 1: lookups, nothing recommitted
    assert {k: v for k, v in _rows(root).items() if k in rows} == rows  # no row redone
    s2 = st.read_success(stage_dir("sample", index["sample.r2"]["key"]))
    assert (s2["reused"], s2["computed"]) == (len(r2_done), 6 - len(r2_done))

    assert results["r1"]["trained"] and results["r2"]["trained"]
    a1 = results["r1"]["adapter"]
    sha1 = hashlib.sha256(st.read_bytes(a1)).hexdigest()
    r1_rows, _ = input_manifest(st, "t", "sample", "sample.r1")
    r2_rows, _ = input_manifest(st, "t", "sample", "sample.r2")
    assert {r["adapter_sha256"] for r in r1_rows} == {None}
    assert {r["adapter_sha256"] for r in r2_rows} == {sha1}
    assert index["train.r1"]["config"]["init_adapter"] is None
    assert index["train.r2"]["config"]["init_adapter"] == a1
    prs, _ = input_manifest(st, "t", "pairs", "pairs.r1")
    assert {r["kind"] for r in prs if r["status"] == "ok" and r["split"] == "train"} == \
        {"pair", "pointwise", "real"}
    videos, _ = input_manifest(st, "t", "evaluate", "evaluate.r2")
    assert {r["model"] for r in videos} == {"base", "r1", "r2"}
    per_model = {m: sorted((r["prompt_id"], r["seed"]) for r in videos if r["model"] == m)
                 for m in ("base", "r1", "r2")}
    assert per_model["base"] == per_model["r1"] == per_model["r2"]  # same prompts and seeds
    ev2 = st.read_success(stage_dir("evaluate", index["evaluate.r2"]["key"]))
    n = len(per_model["base"])  # round 1 made base's and r1's videos; round 2 only r2's
    assert (ev2["reused"], ev2["computed"]) == (2 * n, n)
    from tasks.report import render_report

    text = render_report(st, "t")
    assert "## Dual-IPO rounds" in text and "## Training (train.r2)" in text
    assert "| 2 | 6 | " in text and "stale" not in text and "not committed" not in text
    assert "| r1 |" in text and "| r2 |" in text  # rounds as rows of the evaluation tables


def test_shipped_ipo_configs_load_and_the_real_one_names_its_weights():
    from flows.preflight import PreflightError, preflight

    repo = Path(__file__).resolve().parents[1]
    toy = load_config(repo / "configs" / "toy-ipo.yaml")
    assert toy.ipo.rounds == 2 and toy.train.kind == "t2v"
    assert toy.ipo.critique.critic.model.endswith("toy/models/tiny-critic")
    real = load_config(repo / "configs" / "ipo-wan21-t2v-1.3b.yaml")
    assert real.train.model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    with pytest.raises(PreflightError, match="Qwen/Qwen2.5-VL-7B-Instruct") as err:
        preflight(real, ["critique"])  # the critic is looked up in the HF cache only
    assert "ipo.srpo.seed_data" in str(err.value) and "critic-seed/seed.csv" in str(err.value)
