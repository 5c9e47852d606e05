"""What a study adds once its planned runs are done, decided on fixed numbers: a learning rate
past a grid's edge (`grid_extensions`, `sweep.lr_extend`) and, with `sweep.seeds=auto`, one more
seed (`seed_round`). Pure functions of a results table; `adaptive` trains what they ask for.

Grid steps: a configuration's chosen learning rate (on validation) at an end of its grid of two
or more finished values (`selection.at_edge`) asks for the value one step past that end, at the
ratio of the end to its neighbour, rounded to 1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 × 10^k
(`next_learning_rate`: [3e-3, 1e-2, 3e-2] chosen at 3e-2 → 9e-2 → 0.1). A configuration gets at
most `lr_extend` values past its configured grid, and never a value it tried before (a step
that diverged or failed ends that side's extension).

Seed rounds: the verdict (`report.verdict`) is settled when every rank it tests, largest first,
up to and including the first settled fail, has a one-sided interval that clears the tolerance
on one side (`verdict.unsettled_ranks`). While some rank is open and the study has fewer than
`report.max_seeds` seeds, the next seed is added.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from lora_lab.report.selection import CONFIG_KEYS
from lora_lab.report.verdict import recommend, study_confidence, unsettled_ranks

#: Mantissas a new learning rate is rounded to (in log scale): the usual 1-2-3-5 grids' values.
NICE_MANTISSAS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)

#: A configuration: (stage, method, rank, alpha) as `selection.config_keys` writes them.
Key = tuple[str, ...]


def _nice(value: float) -> float:
    """`value` rounded to the nearest NICE_MANTISSAS × 10^k in log scale (0.09 → 0.1)."""
    exponent = math.floor(math.log10(value))
    mantissa = value / 10**exponent
    best = min(NICE_MANTISSAS, key=lambda m: abs(math.log(m / mantissa)))
    return float(f"{best * 10**exponent:.3g}")


def next_learning_rate(grid: Sequence[float], top: bool) -> float:
    """The value one step past an end of `grid` (≥ 2 values), at the ratio of that end to its
    neighbour, rounded (`_nice`); unrounded (3 significant digits) where rounding would not
    leave the grid.

    Args:
        grid: The learning rates tried.
        top: Past the largest value (else below the smallest).
    """
    ordered = sorted(grid)
    edge, neighbour = (ordered[-1], ordered[-2]) if top else (ordered[0], ordered[1])
    raw = edge * edge / neighbour
    nice = _nice(raw)
    beyond = nice > edge if top else nice < edge
    return nice if beyond else float(f"{raw:.3g}")


@dataclass(frozen=True)
class Extension:
    """One configuration's step past its grid's edge.

    Attributes:
        key: The configuration.
        grid: Its finished learning rates, ascending.
        chosen: The learning rate chosen on validation (an end of `grid`).
        learning_rate: The value to add.
        step: How many values past the configured grid this one is (1, 2, …).
    """

    key: Key
    grid: tuple[float, ...]
    chosen: float
    learning_rate: float
    step: int

    def line(self, who: str, lr_extend: int) -> str:
        """`lr grid: lora rank=8 chose lr=0.03, the top of [0.003, 0.01, 0.03]; adding …`."""
        end = "top" if self.chosen == self.grid[-1] else "bottom"
        grid = ", ".join(f"{v:g}" for v in self.grid)
        return (
            f"lr grid: {who} chose lr={self.chosen:g}, the {end} of [{grid}]; adding "
            f"lr={self.learning_rate:g} (step {self.step} of sweep.lr_extend={lr_extend})"
        )


def grid_extensions(
    chosen: pd.DataFrame,
    tried: Mapping[Key, Collection[float | None]],
    configured: Mapping[Key, Collection[float]],
    lr_extend: int,
) -> list[Extension]:
    """The grid steps a study's choices ask for (see the module docstring).

    Args:
        chosen: `selection.chosen_learning_rates` of the study's results.
        tried: Per configuration, every learning rate it has run at (any status).
        configured: Per configuration, its configured grid (`sweep.learning_rates`, or
            `stages.full_finetune.learning_rates`).
        lr_extend: The most values a configuration may get past its configured grid.

    Returns:
        One extension per configuration that asks for one, in `chosen`'s order.
    """
    steps = []
    for _, row in chosen.iterrows():
        key = tuple(str(row[c]) for c in CONFIG_KEYS)
        grid = tuple(float(v) for v in row["grid"])
        if not row["at_edge"] or key not in tried:
            continue
        added = {v for v in tried[key] if v is not None} - set(configured.get(key, ()))
        value = next_learning_rate(grid, top=row["learning_rate"] == grid[-1])
        if len(added) >= lr_extend or value in tried[key]:
            continue
        steps.append(Extension(key, grid, float(row["learning_rate"]), value, len(added) + 1))
    return steps


@dataclass(frozen=True)
class SeedRound:
    """What `sweep.seeds=auto` does next.

    Attributes:
        seeds: The seeds the study has (of the full finetune).
        waiting: The (method, rank) pairs whose answer is still open, ranks ascending.
        next_seed: The seed to add; None: stop (settled, `max_seeds` reached, or nothing to
            compare with).
        compared: False when no finished full finetune gives a verdict to settle.
        max_seeds: `report.max_seeds`.
    """

    seeds: int
    waiting: tuple[tuple[str, int], ...]
    next_seed: int | None
    compared: bool
    max_seeds: int

    def line(self) -> str:
        """`auto seeds: r=16 and r=32 unsettled after 3 seeds; adding seed 3`, or why it stops."""
        if not self.compared:
            return "auto seeds: no finished full finetune to compare with; no seed added"
        if not self.waiting:
            return f"auto seeds: every tested rank is settled after {self.seeds} seeds"
        methods = {method for method, _ in self.waiting}
        names = [
            (f"{method} " if len(methods) > 1 else "") + f"r={rank}"
            for method, rank in self.waiting
        ]
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        if self.next_seed is None:
            return (
                f"auto seeds: {listed} still unsettled after {self.seeds} seeds, the bound "
                f"(report.max_seeds={self.max_seeds}); the report marks them unsettled"
            )
        return (
            f"auto seeds: {listed} unsettled after {self.seeds} seeds; adding seed {self.next_seed}"
        )


def seed_round(
    frame: pd.DataFrame, tolerance: float, seeds: Sequence[int], max_seeds: int
) -> SeedRound:
    """Whether `sweep.seeds=auto` adds a seed, and for which ranks (see the module docstring).

    Args:
        frame: The study's results (normalised).
        tolerance: `report.tolerance`.
        seeds: The seeds the study has run so far (of the full finetune).
        max_seeds: `report.max_seeds`.
    """
    # every look at the Bonferroni-split level, as the report judges it (verdict docstring)
    recommendations = recommend(frame, tolerance, study_confidence(True, max_seeds))
    waiting = tuple(
        (r.method, rank) for r in recommendations for rank in sorted(unsettled_ranks(r, tolerance))
    )
    more = bool(waiting) and len(seeds) < max_seeds
    next_seed = max(seeds) + 1 if more else None
    return SeedRound(len(seeds), waiting, next_seed, bool(recommendations), max_seeds)
