"""What a study adds once its plan is done, on fixed numbers (no training): grid steps past an
edge choice (`sweep.lr_extend`) and the auto-seed stopping rule (`sweep.seeds=auto`)."""

from __future__ import annotations

import pytest

from lora_lab.pipeline.plan import AUTO_FIRST_SEEDS
from lora_lab.pipeline.rounds import grid_extensions, next_learning_rate, seed_round
from lora_lab.report.selection import chosen_learning_rates, config_keys
from lora_lab.report.verdict import MIN_SEEDS
from tests.report.test_report_selection import full, lora, table

# Tolerance 1 point. The full finetune: mean 0.900, s = 0.001 (three seeds).
FULL = [0.900, 0.901, 0.899]
TIGHT = [0.899, 0.900, 0.898]  # gap 0.1 point, upper bound ≈ 0.27 point: a settled pass
FAR = [0.800, 0.801, 0.799]  # gap 10 points, lower bound ≈ 9.8 points: a settled fail
NOISY = [0.90, 0.85, 0.95]  # se ≈ 2.9 points: the interval holds the tolerance, unsettled


def study(ranks: dict[int, list[float]], baseline: list[float] = FULL):
    rows = [
        lora(r, 0.001, s, val=0.5, test=t) for r, accs in ranks.items() for s, t in enumerate(accs)
    ]
    return table(rows + [full(0.001, s, val=0.5, test=t) for s, t in enumerate(baseline)])


def test_auto_starts_with_as_many_seeds_as_a_verdict_tests():
    assert AUTO_FIRST_SEEDS == MIN_SEEDS


def test_a_settled_pass_and_a_settled_fail_stop_the_rounds():
    decision = seed_round(study({16: TIGHT, 8: FAR, 4: NOISY}), 0.01, [0, 1, 2], max_seeds=10)
    assert decision.waiting == () and decision.next_seed is None  # r=4 waits behind r=8's fail
    assert decision.line() == "auto seeds: every tested rank is settled after 3 seeds"


def test_unsettled_ranks_get_another_seed():
    decision = seed_round(study({32: NOISY, 16: NOISY, 8: FAR}), 0.01, [0, 1, 2], max_seeds=10)
    assert decision.waiting == (("default", 16), ("default", 32))
    assert decision.next_seed == 3
    assert decision.line() == "auto seeds: r=16 and r=32 unsettled after 3 seeds; adding seed 3"


def test_the_rounds_stop_at_max_seeds():
    decision = seed_round(study({16: NOISY}), 0.01, [0, 1, 2, 3], max_seeds=4)
    assert decision.waiting == (("default", 16),) and decision.next_seed is None
    assert "still unsettled after 4 seeds, the bound (report.max_seeds=4)" in decision.line()


def test_no_full_finetune_no_seed():
    frame = table([lora(4, 0.001, s, val=0.5, test=0.9) for s in range(3)])
    decision = seed_round(frame, 0.01, [0, 1, 2], max_seeds=10)
    assert decision.next_seed is None and not decision.compared


@pytest.mark.parametrize(
    ("grid", "top", "expected"),
    [
        ([3e-3, 1e-2, 3e-2], True, 0.1),  # 3e-2 · 3 = 9e-2, rounded to 1e-1
        ([3e-3, 1e-2, 3e-2], False, 1e-3),  # 3e-3 / 3.33 = 9e-4 → 1e-3
        ([1e-3, 3e-3, 1e-2], False, 3e-4),  # 1e-3 / 3 = 3.3e-4 → 3e-4
        ([1e-3, 2e-3], True, 4e-3),  # a ratio of 2 stays 2
        ([1e-3, 1.1e-3], False, 9.09e-4),  # rounding would land on the edge: unrounded
    ],
)
def test_the_next_learning_rate_steps_at_the_grids_own_ratio(grid, top, expected):
    assert next_learning_rate(grid, top) == pytest.approx(expected)


def edge_study():
    """r=4 is best at its grid's top (1e-2), r=8 inside it (3e-3) over [1e-3, 3e-3, 1e-2]."""
    val = {4: {1e-3: 0.5, 3e-3: 0.6, 1e-2: 0.7}, 8: {1e-3: 0.5, 3e-3: 0.7, 1e-2: 0.6}}
    rows = [lora(r, lr, s, val=v, test=v) for r, by_lr in val.items() for lr, v in by_lr.items()
            for s in range(2)]  # fmt: skip
    frame = table(rows)
    keys = config_keys(frame)
    key_of = {int(frame.loc[i, "rank"]): tuple(keys.loc[i]) for i in frame.index}
    return frame, key_of


def test_an_edge_choice_gets_one_step_up_to_lr_extend():
    frame, key_of = edge_study()
    chosen = chosen_learning_rates(frame)
    grid = [1e-3, 3e-3, 1e-2]
    configured = {key: grid for key in key_of.values()}
    tried = {key: set(grid) for key in key_of.values()}
    (step,) = grid_extensions(chosen, tried, configured, lr_extend=2)
    assert step.key == key_of[4] and step.learning_rate == pytest.approx(3e-2) and step.step == 1
    assert "chose lr=0.01, the top of [0.001, 0.003, 0.01]; adding lr=0.03 (step 1 of" in (
        step.line("lora rank=4", 2)
    )
    assert grid_extensions(chosen, tried, configured, lr_extend=0) == []
    # one value added already: a second is allowed with lr_extend=2, not with 1
    tried[key_of[4]] = {*grid, 0.1}
    (second,) = grid_extensions(chosen, tried, configured, lr_extend=2)
    assert second.key == key_of[4] and second.step == 2
    assert grid_extensions(chosen, tried, configured, lr_extend=1) == []
    # the step was tried before (it diverged, so the grid of finished runs lacks it): not again
    tried[key_of[4]] = {*grid, 3e-2}
    assert grid_extensions(chosen, tried, configured, lr_extend=2) == []
