"""The runs a study's analysis reads, found through their `result.json` records.

Each run's identity (stage, rank, alpha, learning rate, seed, method), its test accuracy and the
file it left (`artefact`: an adapter folder or a weights file, relative to the study) come from
its record, read with `lora_lab.results`; folder and file names are never parsed. A record that
cannot be used (a failed run, or one written before records named their artefact) is skipped
and described in `notes` rather than raised: a half-finished or older study stays analysable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from lora_lab.models import WeightsError, read_weights
from lora_lab.results import RESULTS_CSV, RunResult, find_results, read_results


@dataclass(frozen=True)
class StudyRun:
    """One finished run whose artefact the analysis can read.

    Attributes:
        result: The run's identity and metrics, from its `result.json`.
        path: Its artefact: the adapter folder (LoRA) or the weights file (pretrain, full
            finetune).
        model: The `_target_` node of the network it trained (`config.model` of the record);
            None when the record holds no config.
        label: What tables and figures call it: the artefact's name (`rank_4_seed_0`), with
            its job folder in front under a multirun root (`1/adapters/rank_4_seed_0`), where
            several jobs hold an adapter of one name.
    """

    result: RunResult
    path: Path
    model: Mapping[str, Any] | None
    label: str = ""


@dataclass(frozen=True)
class StudyRuns:
    """The runs of a study that the analysis compares.

    Attributes:
        pretrain: The pretrained network's run, None when there is none.
        full_finetune: The full finetune compared with (see `choose_full_finetune`).
        lora: Every finished LoRA run, in record order.
    """

    pretrain: StudyRun | None = None
    full_finetune: StudyRun | None = None
    lora: list[StudyRun] = field(default_factory=list)


def find_runs(study: Path, notes: list[str]) -> StudyRuns:
    """The usable runs below `study`, by stage; what was skipped and why goes to `notes`.

    LoRA runs are those `results.csv` marks `selected` (each configuration at its learning
    rate chosen on validation); every finished one when the table is unreadable.
    """
    records, problems = find_results(study)
    notes.extend(problems)
    by_stage: dict[str, list[StudyRun]] = {}
    for record in records:
        run = _usable_run(study, record, notes)
        if run is not None:
            by_stage.setdefault(run.result.stage, []).append(run)
    pretrains = sorted(by_stage.get("pretrain", []), key=_seed_then_id)
    if len(pretrains) > 1:
        notes.append(f"{len(pretrains)} pretrain runs; using {pretrains[0].result.run_id}")
    lora, full = by_stage.get("lora", []), by_stage.get("full_finetune", [])
    # Only a study with a choice (several learning rates or baselines) needs its table.
    choice = len(full) > 1 or len({run.result.learning_rate for run in lora}) > 1
    selected = selected_run_ids(study, notes) if choice else set()
    chosen = [run for run in lora if run.result.run_id in selected]
    if len(chosen) < len(lora) and selected:
        notes.append(
            f"{len(lora) - len(chosen)} LoRA run(s) at a learning rate not chosen on validation"
            " (not `selected` in results.csv); skipped"
        )
    return StudyRuns(
        pretrain=pretrains[0] if pretrains else None,
        full_finetune=choose_full_finetune(full, selected),
        lora=chosen if selected else lora,
    )


def selected_run_ids(study: Path, notes: list[str]) -> set[str]:
    """The run ids `results.csv` marks `selected`; empty (with a note) when it is unreadable."""
    try:
        table = read_results(study / RESULTS_CSV)
    except ValueError as error:
        notes.append(
            f"{error}: the learning rates chosen on validation are unknown; every finished run "
            "is analysed and the lowest-seed full finetune of any learning rate compared with"
        )
        return set()
    return set(table.loc[table["selected"].str.lower() == "true", "run_id"])


def _usable_run(study: Path, record: Mapping[str, Any], notes: list[str]) -> StudyRun | None:
    result = RunResult.from_record(record)
    if not result.ok:
        notes.append(f"run {result.run_id} {result.status} ({result.error or 'no error'}); skipped")
        return None
    if not result.artefact:
        # A study written before records named their artefact: its files are not guessed.
        notes.append(
            f"run {result.run_id}: result.json names no artefact (a study from before lora_lab "
            "recorded it); skipped: rerun the study with sweep.restart=true to analyse it"
        )
        return None
    # The artefact is relative to the run's own study, the folder that holds its
    # `runs/<run_id>/`: under a Hydra multirun each job folder is a study of its own.
    job = Path(result.run_dir).parent.parent
    config = record.get("config")
    model = config.get("model") if isinstance(config, Mapping) else None
    model = model if isinstance(model, Mapping) else None
    label = Path(result.artefact).name if job == Path() else (job / result.artefact).as_posix()
    return StudyRun(result, study / job / result.artefact, model, label)


def _seed_then_id(run: StudyRun) -> tuple[int, str]:
    seed = run.result.seed
    return (-1 if seed is None else int(seed), run.result.run_id)


def choose_full_finetune(runs: list[StudyRun], selected: set[str]) -> StudyRun | None:
    """The full finetune the analysis compares with.

    With one run, that run. When the baseline ran for several seeds or learning rates, the
    lowest-seed run among the `selected` ones (the learning rate chosen on validation);
    among all of them when none is selected.
    """
    if len(runs) <= 1:
        return runs[0] if runs else None
    chosen = [run for run in runs if run.result.run_id in selected] or runs
    return min(chosen, key=_seed_then_id)


def read_run_weights(
    run: StudyRun | None, stage: str, notes: list[str]
) -> dict[str, Tensor] | None:
    """The state dict a pretrain or full-finetune run saved, or None (with a note)."""
    if run is None:
        notes.append(f"no finished {stage} run with its weights file")
        return None
    try:
        return read_weights(run.path)
    except WeightsError as error:
        notes.append(f"run {run.result.run_id}: {error}; skipped")
        return None
