"""A study's progress: one header line per run, `[4/10] lora rank=8 seed=0 … eta 0:00:42`,
printed above Lightning's own progress bar; which runs failed or were skipped; and
`results.csv` rebuilt as each run ends, so the table on disk is complete up to the last
finished run. Every runner reports to it."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from pathlib import Path

from lora_lab.pipeline.console import say
from lora_lab.pipeline.plan import PlannedRun
from lora_lab.pipeline.record import write_results_csv
from lora_lab.pipeline.resume import describe_previous, finished
from lora_lab.results import RunResult


def _fmt_seconds(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(max(seconds, 0.0))))


class Progress:
    """A study's runs as they go: the time left (from the epochs done), and the ids of the
    runs that failed or were finished earlier.

    Args:
        runs: The study's plan; runs are named by their index in it.
        study_dir: The study folder.
    """

    def __init__(self, runs: Sequence[PlannedRun], study_dir: Path) -> None:
        self.runs = runs
        self.study_dir = study_dir
        self.start = time.perf_counter()
        self.epochs_done = 0
        self.total_epochs = sum(run.epochs for run in runs)
        self.failed: list[str] = []
        self.skipped: list[str] = []

    def begin(self, index: int) -> None:
        """Announce run `index` as it starts, with a note on any earlier attempt in its folder."""
        elapsed = time.perf_counter() - self.start
        if self.epochs_done:
            eta = _fmt_seconds(elapsed / self.epochs_done * (self.total_epochs - self.epochs_done))
        else:
            eta = "?"
        run = self.runs[index]
        say(f"[{index + 1}/{len(self.runs)}] {run.label()} … eta {eta}")
        note = describe_previous(self.study_dir / "runs" / run.run_id)
        if note:
            say(f"    {note}")

    def end(self, index: int, result: RunResult, write_table: bool = True) -> None:
        """Run `index` ended with `result` (already recorded): count it, and rebuild
        `results.csv` unless the caller does it once for several runs."""
        self.epochs_done += self.runs[index].epochs
        if not result.ok:
            self.failed.append(result.run_id)
        if write_table:
            write_results_csv(self.study_dir)

    def skip_finished(self) -> list[int]:
        """Say which runs a previous attempt finished (an `ok` result of the same identity, and
        its artefact on disk), leave them out of the time estimate, and return the others."""
        todo = []
        for index, run in enumerate(self.runs):
            run_dir = self.study_dir / "runs" / run.run_id
            if finished(run_dir, run.identity) and (self.study_dir / run.artefact_file).is_file():
                say(f"[{index + 1}/{len(self.runs)}] {run.label()} … done earlier, skipped")
                self.total_epochs -= run.epochs
                self.skipped.append(run.run_id)
            else:
                todo.append(index)
        return todo
