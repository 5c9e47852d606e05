"""`lora-lab report` and `lora-lab analyze`: commands on a finished study folder (or, for
`report`, a bare results table)."""

from __future__ import annotations

import sys
from pathlib import Path

from lora_lab.cli.errors import UsageError


def study_folder(args: list[str], command: str) -> Path:
    if len(args) != 1:
        raise UsageError(
            f"`lora-lab {command}` takes one study folder, got {len(args)} arguments: lora-lab {command} DIR"
        )
    path = Path(args[0]).expanduser()
    if not path.is_dir():
        raise UsageError(f"study folder {str(path)!r} does not exist")
    return path


def report_args(args: list[str]) -> tuple[Path, float | None]:
    """`lora-lab report PATH [report.tolerance=V]`: the path and the tolerance (None: the
    study's own, else the default)."""
    tolerance, rest = None, []
    for arg in args:
        if arg.startswith("report.tolerance="):
            value = arg.split("=", 1)[1]
            try:
                tolerance = float(value)
            except ValueError:
                raise UsageError(f"report.tolerance={value!r}: not a number") from None
            if not 0 <= tolerance < 1:
                raise UsageError(f"report.tolerance={value}: must be a number in [0, 1)")
        else:
            rest.append(arg)
    if len(rest) != 1:
        raise UsageError(
            f"`lora-lab report` takes one study folder or results table, got {len(rest)}: "
            "lora-lab report DIR|results.csv [report.tolerance=0.01]"
        )
    path = Path(rest[0]).expanduser()
    if not path.exists():
        raise UsageError(f"{str(path)!r} does not exist")
    return path, tolerance


def report_command(args: list[str]) -> int:
    from lora_lab.report import write_report
    from lora_lab.results import RESULTS_CSV, find_results, read_results

    path, tolerance = report_args(args)
    records, problems = find_results(path) if path.is_dir() else ([], [])
    for problem in problems:
        print(f"lora-lab: warning: {problem}", file=sys.stderr)
    if records:  # a study: rebuild its table from its runs' result.json
        from lora_lab.pipeline.record import write_results_csv

        frame, _ = write_results_csv(path)
        report = write_report(path, tolerance)
        print(f"{len(frame)} runs → {path / RESULTS_CSV}, {report}")
        return 0
    table = path / RESULTS_CSV if path.is_dir() else path
    if not table.is_file():
        raise UsageError(f"no run results (result.json) or {RESULTS_CSV} found under {str(path)!r}")
    if table.suffix != ".csv":
        raise UsageError(f"{str(table)!r} is not a .csv results table")
    frame = read_results(table)  # a missing column: one line naming it
    report = write_report(table, tolerance)
    print(f"{len(frame)} runs from {table} → {report}")
    return 0


def analyze_command(args: list[str]) -> int:
    from lora_lab.analysis import analyze_study
    from lora_lab.report import write_report

    study = study_folder(args, "analyze")
    table = analyze_study(study)
    print(f"{len(table)} rows → {study / 'analysis.csv'}")
    if (study / "results.csv").is_file():
        print(f"report updated: {write_report(study)}")
    return 0
