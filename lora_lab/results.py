"""The result type: one run's result, the `results.csv` columns, their types and stage order,
and reading, writing and normalising both.

A run's `result.json` is the single source of truth. `results.csv` is derived: it is rebuilt
from every `result.json` below a study folder and replaced atomically, so a crash never leaves
a half-written row behind. Every producer (the sequential, fused and pool runners, a failed
run) builds its row as a `RunResult`; the pipeline, the report, the analysis and
`lora-lab report` read through this module. It imports nothing else of `lora_lab` but the
atomic writer, and no torch, so the report stays torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lora_lab._atomic import atomic_write_text

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
RESULTS_CSV = "results.csv"
#: Folder (inside a study) where `sweep.restart=true` keeps the previous study's files; never
#: read as part of the study.
SET_ASIDE = "replaced"

#: Columns of `results.csv`, in order; extra per-study columns (e.g. `delta_rel_error`) follow.
# fmt: off
COLUMNS: tuple[str, ...] = (
    "run_id", "stage", "rank", "alpha", "seed", "learning_rate", "method",
    "trainable_params", "total_params", "full_rank_at",
    "test_acc", "test_loss", "val_acc", "per_class_acc", "confusion", "train_classes",
    "source_test_acc", "train_seconds", "epochs", "run_dir", "pass", "selected", "status", "error",
)
#: Columns a table may lack (it still reads, with the column empty): those added after the
#: first studies were written, and the records a merged or filtered table need not carry. The
#: others (`REQUIRED_COLUMNS`) are what the report's statistics and tables need.
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "pass", "method", "val_acc", "selected", "total_params", "full_rank_at", "per_class_acc",
    "confusion", "train_classes", "source_test_acc", "train_seconds", "epochs", "run_dir", "error",
)
# fmt: on
REQUIRED_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c not in OPTIONAL_COLUMNS)
#: `status`: finished, raised, left out, or went non-finite / stayed at chance (never averaged).
STATUSES: tuple[str, ...] = ("ok", "failed", "skipped", "diverged")
DIVERGED = "diverged"
#: Numeric columns (empty cells read as NaN); the others are text.
# fmt: off
NUMERIC_COLUMNS: tuple[str, ...] = (
    "rank", "alpha", "seed", "learning_rate", "trainable_params", "total_params", "full_rank_at",
    "test_acc", "test_loss", "val_acc", "source_test_acc", "train_seconds", "epochs",
)
# fmt: on
TEXT_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c not in NUMERIC_COLUMNS)
#: Integer columns, kept as integers next to empty cells (pretrain rows have no rank).
INTEGER_COLUMNS: tuple[str, ...] = (
    "rank", "seed", "trainable_params", "total_params", "full_rank_at", "epochs",
)  # fmt: skip
#: Columns that hold float32 metrics (written with 6 significant digits).
METRIC_COLUMNS: tuple[str, ...] = ("test_acc", "test_loss", "val_acc", "source_test_acc")
#: Added by `normalize_results`; not part of the file, never shown as an extra column.
DERIVED_COLUMNS: tuple[str, ...] = ("alpha_per_rank",)
STAGE_ORDER: tuple[str, ...] = ("pretrain", "full_finetune", "lora")
#: Keys of `result.json` that are records of the run, not table columns.
RECORD_ONLY: tuple[str, ...] = (
    "identity",
    "artefact",
    "data_fingerprint",
    "config",
    "environment",
    "command",
)


@dataclass
class RunResult:
    """One run's result: a row of `results.csv`, plus what `result.json` records beside it.

    Attributes:
        run_id: The run's folder name under `runs/`.
        stage: `pretrain`, `full_finetune` or `lora`.
        rank, alpha, method: The LoRA settings (None for the other stages).
        seed, learning_rate: The run's seed and (LoRA or full-finetune) learning rate.
        trainable_params, total_params: Parameter counts of the trained network.
        full_rank_at: LoRA only: the rank at which every adapted layer is full rank (the largest
            min(out, in) over them), so a rank at or above it is no rank limit.
        test_acc, test_loss, val_acc: Metrics (`test_acc`/`val_acc` None for regression).
        per_class_acc: Test accuracy per class name.
        confusion: Test confusion counts: {"predicted": [every class name], "counts": {true
            class name: [count per predicted class]}}.
        train_classes: The class names the run trained (and validated) on.
        source_test_acc: Pretrain only: accuracy on its own task when the finetune task differs.
        train_seconds: Time spent training (a fused pass's time shared out over its runs).
        epochs: Finished epochs.
        run_dir: The run folder, relative to the study.
        pass_id: The training pass that produced the row (column `pass`).
        status: One of `STATUSES` (`ok`, `failed`, `skipped`, `diverged`); error: the first
            line of what stopped a failed or diverged run.
        extra: Per-study metrics, one column each (e.g. `delta_rel_error`).
        identity: The run's hashed identity (resume and skip decisions).
        artefact: What the run left for later stages and `lora-lab analyze`, relative to the
            study: an adapter folder or a weights file.
        data_fingerprint: The data the run trained on.
    """

    run_id: str
    stage: str
    rank: int | None = None
    alpha: float | None = None
    seed: int | None = None
    learning_rate: float | None = None
    method: str | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    full_rank_at: int | None = None
    test_acc: float | None = None
    test_loss: float | None = None
    val_acc: float | None = None
    per_class_acc: dict[str, float] | None = None
    confusion: dict[str, Any] | None = None
    train_classes: list[str] | None = None
    source_test_acc: float | None = None
    train_seconds: float | None = None
    epochs: int | None = None
    run_dir: str = ""
    pass_id: str = ""
    status: str = "ok"
    error: str = ""
    extra: dict[str, float] = field(default_factory=dict)
    identity: str | None = None
    artefact: str | None = None
    data_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"run {self.run_id}: status {self.status!r} is not one of {STATUSES}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def row(self) -> dict[str, Any]:
        """The table row: `COLUMNS` (but `selected`, which the table derives) then `extra`."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["pass"] = values.pop("pass_id")
        row = {column: values[column] for column in COLUMNS if column in values}
        return {**row, **self.extra}

    def summary(self) -> str:
        """The run's metrics in one line, rounded as `results.csv` rounds them and named by the
        task they measure: a pretrain row's `test_acc` and `test_loss` are the pretrained
        network's on the finetune task's test set, `source_test_acc` its own task's."""

        def shown(*names: str) -> str:
            values = {name: getattr(self, name) for name in names}
            return " ".join(f"{k}={round_metric(v)}" for k, v in values.items() if v is not None)

        if self.stage != "pretrain":
            return f"{self.run_id}: {shown('test_acc', 'test_loss', 'val_acc')}"
        line = f"{self.run_id}: {shown('test_acc', 'test_loss')} on the finetune task's test set"
        own = shown("source_test_acc")
        return f"{line}; {own} on its own task's" if own else line

    def to_record(self, **records: Any) -> dict[str, Any]:
        """What `result.json` holds: the row, the identity and artefact, and `records` (the
        resolved config, the environment, …)."""
        own = {key: getattr(self, key) for key in ("identity", "artefact", "data_fingerprint")}
        return {**self.row(), **{k: v for k, v in own.items() if v is not None}, **records}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RunResult:
        """The result in a `result.json` (or a table row); unknown scalar keys go to `extra`."""
        names = {f.name for f in dataclasses.fields(cls)} - {"pass_id", "extra"}
        values = {key: record[key] for key in names if key in record}
        values["pass_id"] = record.get("pass") or ""
        known = names | {"pass", "selected", *RECORD_ONLY}
        values["extra"] = {
            key: value
            for key, value in record.items()
            if key not in known and (value is None or isinstance(value, (int, float)))
        }
        return cls(**values)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; an empty cell says "no value"
    return value


def write_result(run_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """Write a run's `result.json` (a `RunResult.to_record`) atomically; returns its path."""
    clean = {key: _jsonable(value) for key, value in record.items()}
    text = json.dumps(clean, indent=2, default=str) + "\n"
    return atomic_write_text(Path(run_dir) / RESULT_FILE, text, fsync=True)


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
    """Every run's `result.json` below `root` (Hydra multirun folders included).

    Returns:
        The records (each with `run_dir` made relative to `root`), and one message per
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


def round_metric(value: float) -> float:
    """A float32 metric as the table writes it: 0.868, not 0.8679999709129333 (6 significant
    digits); an empty value stays empty."""
    return float(f"{value:.6g}") if pd.notna(value) else value


def results_frame(
    records: list[Mapping[str, Any]],
    select: Callable[[pd.DataFrame], pd.Series] | None = None,
) -> pd.DataFrame:
    """The `results.csv` table of `records`: `COLUMNS` first, extra scalar keys after.

    Args:
        records: `result.json` contents (see `find_results`).
        select: Computes the `selected` column from the normalised table (the report's
            learning-rate choice); None leaves it empty.
    """
    rows = []
    for record in records:
        row = {k: v for k, v in record.items() if k not in RECORD_ONLY}
        for column in ("per_class_acc", "confusion", "train_classes"):
            if isinstance(row.get(column), (dict, list)):
                row[column] = json.dumps(row[column])
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    extra = [c for c in frame.columns if c not in COLUMNS]
    frame = frame[[*COLUMNS, *extra]]
    # Integers stay integers next to empty cells (pretrain rows have no rank).
    for column in INTEGER_COLUMNS:
        frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    for column in (*METRIC_COLUMNS, *extra):
        if pd.api.types.is_float_dtype(frame[column]):
            frame[column] = frame[column].map(round_metric)
    if len(frame) and select is not None:
        frame["selected"] = select(normalize_results(frame)).to_numpy()
    return sort_by_stage(frame, then=("run_id",))


def check_columns(df: pd.DataFrame, source: str | Path) -> None:
    """Raise a one-line ValueError naming `source` and every missing required column."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing required column(s): {', '.join(missing)}")


def normalize_results(df: pd.DataFrame, source: str | Path = "results table") -> pd.DataFrame:
    """A copy with the contract's dtypes: numbers float, text `str` ("" if empty).

    Also adds `alpha_per_rank` (see `DERIVED_COLUMNS`). Idempotent. Numbers stay float (not
    nullable Int64) because `rank` and `alpha` are empty for non-LoRA rows, and seaborn and
    matplotlib handle NaN floats everywhere.

    Raises:
        ValueError: If required columns are missing.
    """
    check_columns(df, source)
    out = df.copy()
    for column in OPTIONAL_COLUMNS:
        if column not in out.columns:
            out[column] = ""
    for column in NUMERIC_COLUMNS:
        out[column] = pd.to_numeric(out[column], errors="coerce").astype(float)
    for column in TEXT_COLUMNS:
        out[column] = out[column].astype(object).fillna("").astype(str).str.strip()
    out["status"] = out["status"].str.lower()
    # Tables written before methods were a sweep axis: their LoRA runs are plain LoRA.
    out.loc[(out["stage"] == "lora") & (out["method"] == ""), "method"] = "default"
    # α/r is the LoRA scaling; sweeps often tie α to r (α = r, α = 2r), which is one setting.
    # Rounded so that float noise does not split one ratio into several.
    out["alpha_per_rank"] = (out["alpha"] / out["rank"].where(out["rank"] > 0)).round(9)
    return out


def read_results(path: str | Path) -> pd.DataFrame:
    """Read and normalise a `results.csv`.

    Raises:
        ValueError: If the file is missing, empty, or lacks required columns.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: results file not found")
    try:
        # Text columns as str so that a run_id such as "001" or an empty error stays text.
        df = pd.read_csv(path, dtype=dict.fromkeys(TEXT_COLUMNS, str))
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: results file is empty (no header row)") from None
    return normalize_results(df, path)


def ok_mask(df: pd.DataFrame) -> pd.Series:
    """The runs that finished (`status == "ok"`); anything else (failed, skipped, diverged)
    counts as not finished and never enters a mean."""
    return df["status"].astype(str).str.lower().eq("ok")


def diverged_mask(df: pd.DataFrame) -> pd.Series:
    """The runs the pipeline marked `diverged` (non-finite loss, or accuracy at chance)."""
    return df["status"].astype(str).str.lower().eq(DIVERGED)


def ok_runs(df: pd.DataFrame, stage: str | None = None) -> pd.DataFrame:
    """The finished runs, optionally of one stage."""
    rows = df[ok_mask(df)]
    if stage is not None:
        rows = rows[rows["stage"] == stage]
    return rows


def sort_by_stage(df: pd.DataFrame, then: tuple[str, ...] = ()) -> pd.DataFrame:
    """Rows in `STAGE_ORDER` (unknown stages last), then by rank, alpha, lr, seed and `then`;
    empty cells first (a stable sort: ties keep their order)."""
    stage_index = {stage: i for i, stage in enumerate(STAGE_ORDER)}
    key = df["stage"].map(lambda s: stage_index.get(s, len(STAGE_ORDER)))
    present = [c for c in ("rank", "alpha", "learning_rate", "seed", *then) if c in df.columns]
    ordered = df.assign(_stage=key).sort_values(
        ["_stage", *present], kind="stable", na_position="first"
    )
    return ordered.drop(columns="_stage").reset_index(drop=True)


def _json_cell(text: str, column: str, run_id: str, kind: type) -> Any:
    """A JSON cell of `kind` (dict or list); None when empty or malformed. Malformed cells are
    logged, not raised: a report should still render around a bad row."""
    try:
        parsed = json.loads(text) if text and text != "nan" else None
    except json.JSONDecodeError:
        log.warning("run %s: %s is not valid JSON; ignored", run_id, column)
        return None
    if parsed is not None and not isinstance(parsed, kind):
        log.warning("run %s: %s is not a JSON %s; ignored", run_id, column, kind.__name__)
        return None
    return parsed


def parse_per_class(text: str, run_id: str = "?") -> dict[str, float]:
    """Parse a `per_class_acc` cell (a JSON object); an empty or malformed cell gives `{}`."""
    parsed = _json_cell(text, "per_class_acc", run_id, dict) or {}
    return {str(k): float(v) for k, v in parsed.items() if isinstance(v, (int, float))}


def parse_train_classes(text: str, run_id: str = "?") -> list[str]:
    """Parse a `train_classes` cell (a JSON list of names); empty or malformed gives []."""
    return [str(name) for name in _json_cell(text, "train_classes", run_id, list) or []]


def parse_confusion(text: str, run_id: str = "?") -> pd.DataFrame | None:
    """Parse a `confusion` cell into counts [true class × predicted class] (index: true class
    names, columns: predicted class names); None when empty or malformed (logged)."""
    parsed = _json_cell(text, "confusion", run_id, dict)
    try:
        counts = pd.DataFrame.from_dict(parsed["counts"], orient="index", dtype=float)
        counts.columns = [str(name) for name in parsed["predicted"]]
    except (TypeError, KeyError, ValueError):
        if parsed is not None:
            log.warning("run %s: confusion is not {predicted, counts}; ignored", run_id)
        return None
    return counts
