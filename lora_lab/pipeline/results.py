"""Run results: one `result.json` per run, `results.csv` rebuilt from them, atomic writes.

A run's `result.json` is the single source of truth. `results.csv` is derived: it is always
rebuilt from every `result.json` below a folder and replaced atomically, so a crash can never
leave a half-written row behind.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from lora_lab._atomic import atomic_write_text
from lora_lab.report.results import normalize_results
from lora_lab.report.selection import selected_mask
from lora_lab.schema import INTEGER_COLUMNS, RESULT_COLUMNS

#: Columns that hold float32 metrics (rounded in results.csv).
METRIC_COLUMNS = ("test_acc", "test_loss", "val_acc", "source_test_acc")

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
RESULTS_CSV = "results.csv"
#: Folder (inside a study) where `sweep.restart=true` keeps the previous study's files.
SET_ASIDE = "replaced"

COLUMNS = list(RESULT_COLUMNS)
#: Keys of `result.json` that are records, not table columns.
RECORD_ONLY = {"config", "environment", "data_fingerprint", "identity", "command"}


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` so readers see the old file or the new one, never a mix.

    Writes a temp file in the same folder, fsyncs it, then renames it over the target; the
    file gets the umask's mode (0644 under umask 022), as a plain `open` would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text, fsync=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; an empty cell says "no value"
    return value


def write_result(run_dir: str | Path, result: Mapping[str, Any]) -> Path:
    """Write a run's `result.json` atomically and return its path."""
    path = Path(run_dir) / RESULT_FILE
    clean = {key: _jsonable(value) for key, value in result.items()}
    write_atomic(path, json.dumps(clean, indent=2, sort_keys=False, default=str) + "\n")
    return path


def read_result(path: str | Path) -> dict[str, Any]:
    """Read one `result.json`; raises ValueError naming the file when it is corrupt."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"corrupt result file {str(path)!r}: {error}") from None
    if not isinstance(data, dict) or "stage" not in data:
        raise ValueError(f"corrupt result file {str(path)!r}: not a run result")
    return data


def find_results(root: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every run result below `root` (Hydra multirun folders included).

    Returns:
        The results (each with `run_dir` made relative to `root`), and one message per
        corrupt file found, so callers can report them instead of dropping them silently.
    """
    root = Path(root)
    results, problems = [], []
    for path in sorted(root.rglob(RESULT_FILE)):
        if any(part.startswith(".") or part == SET_ASIDE for part in path.relative_to(root).parts):
            continue  # temp files, .hydra folders, and studies a restart set aside
        try:
            result = read_result(path)
        except ValueError as error:
            problems.append(str(error))
            continue
        result["run_dir"] = path.parent.relative_to(root).as_posix()
        results.append(result)
    return results, problems


def results_frame(results: list[Mapping[str, Any]]) -> pd.DataFrame:
    """Results as a table with the fixed `COLUMNS` first, extra scalar keys after."""
    rows = []
    for result in results:
        row = {k: v for k, v in result.items() if k not in RECORD_ONLY}
        if isinstance(row.get("per_class_acc"), dict):
            row["per_class_acc"] = json.dumps(row["per_class_acc"])
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    extra = [c for c in frame.columns if c not in COLUMNS]
    frame = frame[COLUMNS + extra]
    # Integers stay integers next to empty cells (pretrain rows have no rank).
    for column in INTEGER_COLUMNS:
        frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    # Metrics are float32 values: 0.868, not 0.8679999709129333 (6 significant digits).
    for column in (*METRIC_COLUMNS, *(c for c in extra if c not in RECORD_ONLY)):
        if column in frame and pd.api.types.is_float_dtype(frame[column]):
            frame[column] = frame[column].map(lambda v: float(f"{v:.6g}") if pd.notna(v) else v)
    if len(frame):
        frame["selected"] = selected_mask(normalize_results(frame)).to_numpy()
    order = {"pretrain": 0, "full_finetune": 1, "lora": 2}
    if len(frame):
        frame = frame.sort_values(
            by=["stage", "rank", "alpha", "learning_rate", "seed", "run_id"],
            key=lambda col: col.map(order) if col.name == "stage" else col,
            na_position="first",
        ).reset_index(drop=True)
    return frame


def write_results_csv(root: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Rebuild `<root>/results.csv` from every `result.json` below `root`, atomically.

    Returns:
        The table and the corrupt-file messages from `find_results`.
    """
    results, problems = find_results(root)
    for problem in problems:
        log.warning(problem)
    frame = results_frame(results)
    write_atomic(Path(root) / RESULTS_CSV, frame.to_csv(index=False))
    return frame, problems
