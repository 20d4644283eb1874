"""experiments/dpo_vs_regdpo.py (Fig. 2 in miniature) end to end at a toy size: the real
trainer twice, one printed line per method computed from its metrics.jsonl, the panels written.
Whether DPO collapses is the experiment's finding at its own setting, not asserted here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(DPO|Reg-DPO): DGR (\S+) -> (\S+), win_gap (\S+), lose_gap (\S+), "
                  r"guard fired (yes|no)$")
WINDOW = 4  # collapse window: the late half the printed means cover is its last 2 steps


def test_fig2_experiment_prints_one_line_per_method_and_writes_both_panels(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "experiments/dpo_vs_regdpo.py", "--quick", "--seeds", "3",
           "--steps", "6", "--pretrain-steps", "2", "--pairs", "4", "--layers", "1",
           "--collapse-window", str(WINDOW), "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    lines = [m for m in map(LINE.match, proc.stdout.splitlines()) if m]
    assert [m[1] for m in lines] == ["DPO", "Reg-DPO"], proc.stdout
    assert re.search(r"^DPO collapsed and Reg-DPO did not in [01] of 1 seed\(s\)$",
                     proc.stdout, re.M), proc.stdout
    seed_dir = tmp_path / "seed3"
    for m in lines:
        rows = [json.loads(ln) for ln in
                (seed_dir / "store" / "runs" / m[1].lower() / "metrics.jsonl").read_text()
                .splitlines()]
        assert len(rows) == 6
        late = rows[-WINDOW // 2:]
        # DGR at step 0 is b/2 = β/4 (s = 0 while the LoRA is the identity): β = 2000.
        assert float(m[2]) == rows[0]["dgr"] == 500.0
        assert float(m[3]) == round(sum(r["dgr"] for r in late) / len(late), 1)
        for got, metric in ((m[4], "win_gap"), (m[5], "lose_gap")):
            assert got == f"{sum(r[metric] for r in late) / len(late):+.1e}"
        # "guard fired" is the trainer's own CollapseGuard, read back from its log.
        assert (m[6] == "yes") == any(r["collapse"] for r in rows)

    for png in ("dpo_fig2.png", "reg-dpo_fig2.png", "dpo_vs_regdpo_fig2.png"):
        assert (seed_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
