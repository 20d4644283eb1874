"""evaluate flow: test videos for the base model and every adapter (same seeds, GT spec), scored
by VBench and/or proxy metrics, reported as the paper's tables (tasks/report.py).

Each video is an item (flows.stage.StageRun.map): a re-run, or a restart after a kill, reuses every
committed video; the proxy scores are items of their own ("evaluate-proxy", keyed on the video
and the proxy settings), and VBench's results are kept under the digest of what it scored.
The manifest has one row per generated video (id, status, reason, prompt_id, prompt, ref,
model, seed, video, per-video metric columns); report.json and chart.png sit beside it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.dag import STAGES, round_entry
from flows.stage import StageRun, artifact_key, flow_run_name, recorded_config
from infra.config import BASE, EvaluateConfig, NormalizeConfig
from infra.stage import stage_dir
from infra.store import Store, digest
from tasks.evaluate import (
    PROXY_PREFIX, adapter_label, check_vbench, mean_by_model, release_pipeline, run_vbench,
    held_out_prompts,
)
from tasks.report import build_table, markdown, publish_chart

STAGE = STAGES["evaluate"]
PROXY = "evaluate-proxy"  # its rows live under items/evaluate-proxy/; keys use the evaluate code
VBENCH = "evaluate-vbench"


def round_adapters(st: Store, run: str, round: int) -> tuple[list[dict], list[dict]]:
    """Dual-IPO: [{label r<k>, adapter}] of every round up to `round` that trained, and their
    train entries (a round whose critic kept no training rows has none: flows/ipo.py)."""
    stages = (st.read_run(run) or {}).get("stages") or {}
    models, entries = [], []
    for k in range(1, round + 1):
        if entry := stages.get(round_entry("train", k)):
            row = st.read_manifest(stage_dir("train", entry["key"]))[0].to_pylist()[0]
            models.append({"label": f"r{k}", "adapter": row["adapter"]})
            entries.append(entry)
    return models, entries


def models_to_compare(st: Store, run: str, cfg: EvaluateConfig,
                      round: int | None = None) -> tuple[list[dict], dict]:
    """[{label, adapter}] starting with the base, and the train stage entry (or {}); in a
    Dual-IPO round, every round's adapter so far (rounds as rows) and the latest's entry."""
    models = [{"label": BASE, "adapter": None}]
    if round is not None:
        rounds, entries = round_adapters(st, run, round) if cfg.include_trained else ([], [])
        models += rounds
        train = entries[-1] if entries else {}
    else:
        train = ((st.read_run(run) or {}).get("stages") or {}).get("train") or {}
    if round is None and cfg.include_trained and train:
        row = st.read_manifest(stage_dir("train", train["key"]))[0].to_pylist()[0]
        models.append({"label": adapter_label(train.get("config") or {}), "adapter": row["adapter"]})
    for label, uri in cfg.adapters.items():
        if label in {m["label"] for m in models}:
            raise ValueError(f"evaluate.adapters label {label!r} is already taken (the trained "
                             "adapter is labelled by its loss kind); choose another label")
        models.append({"label": label, "adapter": uri})
    return models, train


def base_spec(cfg: EvaluateConfig, train: dict) -> dict:
    """The base model (kind, model, dtype, device): the config's, else the train stage's."""
    tcfg = train.get("config") or {}
    model, kind = cfg.model or tcfg.get("model"), cfg.kind or tcfg.get("kind")
    if not model or not kind:
        raise ValueError("evaluate needs a base model: set evaluate.model and evaluate.kind, or "
                         "run the train stage first (its model is the base)")
    from models.runtime import torch_device

    device = str(torch_device(cfg.generate.device))
    return {"kind": kind, "model": model, "dtype": cfg.generate.dtype or tcfg.get("dtype", "bfloat16"),
            "device": device}


@task(name="vbench", cache_policy=NO_CACHE)
def vbench_scores(store_url: str, rows: list[dict], cfg: EvaluateConfig) -> dict:
    """VBench over the ok videos, once per set of videos and settings (kept in the store)."""
    st = Store(store_url)
    ok = [r for r in rows if r.get("status") == "ok"]
    key = f"items/{VBENCH}/{digest([[r['id'], r['video']] for r in ok] + [cfg.vbench.model_dump()])}/results.json"
    if st.exists(key):
        return st.read_json(key)
    with tempfile.TemporaryDirectory(prefix="regdpo-vbench-") as tmp:
        groups: dict[str, list[dict]] = {}
        for i, r in enumerate(ok):
            local = Path(tmp) / "in" / f"v{i:05d}.mp4"
            local.parent.mkdir(parents=True, exist_ok=True)
            st.get_file(st.key_of(r["video"]), local)
            groups.setdefault(r["model"], []).append({"name": f"v{i:05d}", "path": str(local),
                                                       "prompt": r["prompt"], "id": r["id"]})
        result = run_vbench({m: [{k: v[k] for k in ("name", "path", "prompt")} for v in vs]
                             for m, vs in groups.items()}, cfg.vbench, tmp)
        names = {v["name"]: v["id"] for vs in groups.values() for v in vs}
    for per_model in result["results"].values():
        for d in per_model.values():
            d["videos"] = {names[n]: v for n, v in d["videos"].items()}
    st.write_json(key, result)
    return result


def _merge_vbench(rows: list[dict], result: dict) -> list[dict]:
    per_video = {}
    for per_model in result["results"].values():
        for dim, d in per_model.items():
            for vid, v in d["videos"].items():
                per_video.setdefault(vid, {})[f"vbench_{dim}"] = v
    return [r | per_video.get(r["id"], {}) for r in rows]


def build_report(run: str, rows: list[dict], cfg: EvaluateConfig, models: list[str],
                 tests: list[dict], vbench: dict | None) -> dict:
    """report.json: one table per evaluator, paper layout (tasks.report.build_table)."""
    videos = {m: sum(r.get("model") == m and r.get("status") == "ok" for r in rows) for m in models}
    tables = []
    if vbench is not None:
        means = {m: {d: v["score"] for d, v in vbench["results"].get(m, {}).items()} for m in models}
        tables.append(build_table(means, "vbench", cfg.vbench.dimensions, BASE, cfg.decimals, videos)
                      | {"vbench_version": vbench.get("vbench"), "device": vbench.get("device")})
    if "proxy" in cfg.evaluators:
        dims = [c[len(PROXY_PREFIX):] for c in _proxy_columns(rows)]
        means = mean_by_model(rows, _proxy_columns(rows), models)
        means = {m: {c[len(PROXY_PREFIX):]: v for c, v in means[m].items()} for m in models}
        tables.append(build_table(means, "proxy", dims, BASE, cfg.decimals, videos))
    return {"run": run, "models": models, "prompts": [t["prompt_id"] for t in tests],
            "seeds": cfg.generate.seeds, "videos": sum(videos.values()), "tables": tables}


def _proxy_columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r if k.startswith(PROXY_PREFIX)))


def publish(st: Store, run: str, out: str, report: dict) -> dict:
    """report.json + chart.png in the stage dir, a markdown and a table artifact."""
    report["chart"] = publish_chart(st, report, f"{out}/chart.png")
    st.write_json(f"{out}/report.json", report)
    slug = artifact_key(run, "evaluate")
    create_markdown_artifact(key=slug + "-report", markdown=markdown(report),
                             description=f"evaluation tables of run {run}")
    for table in report["tables"]:
        create_table_artifact(
            key=f"{slug}-{table['evaluator']}",
            table=[{"method": r["method"], "total_score": r["total_score"],
                    **{f"{d} ({table['evaluator']})": r["values"][d] for d in table["dimensions"]},
                    **{f"{d} points": r["points"].get(d) for d in table["dimensions"]}}
                   for r in table["rows"]],
            description=f"{table['evaluator'].upper()} table of run {run}"
                        + (" — proxy metrics, NOT VBench" if table["evaluator"] == "proxy" else ""))
    return report


@flow(name="evaluate", flow_run_name=flow_run_name("evaluate"), log_prints=True)
def evaluate(run: str = "toy", config: EvaluateConfig | None = None,
             store: str = "file://./artifacts",
             overrides: list[str] | None = None, round: int | None = None) -> dict:
    """Generate test videos for base and adapters, score them, report the paper's tables.

    Args:
        run: the run's name (runs/<run>/ in the store); its other stages' outputs are read
            from the run index.
        config: this stage's section; empty = the section the run last used (recorded in
            the run index), not the real-model defaults.
        store: artifact store URL (file://... or s3://bucket/prefix; credentials come from
            the environment).
        overrides: `--set`-style changes applied on top, e.g. ["evaluate.workers=4"];
            validated before any work.
        round: a Dual-IPO round: the base and every round's adapter up to it (rounds as
            rows), on pairs.r<round>'s held-out prompts; records evaluate.r<round>.
    """
    s = StageRun(STAGE, run, config, store, overrides, round=round)
    cfg, st = s.cfg, s.store
    if "vbench" in cfg.evaluators:
        check_vbench(cfg.vbench)  # before any work: env and every weight file
    tests = held_out_prompts(s.rows("pairs", status=None), cfg.generate.max_prompts)
    models, train = models_to_compare(st, run, cfg, round)
    if round is not None and not train:  # no round has trained yet: the base is the run's
        train = {"config": ((st.read_run(run) or {}).get("config") or {}).get("train") or {}}
    spec = base_spec(cfg, train)
    norm = recorded_config(st, run, "normalize", NormalizeConfig)
    # What shapes one video (its seed and prompt are its identity; which seeds and how many
    # prompts a run asks for is not, so adding a seed reuses every video already made).
    from models.runtime import weight_identity  # the weights themselves, not just the name

    gen = cfg.generate.model_dump(exclude={"device", "seeds", "max_prompts"})
    weights = weight_identity(spec["model"], spec["kind"], spec["dtype"], "transformer")
    settings = {"generate": gen, "spec": {k: spec[k] for k in ("kind", "model", "dtype")} | {"weights": weights},
                "normalize": norm.model_dump(exclude={"workers", "caption"})}
    if entry := s.reuse({"config": cfg.model_dump(mode="json", exclude={"workers"}),
                         "settings": settings, "models": models},
                        [train.get("manifest")] if round is None else
                        [e["manifest"] for e in round_adapters(st, run, round)[1]]):
        return entry
    work = []
    for m in models:  # grouped by model: one adapter switch per model
        for t in tests:
            for seed in cfg.generate.seeds:
                vid = f"{t['prompt_id']}-{m['label']}-s{seed}"
                work.append(s.work({"test": t, "model": m, "seed": seed}, settings, vid,
                                   {"id": vid, "source": t["ref"], "test": t, "model": m,
                                    "seed": seed, "spec": spec,
                                    "generate": cfg.generate.model_dump(),
                                    "normalize": norm.model_dump()}))
    try:
        rows = s.map(work, cfg.workers)
    finally:
        release_pipeline()
    rows = [r | {"id": w[2]["id"]} for r, w in zip(rows, work)]
    if "proxy" in cfg.evaluators:
        rows = _with_proxy(s, rows)
    vbench = None
    if "vbench" in cfg.evaluators and any(r.get("status") == "ok" for r in rows):
        vbench = vbench_scores(st.url, rows, cfg)
        rows = _merge_vbench(rows, vbench)
    report = publish(st, run, s.out, build_report(run, rows, cfg, [m["label"] for m in models],
                                                  tests, vbench))
    get_run_logger().info("evaluate:\n%s", markdown(report))
    return s.commit(rows, {"train": train["manifest"]} if train.get("manifest") else {})


def _with_proxy(s: StageRun, rows: list[dict]) -> list[dict]:
    """Proxy metric columns on every ok video (their own items, keyed on the video's bytes)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    proxy = s.cfg.proxy.model_dump()
    work = [s.work({"proxy_of": r["video"], "artifacts": r.get("artifacts")}, proxy, r["id"],
                   {"id": r["id"], "source": r["video"], "video": r["video"], "proxy": proxy})
            for r in ok]
    scored = {r["id"]: x for r, x in zip(ok, s.map(work, s.cfg.workers, fn="tasks.evaluate:proxy_item",
                                                   name=PROXY))}
    out = []
    for r in rows:
        x = scored.get(r["id"])
        if x is None:
            out.append(r)
        elif x.get("status") != "ok":
            out.append(r | {"proxy_reason": x.get("reason", "")})
        else:
            out.append(r | {k: v for k, v in x.items() if k.startswith(PROXY_PREFIX)})
    return out
