"""The evaluation report as the paper prints it (Tables 2, 5, 6, 9, 10), and `render_report`, the
text of a whole run (`regdpo report --run NAME`).

Per dimension each method shows its value, ↑/↓/– against Base and its rank points in brackets:
"given n experimental groups, the top-ranked method receives n points, and the lowest-ranked
method receives 1 point"; Total_Score is the sum over the six dimensions (paper Table 2
caption). Ties, worked out from the paper's numbers: tied methods share the points of their
best place and the next method below still counts everyone above it — Table 6, Dyn.Deg.:
0.68200, 0.68200, 0.67200, 0.59400 get [4], [4], [2], [1]; Table 10, Mot.Smooth.: two methods
at 0.98540 both get [6] and the next gets [4]. So points = n − (methods strictly better).
Values are compared at the printed precision (5 decimals), as in the paper, so a table never
shows two equal numbers with different points or marks.

Beside it, VBench's own normalized quality score (VBench scripts/constant.py: each dimension
mapped to [0, 1] by NORMALIZE, weighted by DIM_WEIGHT, weighted mean) over the quality
dimensions that were evaluated. Proxy metrics get the same table under a heading that says
they are proxies, and never a VBench quality score.
"""

from __future__ import annotations

import json
import math
from collections import Counter
import tempfile
from pathlib import Path
from typing import Iterable

from infra.config import BASE, STAGE_CONFIGS
from infra.stage import entry_stage, stage_dir
from infra.store import NotCommittedError, Store

HEADINGS: dict[str, str] = {
    "subject_consistency": "Subj.Cons.", "background_consistency": "Bkgd.Cons.",
    "motion_smoothness": "Mot.Smooth.", "dynamic_degree": "Dyn.Deg.",
    "aesthetic_quality": "Aesth.Qual.", "imaging_quality": "Img.Qual.",
    "temporal_flickering": "Temp.Flick.",
}

# VBench scripts/constant.py: NORMALIZE_DIC (min, max) and DIM_WEIGHT of the quality dimensions.
VBENCH_NORMALIZE: dict[str, tuple[float, float]] = {
    "subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0), "aesthetic_quality": (0.0, 1.0), "imaging_quality": (0.0, 1.0),
}
VBENCH_WEIGHT: dict[str, float] = {d: 1.0 for d in VBENCH_NORMALIZE} | {"dynamic_degree": 0.5}

UP, DOWN, SAME = "↑", "↓", "–"


def rank_points(values: dict[str, float], decimals: int = 5) -> dict[str, int]:
    """Rank points per method: n to the best, 1 to the worst, ties as in the paper's tables
    (points = n − number of methods strictly better at the printed precision)."""
    shown = {m: round(v, decimals) for m, v in values.items()}
    n = len(shown)
    return {m: n - sum(other > v for other in shown.values()) for m, v in shown.items()}


def change_mark(value: float, base: float, decimals: int = 5) -> str:
    """↑ improvement, ↓ degradation, – no change against Base (higher is better everywhere)."""
    v, b = round(value, decimals), round(base, decimals)
    return UP if v > b else DOWN if v < b else SAME


def vbench_quality_score(values: dict[str, float]) -> float | None:
    """VBench's normalized quality score over the quality dimensions present in `values`."""
    dims = [d for d in values if d in VBENCH_NORMALIZE and _finite(values[d])]
    if not dims:
        return None
    total = sum(VBENCH_WEIGHT[d] * _normalized(d, values[d]) for d in dims)
    return total / sum(VBENCH_WEIGHT[d] for d in dims)


