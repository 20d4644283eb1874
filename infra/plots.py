"""PNG plots of the training log: the Reg-DPO paper's Fig. 2 panels (DGR, r, DGR + r, win_gap,
lose_gap, s, L_dpo against the step), for one run or several overlaid (DPO vs Reg-DPO).

Input rows are the lines of the trainer's `metrics.jsonl` (tasks.train.MetricsLog): dicts with
`step` and the metrics of docs/architecture.md, "Training: losses (exact)". A metric a row lacks, or logged as
null (a skipped non-finite step), leaves a gap in its curve.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, safe in workers and threads
import matplotlib.pyplot as plt  # noqa: E402

# (metric in the log, panel title) in the order of the paper's Fig. 2.
FIG2_PANELS: tuple[tuple[str, str], ...] = (
    ("dgr", "DGR"),
    ("r", "r"),
    ("dgr_plus_r", "DGR + r"),
    ("win_gap", "win_gap  (e_θ^w − e_ref^w)"),
    ("lose_gap", "lose_gap  (e_θ^l − e_ref^l)"),
    ("s", "s = win_gap − lose_gap"),
    ("dpo_loss", "L_dpo"),
)
_COLS = 4


def _series(rows: list[dict], metric: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(row["step"])
            values.append(float(value))
    return steps, values


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: per-step DPO metrics are noisy (one timestep per pair)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _figure(title: str):
    rows_of_axes = math.ceil(len(FIG2_PANELS) / _COLS)
    fig, axes = plt.subplots(rows_of_axes, _COLS, figsize=(4 * _COLS, 3 * rows_of_axes),
                             squeeze=False)
    for ax in axes.flat[len(FIG2_PANELS):]:
        fig.delaxes(ax)  # the grid's spare cell: one axes per panel, no empty frames
    fig.suptitle(title)
    return fig, list(axes.flat[:len(FIG2_PANELS)])


def _save(fig, out_png: str | Path) -> str:
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return str(out_png)


def compare_panels(runs: dict[str, list[dict]], out_png: str | Path,
                   title: str = "Fig. 2 panels") -> str:
    """One PNG with the seven Fig. 2 panels, each run (label -> metrics rows) one colour."""
    fig, axes = _figure(title)
    for ax, (metric, name) in zip(axes, FIG2_PANELS):
        for label, rows in runs.items():
            steps, values = _series(rows, metric)
            window = max(1, len(values) // 30)
            (line,) = ax.plot(steps, values, linewidth=0.6, alpha=0.35 if window > 1 else 1.0)
            if window > 1:  # the raw curve faint, its moving average on top in the same colour
                ax.plot(steps, _smooth(values, window), color=line.get_color(), linewidth=1.5)
            line.set_label(f"{label} (raw; bold: mean of {window})" if window > 1 else label)
        if metric in ("win_gap", "lose_gap", "s"):
            ax.axhline(0.0, color="grey", linewidth=0.5)  # the sign is what Fig. 2 is about
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return _save(fig, out_png)


def fig2_panels(metrics_jsonl_rows: list[dict], out_png: str | Path, title: str) -> str:
    """One PNG with the seven Fig. 2 panels of one run; returns the path."""
    return compare_panels({title: metrics_jsonl_rows}, out_png, title)
