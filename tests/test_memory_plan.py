"""infra/memory_plan.py: the planner's arithmetic on made-up measurements (no torch)."""

from __future__ import annotations

import pytest

from infra.memory_plan import BudgetTooSmall, Line, MemoryProfile, plan_memory

MiB = 2**20
# 8 blocks; every block stored: 100 MiB + 80 MiB per frame; every block recomputed: 100 MiB +
# 16 MiB per frame, so one stored block costs 8 MiB per frame more than a recomputed one.
PROFILE = MemoryProfile(8, stored=Line(100 * MiB, 80 * MiB), recomputed=Line(100 * MiB, 16 * MiB))


def exact(*args, **kw):
    """The plan without the planner's headroom: the arithmetic below is exact."""
    return plan_memory(*args, headroom=0, **kw)


def test_a_line_through_probe_points() -> None:
    line = Line.through([(1, 180.0), (2, 260.0)])
    assert (line.intercept, line.slope) == pytest.approx((100.0, 80.0))
    assert Line.through([(1, 1.0), (2, 2.0), (3, 3.0)]).at(10) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="two frame counts"):
        Line.through([(2, 1.0), (2, 3.0)])


def test_the_plan_takes_the_fewest_blocks_off_the_device() -> None:
    # F=10: all stored = 900 MiB, all recomputed = 260 MiB, 80 MiB per stored block.
    assert exact(PROFILE, 900 * MiB, 10).recomputed == 0
    plan = exact(PROFILE, 899 * MiB, 10)
    assert plan.recompute == (True,) + (False,) * 7 and plan.offloaded == 0
    plan = exact(PROFILE, 500 * MiB, 10)  # 260 + 3·80 = 500: three blocks stay
    assert plan.recomputed == 5 and plan.peak_bytes == pytest.approx(500 * MiB)
    assert plan.recompute == (True,) * 5 + (False,) * 3  # the first blocks recompute
    assert exact(PROFILE, 260 * MiB, 10).recomputed == 8
    assert "recompute 5/8 blocks" in exact(PROFILE, 500 * MiB, 10).describe()


def test_offload_comes_before_recompute_up_to_what_host_memory_holds() -> None:
    plan = exact(PROFILE, 500 * MiB, 10, offload=True)
    assert (plan.recomputed, plan.offloaded) == (0, 5)
    plan = exact(PROFILE, 500 * MiB, 10, offload=True, host_bytes=2.5 * 80 * MiB)
    assert (plan.recomputed, plan.offloaded) == (3, 2)
    assert plan.recompute == (True,) * 3 + (False,) * 5
    assert plan.offload == (False,) * 3 + (True,) * 2 + (False,) * 3


def test_the_optimizer_state_counts_and_a_budget_too_small_names_the_floor() -> None:
    with_adam = MemoryProfile(8, PROFILE.stored, PROFILE.recomputed, extra=80 * MiB)
    assert exact(with_adam, 500 * MiB, 10).recomputed == 6
    with pytest.raises(BudgetTooSmall, match=r"needs 0\.254 GiB .* every block's activations"):
        exact(PROFILE, 200 * MiB, 10)
    # the default 5% margin on the extrapolated part: 260 + 1.05·(160 + 2·80) = 436 fits 500, 3 blocks do not
    assert plan_memory(PROFILE, 500 * MiB, 10).recomputed == 6
