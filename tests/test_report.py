"""The report reproduces the paper's VBench tables (Reg-DPO paper, Tables 2, 5, 6, 9, 10): from
the printed values it recomputes every rank point, every ↑/↓/– mark and the Total_Score column."""

from __future__ import annotations

import json

import pytest

from infra.stage import stage_dir
from infra.store import Store
from infra.config import BASE, DIMENSIONS
from tasks.report import (
    bar_chart, build_table, markdown, rank_points, render_report,
    vbench_quality_score,
)

# Transcribed from the paper text: method -> six values (Subj.Cons., Bkgd.Cons., Mot.Smooth.,
# Dyn.Deg., Aesth.Qual., Img.Qual.), the printed marks, the printed points, the Total_Score.
TABLE_2 = {
    "Base": ([0.93251, 0.93287, 0.98586, 0.52121, 0.54445, 0.74797], "------", [3, 3, 3, 1, 3, 1], 14),
    "GT-Pair": ([0.93108, 0.93195, 0.98651, 0.56768, 0.54580, 0.75182], "vv^^^^", [2, 1, 4, 4, 4, 4], 19),
    "Annotated_Pair": ([0.92937, 0.93276, 0.98479, 0.54595, 0.54217, 0.74872], "vvv^v^", [1, 2, 2, 2, 1, 2], 10),
    "GT+Annotated": ([0.93311, 0.93453, 0.98409, 0.55758, 0.54439, 0.75033], "^^v^v^", [4, 4, 1, 3, 2, 3], 17),
}
TABLE_5 = {
    "Base": ([0.93251, 0.93287, 0.98586, 0.52121, 0.54445, 0.74797], "------", [2, 2, 2, 2, 2, 2], 12),
    "SFT": ([0.93749, 0.93752, 0.98375, 0.46869, 0.54427, 0.74728], "^^vvvv", [4, 4, 1, 1, 1, 1], 12),
    "DPO": ([0.93108, 0.93195, 0.98651, 0.56768, 0.54580, 0.75182], "vv^^^^", [1, 1, 3, 4, 3, 3], 15),
    "Reg-DPO": ([0.93496, 0.93380, 0.98665, 0.54343, 0.54963, 0.75758], "^^^^^^", [3, 3, 4, 3, 4, 4], 21),
}
TABLE_6 = {
    "Base": ([0.93159, 0.93246, 0.98540, 0.68200, 0.55419, 0.72488], "------", [2, 1, 2, 4, 1, 4], 14),
    "SFT": ([0.93052, 0.93791, 0.98802, 0.59400, 0.55810, 0.72031], "v^^v^v", [1, 4, 4, 1, 3, 1], 14),
    "DPO": ([0.93280, 0.93289, 0.98530, 0.68200, 0.55600, 0.72357], "^^v-^v", [3, 2, 1, 4, 2, 3], 15),
    "Reg-DPO": ([0.93876, 0.93420, 0.98560, 0.67200, 0.55970, 0.72054], "^^^v^v", [4, 3, 3, 2, 4, 2], 18),
}
TABLE_9 = {
    "Base": ([0.96681, 0.95955, 0.98919, 0.34200, 0.56288, 0.67584], "------", [4, 4, 4, 1, 1, 1], 15),
    "SFT": ([0.96515, 0.95442, 0.98837, 0.40800, 0.57484, 0.70004], "vvv^^^", [3, 3, 2, 3, 2, 2], 15),
    "DPO": ([0.95843, 0.94580, 0.98831, 0.49600, 0.58979, 0.72111], "vvv^^^", [1, 1, 1, 4, 4, 3], 14),
    "Reg-DPO": ([0.96211, 0.94846, 0.98905, 0.40600, 0.58651, 0.72828], "vvv^^^", [2, 2, 3, 2, 3, 4], 16),
}
TABLE_10 = {
    "Base": ([0.93159, 0.93246, 0.98540, 0.68200, 0.55419, 0.72488], "------", [1, 1, 6, 9, 2, 11], 30),
    "DPO": ([0.93280, 0.93289, 0.98530, 0.68200, 0.55600, 0.72357], "^^v-^v", [2, 2, 4, 9, 3, 10], 30),
    "r = 25": ([0.93288, 0.93410, 0.98540, 0.68600, 0.55221, 0.71085], "^^-^vv", [3, 5, 6, 10, 1, 2], 27),
    "r = 50": ([0.93654, 0.93721, 0.98516, 0.67400, 0.55691, 0.71044], "^^vv^v", [5, 11, 3, 6, 4, 1], 30),
    "r = 125": ([0.93749, 0.93469, 0.98578, 0.63200, 0.56268, 0.72019], "^^^v^v", [8, 10, 8, 2, 11, 5], 44),
    "r = 300": ([0.93702, 0.93321, 0.98666, 0.66800, 0.56089, 0.71956], "^^^v^v", [7, 3, 11, 4, 10, 4], 39),
    "r = 500": ([0.93902, 0.93420, 0.98628, 0.62200, 0.55900, 0.72243], "^^^v^v", [11, 9, 10, 1, 5, 9], 45),
    "r = DGR/5": ([0.93499, 0.93416, 0.98497, 0.68000, 0.56035, 0.72187], "^^vv^v", [4, 7, 1, 7, 8, 8], 35),
    "r = DGR/2": ([0.93659, 0.93416, 0.98508, 0.69800, 0.56072, 0.71834], "^^v^^v", [6, 7, 2, 11, 9, 3], 38),
    "r = DGR": ([0.93876, 0.93420, 0.98560, 0.67200, 0.55970, 0.72054], "^^^v^v", [10, 9, 7, 5, 6, 6], 43),
    "r = DGR x 2": ([0.93848, 0.93336, 0.98608, 0.65800, 0.56030, 0.72154], "^^^v^v", [9, 4, 9, 3, 7, 7], 39),
}
MARKS = {"^": "↑", "v": "↓", "-": "–"}


