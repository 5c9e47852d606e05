"""`analyze_study`: read a study folder, write `analysis.csv` and the §7 figures.

The study is read through its runs' `result.json` records (`analysis.runs`) and the core
(`analysis.adapters`). Everything is optional: with the pretrain and full-finetune weights
only, the table holds spectra; with adapters only, subspace similarities; with both, also how
each LoRA update compares to the full one. What was skipped, and why, is returned in
`table.attrs["notes"]` and logged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from lora_lab._atomic import atomic_write_text
from lora_lab.analysis.adapters import load_adapter_runs
from lora_lab.analysis.measurements import (
    build_table,
    lora_vs_full_rows,
    spectrum_rows,
    subspace_rows,
)
from lora_lab.analysis.plots import SPECTRUM_PNG, draw_subspace_figures, plot_spectrum
from lora_lab.analysis.runs import StudyRuns, find_runs, read_run_weights

logger = logging.getLogger(__name__)

ANALYSIS_CSV = "analysis.csv"


def analyze_study(study_dir: str | os.PathLike[str], *, make_plots: bool = True) -> pd.DataFrame:
    """Analyses a study folder's weight updates (LoRA paper §7) into `<study>/analysis.csv`.

    Reads every run's `result.json` below the folder: the pretrain and (chosen) full-finetune
    weights and the LoRA adapters they name as their `artefact`, whichever exist.

    Args:
        study_dir: the study output folder.
        make_plots: also write `analysis_spectrum.png`, `analysis_subspace_<layer>.png` and
            `analysis_seeds_<layer>.png` into the folder.

    Returns:
        The long table, one row per measurement, `kind` in {"spectrum", "lora_vs_full",
        "subspace"} (columns in `lora_lab.analysis.measurements.COLUMNS`). `attrs["notes"]`
        lists what was skipped and why; `attrs["figures"]` the PNG paths written.

    Raises:
        ValueError: no finished run's weights or adapter could be read.
    """
    study = Path(study_dir)
    notes: list[str] = []
    runs = find_runs(study, notes) if study.is_dir() else StudyRuns()
    pretrain = read_run_weights(runs.pretrain, "pretrain", notes)
    full = read_run_weights(runs.full_finetune, "full_finetune", notes)
    # DoRA's ΔW depends on W: adapters are read on the pretrained network when there is one.
    pretrain_path = (
        runs.pretrain.path if runs.pretrain is not None and pretrain is not None else None
    )
    adapters = load_adapter_runs(runs.lora, pretrain_path, notes)
    if pretrain is None and full is None and not adapters:
        raise ValueError(
            f"{study}: nothing to analyze; no result.json of a finished run names a readable"
            " artefact (checkpoints/pretrain.safetensors, adapters/<name>/)"
        )

    adapted = {layer for adapter in adapters for layer in adapter.layers}
    rows: list[dict] = []
    spectra = {}
    if pretrain is not None and full is not None:
        spectrum, updates = spectrum_rows(pretrain, full, adapted, notes)
        rows += spectrum
        spectra = {layer: update.s for layer, update in updates.items()}
        if adapters:
            rows += lora_vs_full_rows(updates, adapters, notes)
    else:
        notes.append("spectrum and lora_vs_full need both checkpoints; skipped")
    if len(adapters) >= 2:
        rows += subspace_rows(adapters)
    else:
        notes.append(f"{len(adapters)} adapter(s): subspace similarity needs two; skipped")

    table = build_table(rows)
    atomic_write_text(study / ANALYSIS_CSV, table.to_csv(index=False))
    figures = []
    if make_plots:
        if spectra:
            figures.append(plot_spectrum(spectra, study / SPECTRUM_PNG))
        if len(adapters) >= 2:
            figures += draw_subspace_figures(study, adapters, notes)
    table.attrs["notes"] = notes
    table.attrs["figures"] = figures
    for note in notes:
        logger.info("analysis of %s: %s", study, note)
    return table
