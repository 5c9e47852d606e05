"""`analyze_study`: read a study folder, write `analysis.csv` and the §7 figures.

Everything is optional: with checkpoints only, the table holds spectra; with adapters only,
subspace similarities; with both, also how each LoRA update compares to the full one. What
was skipped, and why, is returned in `table.attrs["notes"]` and logged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from lora_lab._atomic import atomic_path
from lora_lab.analysis.measurements import (
    AccuracyLookup,
    build_table,
    lora_vs_full_rows,
    match_modules,
    spectrum_rows,
    subspace_rows,
    weight_layers,
)
from lora_lab.analysis.plots import SPECTRUM_PNG, draw_subspace_figures, plot_spectrum
from lora_lab.analysis.readers import (
    ADAPTERS_DIR,
    FULL_FINETUNE_FILE,
    PRETRAIN_FILE,
    load_adapters,
    load_checkpoint,
)

logger = logging.getLogger(__name__)

ANALYSIS_CSV = "analysis.csv"
RESULTS_CSV = "results.csv"


def write_csv_atomic(table: pd.DataFrame, path: Path) -> None:
    """Writes via a temporary file in the same folder + os.replace: never a partial CSV."""
    with atomic_path(path) as temporary:
        table.to_csv(temporary, index=False)


def accuracy_lookup(study_dir: Path, notes: list[str]) -> AccuracyLookup:
    """test_acc of a LoRA run from `results.csv`, matched on rank, seed and (if needed) alpha."""
    path = study_dir / RESULTS_CSV
    try:
        results = pd.read_csv(path)
    except (OSError, ValueError) as error:
        notes.append(f"{path} not read ({type(error).__name__}): test_acc left empty")
        return lambda rank, seed, alpha: None
    needed = {"stage", "rank", "test_acc"}
    if not needed <= set(results.columns):
        notes.append(f"{path} lacks {sorted(needed - set(results.columns))}: test_acc left empty")
        return lambda rank, seed, alpha: None
    lora = results[results["stage"].astype(str).str.contains("lora", case=False)]

    def lookup(rank: int, seed: int | None, alpha: float) -> float | None:
        rows = lora[lora["rank"] == rank]
        if seed is not None and "seed" in rows:
            rows = rows[rows["seed"] == seed]
        if len(rows) > 1 and "alpha" in rows:
            rows = rows[rows["alpha"] == alpha]
        # Several runs still matching means the table cannot tell them apart: say nothing.
        return float(rows["test_acc"].iloc[0]) if len(rows) == 1 else None

    return lookup


def full_finetune_file(study: Path) -> Path:
    """The full finetune the analysis compares with: `checkpoints/full_finetune.safetensors`,
    or, when the baseline ran for several seeds or learning rates, the checkpoint of its
    lowest-seed run at the learning rate chosen on validation (`selected` in results.csv)."""
    if (study / FULL_FINETUNE_FILE).is_file() or not (study / "results.csv").is_file():
        return FULL_FINETUNE_FILE
    try:
        table = pd.read_csv(study / "results.csv")
    except (OSError, ValueError):
        return FULL_FINETUNE_FILE
    if not {"stage", "run_id", "seed"} <= set(table.columns):
        return FULL_FINETUNE_FILE  # a table that cannot name the runs (not written by lora_lab)
    runs = table[table["stage"] == "full_finetune"]
    if "status" in runs:
        runs = runs[runs["status"] == "ok"]
    if "selected" in runs:
        runs = runs[runs["selected"].astype(str).str.lower() == "true"]
    if runs.empty:
        return FULL_FINETUNE_FILE
    run_id = runs.sort_values(["seed", "run_id"])["run_id"].iloc[0]
    return FULL_FINETUNE_FILE.parent / f"{run_id}.safetensors"


def analyze_study(study_dir: str | os.PathLike[str], *, make_plots: bool = True) -> pd.DataFrame:
    """Analyses a study folder's weight updates (LoRA paper §7) into `<study>/analysis.csv`.

    Reads `checkpoints/{pretrain,full_finetune}.safetensors` and
    `adapters/rank_<r>_seed_<s>/` (PEFT format), whichever exist.

    Args:
        study_dir: the study output folder.
        make_plots: also write `analysis_spectrum.png`, `analysis_subspace_<layer>.png` and
            `analysis_seeds_<layer>.png` into the folder.

    Returns:
        The long table, one row per measurement, `kind` in {"spectrum", "lora_vs_full",
        "subspace"} (columns in `lora_lab.analysis.measurements.COLUMNS`). `attrs["notes"]`
        lists what was skipped and why; `attrs["figures"]` the PNG paths written.

    Raises:
        ValueError: the folder holds neither checkpoints nor a readable adapter.
    """
    study = Path(study_dir)
    notes: list[str] = []
    pretrain = load_checkpoint(study / PRETRAIN_FILE, notes)
    full = load_checkpoint(study / full_finetune_file(study), notes)
    adapters = load_adapters(study, notes) if study.is_dir() else []
    if pretrain is None and full is None and not adapters:
        raise ValueError(
            f"{study}: nothing to analyze; expected {PRETRAIN_FILE} and {FULL_FINETUNE_FILE}"
            f" and/or PEFT adapters in {ADAPTERS_DIR}/rank_<r>_seed_<s>/"
        )

    layers = {**weight_layers(pretrain or {}), **weight_layers(full or {})}
    modules = {module for adapter in adapters for module in adapter.modules}
    module_to_layer = match_modules(modules, layers)
    rows: list[dict] = []
    spectra = {}
    if pretrain is not None and full is not None:
        adapted = set(module_to_layer.values())
        spectrum, updates = spectrum_rows(pretrain, full, adapted, notes)
        rows += spectrum
        spectra = {layer: update.s for layer, update in updates.items()}
        if adapters:
            accuracy = accuracy_lookup(study, notes)
            rows += lora_vs_full_rows(updates, adapters, module_to_layer, accuracy, notes)
    else:
        notes.append("spectrum and lora_vs_full need both checkpoints; skipped")
    if len(adapters) >= 2:
        rows += subspace_rows(adapters, module_to_layer)
    else:
        notes.append(f"{len(adapters)} adapter(s): subspace similarity needs two; skipped")

    table = build_table(rows)
    write_csv_atomic(table, study / ANALYSIS_CSV)
    figures = []
    if make_plots:
        if spectra:
            figures.append(plot_spectrum(spectra, study / SPECTRUM_PNG))
        if len(adapters) >= 2:
            figures += draw_subspace_figures(study, adapters, module_to_layer, notes)
    table.attrs["notes"] = notes
    table.attrs["figures"] = figures
    for note in notes:
        logger.info("analysis of %s: %s", study, note)
    return table
