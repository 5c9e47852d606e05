"""Record: the one place that turns a finished or failed run into a `RunResult` and writes it
(the run's `result.json`, then the study's `results.csv`).

Every runner (sequential, fused, pool) hands its runs here: `finished_result` for a run that
trained and tested, `failed_result` for one that did not, `record` to write either.

A run *diverged* (status `diverged`: a result, never chosen, never averaged in) when its
training loss went non-finite (the `FloatingPointError` the task modules raise), its test loss
is non-finite, or, in a finetune stage, its validation accuracy is at chance:
val_acc ≤ 1/k + CHANCE_MARGIN, k being the number of classes the run trains on.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from lora_lab._atomic import atomic_write_text
from lora_lab.lora import count_parameters, lora_delta_weight, lora_layers
from lora_lab.models import TaskModule, read_weights
from lora_lab.pipeline.methods import method_of
from lora_lab.pipeline.plan import PlannedRun
from lora_lab.pipeline.resume import CHECKPOINT_FILE, IDENTITY_FILE
from lora_lab.report.selection import selected_mask
from lora_lab.results import (
    DIVERGED,
    RESULTS_CSV,
    RunResult,
    find_results,
    results_frame,
    write_result,
)

log = logging.getLogger(__name__)

#: Accuracy points above 1/k that still count as guessing (see the module docstring).
CHANCE_MARGIN = 0.05
#: The stages whose runs compete for a learning rate: the chance rule applies to them.
FINETUNE_STAGES = ("full_finetune", "lora")


def chance_level(datamodule: Any) -> float | None:
    """1/k for a classification datamodule training on k classes; None for regression."""
    classes = getattr(datamodule, "train_class_indices", None)
    count = len(classes) if classes else getattr(datamodule, "num_classes", None)
    return 1.0 / count if count else None


def divergence(
    stage: str, val_acc: float | None, test_loss: float | None, chance: float | None
) -> str:
    """Why a run that trained counts as diverged ("" when it does not): a non-finite test loss,
    or a finetune run's validation accuracy at chance (≤ 1/k + CHANCE_MARGIN)."""
    if test_loss is not None and not math.isfinite(test_loss):
        return "test loss is not finite"
    if stage not in FINETUNE_STAGES or val_acc is None or chance is None:
        return ""
    if val_acc <= chance + CHANCE_MARGIN:
        return (
            f"validation accuracy {val_acc:.4f} is at chance (≤ 1/{round(1 / chance)} + "
            f"{CHANCE_MARGIN:g})"
        )
    return ""


def tested_fields(
    metrics: dict[str, float], module: TaskModule, datamodule: L.LightningDataModule
) -> dict[str, Any]:
    """A row's test columns from the test metrics and the module's per-class accuracy and
    confusion matrix (rows: the tested classes; columns: every class the network predicts)."""
    out: dict[str, Any] = {
        "test_loss": float(metrics["test_loss"]),
        "test_acc": float(metrics["test_acc"]) if "test_acc" in metrics else None,
        "per_class_acc": {},
    }
    per_class, confusion = module.per_class_test_acc, module.test_confusion
    if per_class is not None:
        indices = getattr(datamodule, "class_indices", None) or range(len(per_class))
        names = getattr(datamodule, "class_names", None) or [str(i) for i in range(len(per_class))]
        out["per_class_acc"] = {names[i]: round(float(per_class[i]), 6) for i in indices}
        if confusion is not None:
            counts = {names[i]: [int(n) for n in confusion[i]] for i in indices}
            out["confusion"] = {"predicted": names[: len(confusion)], "counts": counts}
    return out


def trained_fields(module: TaskModule, datamodule: Any) -> dict[str, Any]:
    """What a row records of the run's own training: the classes it trained on (a
    classification task's), and for LoRA the rank at which every adapted layer is full rank."""
    classes = getattr(datamodule, "selected_class_names", None)
    return {"train_classes": classes, "full_rank_at": getattr(module, "full_rank_at", None)}


def relative_delta_error(
    module: TaskModule, datamodule: Any, pretrained: Path | None
) -> float | None:
    """‖ΔW_learned − ΔW_true‖_F / ‖ΔW_true‖_F when the task knows its true update."""
    true_delta = getattr(datamodule, "true_delta", None)
    if true_delta is None or pretrained is None:
        return None
    layers = lora_layers(module.network)
    if layers:
        (layer,) = layers.values()
        learned = lora_delta_weight(layer).detach()
    else:
        (name,) = [n for n, p in module.network.named_parameters() if p.ndim == 2]
        learned = module.network.get_parameter(name).detach() - read_weights(pretrained)[name]
    true_delta = true_delta.to(learned)
    return float(torch.linalg.norm(learned - true_delta) / torch.linalg.norm(true_delta))


