"""The results-table schema shared by the pipeline (which writes it) and the report (which
reads it). Kept free of heavy imports so the report stays torch-free."""

from __future__ import annotations

#: Columns of `results.csv`, in order; extra per-study columns (e.g. `delta_rel_error`) follow.
RESULT_COLUMNS: tuple[str, ...] = (
    "run_id",
    "stage",
    "rank",
    "alpha",
    "seed",
    "learning_rate",
    "method",
    "trainable_params",
    "total_params",
    "test_acc",
    "test_loss",
    "val_acc",
    "per_class_acc",
    "source_test_acc",
    "train_seconds",
    "epochs",
    "run_dir",
    "pass",
    "selected",
    "status",
    "error",
)
#: Columns added after the first studies were written: a table without them still reads,
#: with the column empty.
OPTIONAL_COLUMNS: tuple[str, ...] = ("pass", "method", "val_acc", "selected")
#: Numeric columns (empty cells read as NaN); the others are text.
NUMERIC_COLUMNS: tuple[str, ...] = (
    "rank",
    "alpha",
    "seed",
    "learning_rate",
    "trainable_params",
    "total_params",
    "test_acc",
    "test_loss",
    "val_acc",
    "source_test_acc",
    "train_seconds",
    "epochs",
)
#: Integer columns, kept as integers next to empty cells (pretrain rows have no rank).
INTEGER_COLUMNS: tuple[str, ...] = ("rank", "seed", "trainable_params", "total_params", "epochs")
STAGE_ORDER: tuple[str, ...] = ("pretrain", "full_finetune", "lora")