def _normalized(dim: str, value: float) -> float:
    lo, hi = VBENCH_NORMALIZE[dim]
    return (value - lo) / (hi - lo)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def build_table(means: dict[str, dict[str, float]], evaluator: str, dimensions: Iterable[str],
                base: str = BASE, decimals: int = 5, videos: dict[str, int] | None = None) -> dict:
    """One evaluation table: per method its values, marks, points, Total_Score (and, for
    VBench, the normalized quality score). `means` maps method -> dimension -> value; a method
    without a value for a dimension is ranked out of that dimension (n counts those with one)."""
    dimensions = list(dimensions)
    methods = list(means)
    if base not in means:
        raise ValueError(f"the report needs the base model's results ({base!r}); got {methods}")
    points: dict[str, dict[str, int]] = {m: {} for m in methods}
    for d in dimensions:
        present = {m: means[m][d] for m in methods if _finite(means[m].get(d))}
        for m, p in rank_points(present, decimals).items():
            points[m][d] = p
    rows = []
    for m in methods:
        values = {d: means[m].get(d) for d in dimensions}
        marks = {d: change_mark(values[d], means[base][d], decimals)
                 for d in dimensions if _finite(values[d]) and _finite(means[base].get(d))}
        row = {"method": m, "values": values, "marks": marks, "points": points[m],
               "total_score": sum(points[m].values()), "videos": (videos or {}).get(m)}
        if evaluator == "vbench":
            row["vbench_quality_score"] = vbench_quality_score(means[m])
        rows.append(row)
    return {"evaluator": evaluator, "dimensions": dimensions, "base": base, "decimals": decimals,
            "rows": rows}


def _title(table: dict) -> str:
    if table["evaluator"] == "vbench":
        return "VBench (custom_input; the paper's metric)"
    return "PROXY metrics (weight-free CPU stand-ins, NOT VBench; for CI and quick looks)"


def _heading(table: dict, dim: str) -> str:
    name = HEADINGS.get(dim, dim)
    return f"{name} (proxy)" if table["evaluator"] == "proxy" else name