def finished_result(
    run_cfg: DictConfig,
    module: TaskModule,
    datamodule: Any,
    tested: dict[str, Any],
    *,
    source_test_acc: float | None,
    train_seconds: float,
    epochs: int,
    identity: str | None,
    pretrained: Path | None,
    artefact: str,
    pass_id: str = "",
    val_acc: float | None = None,
) -> RunResult:
    """The result of a run that trained and tested.

    Args:
        run_cfg: The run's config, with `run_id` set.
        module: The trained module.
        datamodule: Its data (for the fingerprint and, on the linear-shift task, ΔW's error).
        tested: From `tested_fields`.
        source_test_acc: Pretrain only: the accuracy on its own task.
        train_seconds: Time spent training (a fused pass's time shared out over its runs).
        epochs: Finished epochs.
        identity: The run's identity.
        pretrained: The weights the run started from.
        artefact: The adapter folder or weights file the run saved, relative to the study.
        pass_id: The training pass that trained it; "" for a run trained on its own.
        val_acc: The last epoch's validation accuracy (learning rates are chosen by it).
    """
    stage, run_id, lora = run_cfg.stage, run_cfg.run_id, run_cfg.stage == "lora"
    counts = count_parameters(module.network)
    fingerprint = getattr(datamodule, "fingerprint", None)
    delta_error = relative_delta_error(module, datamodule, pretrained)
    why = divergence(stage, val_acc, tested["test_loss"], chance_level(datamodule))
    return RunResult(
        run_id=run_id,
        stage=stage,
        rank=int(run_cfg.lora.rank) if lora else None,
        alpha=float(run_cfg.lora.alpha) if lora else None,
        seed=int(run_cfg.seed),
        learning_rate=float(run_cfg.module.optimizer.lr),
        method=method_of(run_cfg.lora) if lora else None,
        trainable_params=counts["trainable"],
        total_params=counts["total"],
        val_acc=None if val_acc is None else float(val_acc),
        source_test_acc=source_test_acc,
        train_seconds=round(train_seconds, 3),
        epochs=epochs,
        run_dir=f"runs/{run_id}",
        pass_id=pass_id or run_id,
        extra={} if delta_error is None else {"delta_rel_error": delta_error},
        identity=identity,
        artefact=artefact,
        data_fingerprint=fingerprint() if callable(fingerprint) else None,
        status=DIVERGED if why else "ok",
        error=why,
        **(tested | trained_fields(module, datamodule)),
    )


def failed_result(run: PlannedRun, error: BaseException, pass_id: str = "") -> RunResult:
    """The result of a run that failed (or could not start), with the error's first line; a
    non-finite training loss (`FloatingPointError`) makes it `diverged` instead.

    Args:
        run: The planned run.
        error: What stopped it.
        pass_id: The training pass it belonged to; "" for a run trained on its own.
    """
    text = str(error).strip()
    return RunResult(
        run_id=run.run_id,
        stage=run.stage,
        rank=run.rank,
        alpha=float(run.cfg.lora.alpha) if run.stage == "lora" else None,
        seed=run.seed,
        learning_rate=float(run.cfg.module.optimizer.lr),
        method=method_of(run.cfg.lora) if run.stage == "lora" else None,
        run_dir=f"runs/{run.run_id}",
        pass_id=pass_id or run.run_id,
        status=DIVERGED if isinstance(error, FloatingPointError) else "failed",
        error=f"{type(error).__name__}: {text.splitlines()[0] if text else ''}",
        identity=run.identity,
    )


def record(run_cfg: DictConfig, study_dir: Path, result: RunResult, env: dict[str, Any]) -> None:
    """Write a run's `result.json` (with its resolved config and environment). A finished (or
    diverged) run's resume checkpoint and its identity marker have done their job once the
    result is on disk (which holds the identity too): they are removed."""
    config = OmegaConf.to_container(run_cfg, resolve=True)
    write_result(study_dir / result.run_dir, result.to_record(config=config, environment=env))
    if result.status in ("ok", DIVERGED):
        (study_dir / result.run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        (study_dir / result.run_dir / IDENTITY_FILE).unlink(missing_ok=True)


def write_results_csv(root: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Rebuild `<root>/results.csv` from every `result.json` below `root`, atomically, with
    the `selected` column the report's learning-rate choice gives.

    Returns:
        The table and the corrupt-file messages from `find_results`.
    """
    results, problems = find_results(root)
    for problem in problems:
        log.warning(problem)
    frame = results_frame(results, select=selected_mask)
    atomic_write_text(Path(root) / RESULTS_CSV, frame.to_csv(index=False), fsync=True)
    return frame, problems