@pytest.mark.parametrize("name,paper", [("Table 2", TABLE_2), ("Table 5", TABLE_5),
                                        ("Table 6", TABLE_6), ("Table 9", TABLE_9),
                                        ("Table 10", TABLE_10)])
def test_paper_tables_total_score_points_and_marks(name, paper):
    means = {(BASE if m == "Base" else m): dict(zip(DIMENSIONS, v)) for m, (v, _, _, _) in paper.items()}
    table = build_table(means, "vbench", DIMENSIONS)
    got = {r["method"]: r for r in table["rows"]}
    for method, (_, marks, points, total) in paper.items():
        row = got[BASE if method == "Base" else method]
        assert row["total_score"] == total, f"{name} {method}"
        assert [row["points"][d] for d in DIMENSIONS] == points, f"{name} {method}"
        assert "".join(row["marks"][d] for d in DIMENSIONS) == "".join(MARKS[c] for c in marks)


def test_ties_share_the_higher_points_and_the_next_counts_everyone_above():
    # Table 6, Dyn.Deg.: 0.682 (Base), 0.682 (DPO), 0.672 (Reg-DPO), 0.594 (SFT).
    assert rank_points({"a": 0.682, "b": 0.682, "c": 0.672, "d": 0.594}) == {"a": 4, "b": 4, "c": 2, "d": 1}
    # Equal at the printed precision is a tie; beyond it is not.
    assert rank_points({"a": 0.5000001, "b": 0.5}) == {"a": 2, "b": 2}
    assert rank_points({"a": 0.50001, "b": 0.5}) == {"a": 2, "b": 1}


def test_vbench_quality_score_is_vbench_normalized_weighted_mean():
    values = {"subject_consistency": 1.0, "motion_smoothness": 0.706, "dynamic_degree": 1.0}
    # (1 * 1.0 + 1 * 0.0 + 0.5 * 1.0) / 2.5
    assert vbench_quality_score(values) == pytest.approx(0.6)
    assert vbench_quality_score({"proxy_only": 1.0}) is None


def test_report_markdown_labels_proxies_and_draws_a_chart(tmp_path):
    means = {BASE: {d: 0.5 for d in DIMENSIONS}, "regdpo": {d: 0.6 for d in DIMENSIONS}}
    proxy = build_table(means, "proxy", DIMENSIONS)
    vbench = build_table(means, "vbench", DIMENSIONS)
    report = {"run": "r", "tables": [vbench, proxy], "models": [BASE, "regdpo"], "prompts": ["p"],
              "seeds": [0], "videos": 2}
    text = markdown(report)
    assert "PROXY metrics" in text and "NOT VBench" in text and "Subj.Cons. (proxy)" in text
    assert "**0.60000 ↑ [2]**" in text and "0.50000 – [1]" in text and "**12**" in text
    assert "VBench quality score" in text
    assert "vbench_quality_score" not in proxy["rows"][0]  # a proxy never gets VBench's score
    png = bar_chart(report, tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_the_chart_draws_each_dimension_as_its_change_against_base(tmp_path, monkeypatch):
    import matplotlib.figure

    figures = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (figures.append(fig), real_savefig(fig, *a, **k)))
    means = {BASE: {d: 0.5 for d in DIMENSIONS},
             "regdpo": {d: 0.5 + 1e-4 * (i + 1) for i, d in enumerate(DIMENSIONS)},
             "dpo": {d: 0.5 - 2e-4 for d in DIMENSIONS}}
    bar_chart({"tables": [build_table(means, "proxy", DIMENSIONS)]}, tmp_path / "chart.png")
    [fig] = figures
    ax = fig.axes[0]  # the dimensions; fig.axes[1] is the Total_Score
    heights = [round(bar.get_height(), 8) for bar in ax.patches]
    assert heights == [round(1e-4 * (i + 1), 8) for i in range(len(DIMENSIONS))] + \
        [-2e-4] * len(DIMENSIONS)  # one bar per dimension per method but Base, its delta
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["regdpo", "dpo"]
    assert "+0.00010" in [t.get_text() for t in ax.texts]


def test_render_report_lists_stages_and_the_evaluation(tmp_path):
    store = Store(f"file://{tmp_path}")
    means = {BASE: {d: 0.5 for d in DIMENSIONS}, "regdpo": {d: 0.4 for d in DIMENSIONS}}
    report = {"run": "r", "tables": [build_table(means, "proxy", DIMENSIONS)], "models": list(means),
              "prompts": ["p"], "seeds": [0], "videos": 2}
    store.write_json(f"{stage_dir('evaluate', 'k1')}/report.json", report)
    store.update_run("r", "normalize", {"key": "k0", "manifest": "m0", "counts": {"ok": 3, "rejected": 1}})
    store.update_run("r", "evaluate", {"key": "k1", "manifest": "m1", "counts": {"ok": 2}})
    text = render_report(store, "r")
    assert "| normalize | 3 | 1 | 0 | m0 |" in text and "| evaluate | 2 | 0 | 0 | m1 |" in text
    assert text.index("normalize") < text.index("| evaluate")
    assert "0.40000 ↓ [1]" in text and "PROXY metrics" in text
    with pytest.raises(LookupError, match="regdpo run"):
        render_report(store, "missing")
    json.dumps(report)  # report.json stays plain JSON