def markdown_table(table: dict) -> str:
    """The table in the paper's layout: `value mark [points]`, best in bold, second in italics."""
    dims, dec = table["dimensions"], table["decimals"]
    head = ["Method"] + [_heading(table, d) for d in dims] + ["Total_Score"]
    if table["evaluator"] == "vbench":
        head.append("VBench quality score (normalized)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = {d: sorted({r["points"].get(d, 0) for r in table["rows"]}, reverse=True)
            for d in dims + ["total_score"]}
    for r in table["rows"]:
        cells = [r["method"]]
        for d in dims:
            v = r["values"][d]
            if not _finite(v):
                cells.append("n/a")
                continue
            text = f"{v:.{dec}f} {r['marks'].get(d, '')} [{r['points'][d]}]"
            cells.append(_emphasis(text, r["points"][d], best[d]))
        total = r["total_score"]
        totals = sorted({x["total_score"] for x in table["rows"]}, reverse=True)
        cells.append(_emphasis(str(total), total, totals))
        if table["evaluator"] == "vbench":
            q = r.get("vbench_quality_score")
            cells.append(f"{q:.{dec}f}" if _finite(q) else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _emphasis(text: str, score: float, ranked: list) -> str:
    if len(ranked) > 1 and score == ranked[0]:
        return f"**{text}**"
    if len(ranked) > 2 and score == ranked[1]:
        return f"_{text}_"
    return text


def markdown(report: dict) -> str:
    """The evaluate stage's report.json as markdown (one table per evaluator)."""
    parts = [f"## Evaluation of run `{report.get('run', '?')}`",
             f"{report.get('videos', 0)} videos: {len(report.get('prompts', []))} test prompts × "
             f"{len(report.get('models', []))} models × seeds {report.get('seeds', [])}. "
             f"Marks are against `{BASE}`; [n] are rank points (n to the best, 1 to the worst, "
             "ties share the higher points); Total_Score sums them; bold = best, italics = second."]
    for table in report.get("tables", []):
        parts += [f"### {_title(table)}", markdown_table(table)]
    if report.get("chart"):
        parts.append(f"Bar chart: {report['chart']}")
    return "\n\n".join(parts) + "\n"


def bar_chart(report: dict, path: str | Path) -> Path:
    """Per evaluator: each method's change against Base per dimension (grouped bars of
    value − Base, labelled with the signed delta: absolute bars hide the 1e-4 differences the
    tables show), and the Total_Score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = report["tables"]
    fig, axes = plt.subplots(len(tables), 2, figsize=(13, 3.8 * len(tables)), squeeze=False,
                             gridspec_kw={"width_ratios": [4, 1]})
    for (ax, ax_total), table in zip(axes, tables):
        dims, rows = table["dimensions"], table["rows"]
        base = next(r for r in table["rows"] if r["method"] == table["base"])
        others = [r for r in rows if r is not base]
        width = 0.8 / max(len(others), 1)
        for i, r in enumerate(others):
            xs = [j + i * width for j in range(len(dims))]
            ys = [r["values"][d] - base["values"][d]
                  if _finite(r["values"][d]) and _finite(base["values"][d]) else 0.0 for d in dims]
            bars = ax.bar(xs, ys, width, label=r["method"], color=f"C{rows.index(r)}")
            ax.bar_label(bars, labels=[f"{y:+.{table['decimals']}f}" for y in ys], fontsize=6,
                         rotation=90, padding=2)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.margins(y=0.35)
        ax.set_xticks([j + width * (len(others) - 1) / 2 for j in range(len(dims))])
        ax.set_xticklabels([_heading(table, d) for d in dims], fontsize=8)
        ax.set_ylabel(f"Δ vs {table['base']}", fontsize=8)
        ax.set_title(f"{_title(table)}: change against {table['base']}", fontsize=9)
        if others:
            ax.legend(fontsize=7)
        ax_total.bar([r["method"] for r in rows], [r["total_score"] for r in rows],
                     color=[f"C{i}" for i in range(len(rows))])
        ax_total.set_title("Total_Score" + (" (proxy)" if table["evaluator"] == "proxy" else ""),
                           fontsize=9)
        ax_total.tick_params(axis="x", labelsize=7, rotation=30)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def publish_chart(store: Store, report: dict, key: str) -> str:
    """Draw the chart and put it in the store; returns its URI."""
    with tempfile.TemporaryDirectory(prefix="regdpo-chart-") as tmp:
        return store.put_file(bar_chart(report, Path(tmp) / "chart.png"), key)


# ---------------------------------------------------------------------------------------
# The whole run as text (`regdpo report --run NAME`)
# ---------------------------------------------------------------------------------------

# The DAG's order, Dual-IPO's own stages where a round runs them (before its pairs).
STAGE_ORDER = ("acquire", "filter", "normalize", "negatives", "sample", "critique", "refine",
               "pairs",
               "precompute", "train", "evaluate")
assert set(STAGE_ORDER) == set(STAGE_CONFIGS), "tasks/report.py misses a stage of the DAG"


def stage_notes(store: Store, stages: dict) -> dict[str, str]:
    """What is off with a stage the run index names: not committed, or stale — built from
    another output of an input stage than the one the run now records (e.g. `train` re-run
    alone leaves `evaluate` scoring the previous adapter)."""
    notes: dict[str, str] = {}
    for name, entry in stages.items():
        stage, round = entry_stage(name)
        try:
            inputs = store.read_success(stage_dir(stage, entry["key"])).get("inputs") or {}
        except NotCommittedError:
            notes[name] = f"not committed: re-run {name}"
            continue
        # A round's stage read its inputs from the same round (normalize from outside them).
        mine = {k: f"{k}.r{round}" if round is not None and f"{k}.r{round}" in stages else k
                for k in inputs}
        moved = [mine[k] for k, uri in inputs.items() if mine[k] in stages and isinstance(uri, str)
                 and stages[mine[k]].get("manifest") != uri]
        if moved:
            notes[name] = f"stale: built from an older {', '.join(moved)} output; re-run {name}"
    return notes


def render_report(store: Store, run: str) -> str:
    """Markdown of every committed stage of `run` (counts, manifest) and the evaluation tables."""
    index = store.read_run(run)
    if not index:
        raise LookupError(f"run {run!r} has no runs/{run}/run.json in {store.url}: run "
                          f"`regdpo run CONFIG --run {run}` first (or pass the right --store)")
    stages = index.get("stages", {})
    lines = [f"# Run `{run}`", f"store: {store.url} · updated {index.get('updated_at', '?')}", "",
             "| stage | ok | rejected | failed | manifest | note |", "|---|---|---|---|---|---|"]
    notes = stage_notes(store, stages)
    for name in sorted(stages, key=entry_order):
        counts = stages[name].get("counts") or {}
        note = notes.get(name, "")
        lines.append(f"| {name} | {counts.get('ok', 0)} | {counts.get('rejected', 0)} | "
                     f"{counts.get('failed', 0)} | {stages[name].get('manifest', '')} | {note} |")
    text = "\n".join(lines) + "\n"
    rounds = sorted({r for r in (entry_stage(n)[1] for n in stages) if r is not None})
    if rounds:
        text += "\n" + rounds_section(store, stages, rounds)
    trains = [n for n in sorted(stages, key=entry_order) if entry_stage(n)[0] == "train"]
    for name in trains:
        if name not in notes:
            text += "\n" + training_section(store, stages[name]).replace(
                "## Training", f"## Training ({name})" if name != "train" else "## Training", 1)
    # The evaluation: the run's, or the last round's (every round's adapter as a row).
    evaluate = "evaluate" if "evaluate" in stages else next(
        (f"evaluate.r{r}" for r in reversed(rounds) if f"evaluate.r{r}" in stages), None)
    if evaluate:
        report_key = f"{stage_dir('evaluate', stages[evaluate]['key'])}/report.json"
        try:
            text += "\n" + markdown(store.read_json(report_key))
        except FileNotFoundError:
            text += f"\n(evaluate committed without {report_key})\n"
    return text


def entry_order(name: str) -> tuple:
    """Run-index entries in DAG order, a Dual-IPO round's after the stages outside rounds."""
    stage, round = entry_stage(name)
    return (round or 0, STAGE_ORDER.index(stage) if stage in STAGE_ORDER else 99, name)


def rounds_section(store: Store, stages: dict, rounds: list[int]) -> str:
    """Dual-IPO: per round, the videos sampled, the critic's decided judgments and abstains,
    the training rows kept by kind, whether the round trained (and from which adapter), the
    critic's agreement with the held-out human labels, and its refinement (round 0: the
    fine-tune on the seed pairs)."""
    lines = ["## Dual-IPO rounds", "",
             "| round | videos | judgments decided | chains abstaining | pairs | pointwise | real "
             "| trained | critic vs human labels | critic refined |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        def rows(stage: str) -> list[dict]:
            entry = stages.get(f"{stage}.r{r}")
            if not entry:
                return []
            try:
                return store.read_manifest(stage_dir(stage, entry["key"]))[0].to_pylist()
            except NotCommittedError:
                return []
        crit = [c for c in rows("critique") if c.get("kind") != "human"]
        human = [c for c in rows("critique") if c.get("kind") == "human"]
        accuracy = (f"{sum(bool(h.get('agrees')) for h in human)}/{len(human)} agree"
                    if human else "not measured")
        kept = Counter(p.get("kind") for p in rows("pairs")
                       if p.get("status") == "ok" and p.get("split") == "train")
        train = stages.get(f"train.r{r}")
        trained = "no (no usable rows)" if not train else (
            f"yes, from {train['config'].get('init_adapter') or 'the base'}")
        decided = sum(c.get("n_decided") or 0 for c in crit)
        judged = sum(c.get("n_judgments") or 0 for c in crit)
        abstain = sum(c.get("n_abstain") or 0 for c in crit)
        chains = sum(c.get("n_chains") or 0 for c in crit)
        refined = refine_note(rows("refine"))
        if r == 0:  # the critic's fine-tune on the seed pairs, before round 1
            lines.append(f"| 0 (seed) | | | | | | | | | {refined} |")
            continue
        lines.append(f"| {r} | {stages.get(f'sample.r{r}', {}).get('counts', {}).get('ok', 0)} "
                     f"| {decided}/{judged} | {abstain}/{chains} | {kept.get('pair', 0)} "
                     f"| {kept.get('pointwise', 0)} | {kept.get('real', 0)} | {trained} "
                     f"| {accuracy} | {refined} |")
    return "\n".join(lines) + "\n"


def refine_note(rows: list[dict]) -> str:
    """What a round's refine stage did to the critic, from its manifest rows."""
    adapter = next((r for r in rows if r.get("id") == "adapter"), None)
    if adapter is None:
        return "-"
    examples = [r for r in rows if r.get("id") != "adapter"]
    if not adapter.get("trained"):
        return f"no ({adapter.get('why')})"
    if any(r.get("kind") == "seed" for r in examples):
        return f"fine-tuned on {len(examples)} seed answers"
    return f"yes: {sum(bool(r.get('kept')) for r in examples)}/{len(examples)} pseudo-labels kept"


# The last step's metrics the Training section shows, in this order (a loss logs a subset).
TRAINING_METRICS = ("loss", "dpo_loss", "sft_term", "kto_loss", "nll_term", "region_loss", "dgr",
                    "r", "win_gap", "lose_gap", "s", "implicit_acc", "lr", "grad_norm")


def training_section(store: Store, entry: dict) -> str:
    """The train stage in the report: steps, the adapter, the collapse guard's verdict, the
    Fig. 2 panels and the last step's metrics (from the stage's manifest row and metrics.jsonl)."""
    table, _ = store.read_manifest(stage_dir("train", entry["key"]))
    row = table.to_pylist()[0]
    rows = []
    if row.get("metrics") and store.exists(store.key_of(row["metrics"])):
        rows = [json.loads(line) for line in
                store.read_bytes(store.key_of(row["metrics"])).decode().splitlines() if line.strip()]
    fired = [r for r in rows if r.get("collapse")]
    if fired:
        verdict = (f"**fired** on {len(fired)} step(s), first at step {fired[0]['step']}: the "
                   "paper's collapse signature (DGR → 0 while win_gap and lose_gap both rise); "
                   "consider Reg-DPO (`train.loss.kind: regdpo`, `r: dgr`) or a smaller lr")
    elif rows and any(_finite(r.get("dgr")) for r in rows):
        verdict = "never fired"
    else:
        verdict = "n/a (this loss logs no DGR)"
    lines = ["## Training", "",
             f"- steps: {row.get('steps', len(rows))} ({row.get('skipped', 0)} skipped: non-finite)",
             f"- adapter (diffusers `load_lora_weights`): {store.uri(store.key_of(row['adapter']))}",
             f"- collapse guard: {verdict}"]
    if row.get("fig2"):
        lines.append(f"- Fig. 2 panels: {store.uri(store.key_of(row['fig2']))}")
    if row.get("tensorboard"):
        lines.append(f"- TensorBoard: `tensorboard --logdir {store.uri(store.key_of(row['tensorboard']))}`")
    last = rows[-1] if rows else {}
    shown = [(k, last[k]) for k in TRAINING_METRICS if _finite(last.get(k))]
    if shown:
        lines += ["", f"Final metrics (step {last.get('step', '?')}):", "",
                  "| " + " | ".join(k for k, _ in shown) + " |", "|" + "---|" * len(shown),
                  "| " + " | ".join(f"{v:.4g}" for _, v in shown) + " |"]
    return "\n".join(lines) + "\n"
