"""A study's progress: one header line per run, `[4/10] lora rank=8 seed=0 … eta 0:00:42`, and
one per fused pass, `[11-31/73] fused: lora ranks 1,…,64 seed 0: 21 runs train in one pass …
eta 0:01:10`, printed above Lightning's own progress bar; which runs failed or were skipped;
and `results.csv` rebuilt as each run ends, so the table on disk is complete up to the last
finished run. Every runner reports to it.

The time left is the work left at the rate measured for work of its kind: a run on its own
costs its epochs × the seconds per epoch of the runs on their own so far; a fused pass costs
its epochs × the seconds per epoch of the passes so far (a pass trains all its members' epochs
at once, far cheaper per run than they would be one by one)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from pathlib import Path

from lora_lab.pipeline.console import say
from lora_lab.pipeline.plan import PlannedRun
from lora_lab.pipeline.record import write_results_csv
from lora_lab.pipeline.resume import describe_previous, finished
from lora_lab.results import DIVERGED, RunResult


def _fmt_seconds(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(max(seconds, 0.0))))


class Rate:
    """Seconds per epoch of one kind of work, from what has been measured."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.epochs = 0

    def add(self, seconds: float, epochs: int) -> None:
        self.seconds += seconds
        self.epochs += epochs

    def per_epoch(self) -> float | None:
        return self.seconds / self.epochs if self.epochs else None


class Progress:
    """A study's runs as they go: a count of the runs said so far, the time left, and the ids
    of the runs that failed or were finished earlier.

    Args:
        runs: The study's plan.
        study_dir: The study folder.
        jobs: How many runs on their own go at a time (`sweep.jobs`).
    """

    def __init__(self, runs: Sequence[PlannedRun], study_dir: Path, jobs: int = 1) -> None:
        self.runs: list[PlannedRun] = list(runs)
        self.study_dir = study_dir
        self.jobs = jobs
        self.counted = 0  # runs said so far: begun, in a pass, or skipped as done earlier
        self.pending = set(range(len(runs)))  # runs whose result is still to come
        self.passes: list[list[int]] = []  # fused passes expected, until each ends or fails
        self.alone, self.fused = Rate(), Rate()
        self.started: dict[int, float] = {}  # a run on its own → when it began
        self.pass_started = 0.0  # when the fused pass under way began
        self.failed: list[str] = []
        self.diverged: list[str] = []  # a result, not a failure: the study still exits 0
        self.skipped: list[str] = []
        self._position = {id(run): index for index, run in enumerate(runs)}

    def eta(self) -> str:
        """The time left: the epochs left of runs on their own and of fused passes, each at
        the rate measured for its kind (the other kind's rate until its own is measured)."""
        in_passes = {index for members in self.passes for index in members}
        alone = sum(self.runs[i].epochs for i in self.pending - in_passes)
        fused = sum(self.runs[members[0]].epochs for members in self.passes)
        alone_rate = self.alone.per_epoch() or self.fused.per_epoch()
        fused_rate = self.fused.per_epoch() or self.alone.per_epoch()
        if alone_rate is None or fused_rate is None:
            return "?" if alone or fused else _fmt_seconds(0)
        return _fmt_seconds(alone * alone_rate / self.jobs + fused * fused_rate)

    def begin(self, index: int) -> None:
        """Announce run `index` as it starts, with a note on any earlier attempt in its folder."""
        self.counted += 1
        run = self.runs[index]
        say(f"[{self.counted}/{len(self.runs)}] {run.label()} … eta {self.eta()}")
        self.started[index] = time.perf_counter()
        note = describe_previous(self.study_dir / "runs" / run.run_id)
        if note:
            say(f"    {note}")

    def end(self, index: int, result: RunResult, write_table: bool = True) -> None:
        """Run `index` ended with `result` (already recorded): count it, and rebuild
        `results.csv` unless the caller does it once for several runs."""
        self.pending.discard(index)
        started = self.started.pop(index, None)
        if started is not None and result.ok:
            self.alone.add(time.perf_counter() - started, self.runs[index].epochs)
        if result.status == DIVERGED:
            self.diverged.append(result.run_id)
        elif not result.ok:
            self.failed.append(result.run_id)
        if write_table:
            write_results_csv(self.study_dir)

    def expect_passes(self, groups: Sequence[Sequence[PlannedRun]]) -> None:
        """The fused passes the study will train: their runs count as passes in the time left."""
        self.passes = [[self._position[id(run)] for run in group] for group in groups]

    def begin_pass(self, group: Sequence[PlannedRun], what: str) -> None:
        """Announce a fused pass of the runs `group` as it starts."""
        members = [self._position[id(run)] for run in group]
        if members not in self.passes:
            self.passes.append(members)
        first = self.counted + 1
        self.counted += len(members)
        say(f"[{first}-{self.counted}/{len(self.runs)}] {what} … eta {self.eta()}")
        self.pass_started = time.perf_counter()

    def end_pass(self, group: Sequence[PlannedRun], results: Sequence[RunResult]) -> None:
        """The pass of `group` ended with `results` (already recorded, in group order)."""
        members = [self._position[id(run)] for run in group]
        seconds = time.perf_counter() - self.pass_started
        if any(result.ok for result in results):
            self.fused.add(seconds, self.runs[members[0]].epochs)
        self.passes.remove(members)
        for index, result in zip(members, results, strict=True):
            self.end(index, result, write_table=False)
        write_results_csv(self.study_dir)

    def pass_failed(self, group: Sequence[PlannedRun]) -> None:
        """The pass of `group` could not train: its runs go on their own, and are said again."""
        members = [self._position[id(run)] for run in group]
        self.passes.remove(members)
        self.counted -= len(members)

    def skip_finished(self, indices: Sequence[int] | None = None) -> list[int]:
        """Say which runs a previous attempt finished (an `ok` result of the same identity with
        its artefact on disk, or a `diverged` one), leave them out of the time estimate, and
        return the others.

        Args:
            indices: Positions in the plan to look at; None: every run.
        """
        todo = []
        for index in range(len(self.runs)) if indices is None else indices:
            run = self.runs[index]
            status = finished(self.study_dir / "runs" / run.run_id, run.identity)
            kept = (self.study_dir / run.artefact_file).is_file()
            if status == DIVERGED or (status == "ok" and kept):
                self.counted += 1
                done = "diverged" if status == DIVERGED else "done"
                say(f"[{self.counted}/{len(self.runs)}] {run.label()} … {done} earlier, skipped")
                self.pending.discard(index)
                self.skipped.append(run.run_id)
                if status == DIVERGED:
                    self.diverged.append(run.run_id)
            else:
                todo.append(index)
        return todo

    def add(self, runs: Sequence[PlannedRun]) -> list[int]:
        """Runs added to the study as it goes (a round of seeds, a step past a grid's edge):
        they join the plan and the count; returns their positions."""
        start = len(self.runs)
        self.runs = [*self.runs, *runs]
        for index, run in enumerate(runs, start):
            self._position[id(run)] = index
            self.pending.add(index)
        return list(range(start, len(self.runs)))
