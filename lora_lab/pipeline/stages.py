"""The three stages — pretrain, full finetune, LoRA finetune — as one `run_stage` function.

A stage is: per-run config (stage overrides applied) → DataModule + network → LightningModule
→ a fresh Trainer → fit → test → artefacts (weights or adapter) → a result row. The config is
the only input; `run_stage` returns the result and the built objects so tests can inspect them.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from lora_lab._atomic import atomic_write_text
from lora_lab.lora import count_parameters, lora_delta_weight, lora_layers, save_adapter
from lora_lab.models import ClassifierModule, lora_variant, read_weights, save_network_weights
from lora_lab.pipeline.console import progress_options, say
from lora_lab.pipeline.methods import lora_config_of, loraplus_ratio_of, method_of, method_patch
from lora_lab.pipeline.resume import resume_checkpoint
from lora_lab.pipeline.threads import ThreadBudget

log = logging.getLogger(__name__)

STAGES = ("pretrain", "full_finetune", "lora")

# Lightning prints a banner per Trainer and warns about num_workers=0 even though our batches
# are prebuilt tensors; for a sweep of many short runs that is noise, not information.
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
# A resumed or redone run reuses its folder on purpose (its log is merged back, see below).
warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
warnings.filterwarnings(
    "ignore", message=r".*Experiment logs directory .* exists and is not empty.*"
)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


@dataclass
class StageRun:
    """What one stage produced: its result row and the objects that made it."""

    result: dict[str, Any]
    module: ClassifierModule
    datamodule: L.LightningDataModule
    trainer: L.Trainer


def run_id_for(
    stage: str,
    rank: int | None = None,
    alpha: float | None = None,
    seed: int = 0,
    learning_rate: float | None = None,
    method: str | None = None,
) -> str:
    """A readable, unique folder name for a run, e.g. `lora_r8_a8_s0`.

    `learning_rate` and `method` are given only when a sweep varies them
    (`lora_dora_r8_a8_lr0.001_s0`), so the names of other studies stay as they were.
    """
    lr = f"_lr{learning_rate:g}" if learning_rate is not None else ""
    if stage != "lora":
        return stage + lr if stage == "full_finetune" else stage
    kind = f"_{method}" if method is not None else ""
    return f"lora{kind}_r{rank}_a{alpha:g}{lr}_s{seed}"


def adapter_name_for(
    rank: int,
    seed: int,
    alpha: float | None = None,
    learning_rate: float | None = None,
    method: str | None = None,
) -> str:
    """The folder under `adapters/` of a LoRA run: `rank_<r>_seed_<s>`, plus `_alpha_<a>`,
    `_lr_<lr>` and `_method_<m>` for the values a sweep varies (None: not varied, left out)."""
    name = f"rank_{rank}_seed_{seed}"
    if alpha is not None:
        name += f"_alpha_{alpha:g}"
    if learning_rate is not None:
        name += f"_lr_{learning_rate:g}"
    if method is not None:
        name += f"_method_{method}"
    return name


def stage_config(
    cfg: DictConfig,
    stage: str,
    *,
    rank: int | None = None,
    seed: int | None = None,
    alpha: float | None = None,
    learning_rate: float | None = None,
    method: str | None = None,
) -> DictConfig:
    """The config one run sees: `stages.<stage>` merged over the top-level groups.

    Args:
        cfg: The composed study config.
        stage: One of `STAGES`.
        rank: For LoRA runs, the rank of this run (sets `lora.rank`).
        seed: The run's seed (sets `seed`); None keeps `cfg.seed`.
        alpha: For LoRA runs, sets `lora.alpha` (None keeps it, by default `${lora.rank}`).
        learning_rate: Sets `module.optimizer.lr`, over `stages.<stage>.lr`.
        method: For LoRA runs, a `lora` option (`conf/lora/<method>.yaml`) whose method keys
            replace the study's (None keeps them).

    Returns:
        A new config; `cfg` is not modified.
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not a stage; choose one of {', '.join(STAGES)}")
    overrides = cfg.stages[stage]
    patch: dict[str, Any] = {
        "data": overrides.data,
        "module": overrides.module,
        "trainer": overrides.trainer,
        "stage": stage,
    }
    merged = OmegaConf.merge(cfg, patch)
    with _editable(merged):
        if overrides.classes is not None:
            merged.data.classes = overrides.classes
        if overrides.lr is not None:
            merged.module.optimizer.lr = overrides.lr
        if overrides.max_epochs is not None:
            merged.trainer.max_epochs = overrides.max_epochs
        if learning_rate is not None:
            merged.module.optimizer.lr = learning_rate
        if rank is not None:
            merged.lora.rank = rank
        if alpha is not None:
            merged.lora.alpha = alpha
        if method is not None:
            for key, value in method_patch(method).items():
                merged.lora[key] = value
        if seed is not None:
            merged.seed = seed
    return merged


class _editable:
    """Context manager that lifts Hydra's struct flag for pipeline-owned edits."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def __enter__(self) -> DictConfig:
        OmegaConf.set_struct(self.cfg, False)
        return self.cfg

    def __exit__(self, *exc: object) -> None:
        OmegaConf.set_struct(self.cfg, True)


def build_module(
    run_cfg: DictConfig, network: torch.nn.Module, pretrained: Path | None
) -> ClassifierModule:
    """Instantiate the stage's LightningModule (the LoRA subclass for the LoRA stage)."""
    stage = run_cfg.stage
    if stage != "pretrain" and pretrained is None:
        raise ValueError(f"stage={stage} needs pretrain_ckpt=<weights file>; none was given")
    if stage == "lora":
        lora_class = lora_variant(get_class(run_cfg.module._target_))
        lora_config = lora_config_of(run_cfg.lora)
        # Built objects go to the partial, not through instantiate's kwargs (which would turn
        # the LoRAConfig dataclass into a config node).
        factory = instantiate(
            run_cfg.module,
            _target_=f"{lora_class.__module__}.{lora_class.__qualname__}",
            _partial_=True,
        )
        return factory(
            network=network,
            lora=lora_config,
            pretrained=str(pretrained),
            loraplus_lr_ratio=loraplus_ratio_of(run_cfg.lora),
        )
    if stage == "full_finetune":
        from lora_lab.models import load_network_weights

        load_network_weights(network, pretrained)
    return instantiate(run_cfg.module, network=network)


def _test(
    trainer: L.Trainer, module: ClassifierModule, datamodule: L.LightningDataModule
) -> dict[str, Any]:
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    return test_fields(metrics, module, datamodule)


def test_fields(
    metrics: dict[str, float], module: ClassifierModule, datamodule: L.LightningDataModule
) -> dict[str, Any]:
    """A row's test columns from the test metrics and the module's per-class accuracy."""
    out: dict[str, Any] = {
        "test_loss": float(metrics["test_loss"]),
        "test_acc": float(metrics["test_acc"]) if "test_acc" in metrics else None,
        "per_class_acc": {},
    }
    per_class = module.per_class_test_acc
    if per_class is not None:
        indices = getattr(datamodule, "class_indices", None) or range(len(per_class))
        names = getattr(datamodule, "class_names", None) or [str(i) for i in range(len(per_class))]
        out["per_class_acc"] = {names[i]: round(float(per_class[i]), 6) for i in indices}
    return out


def relative_delta_error(
    module: ClassifierModule, datamodule: Any, pretrained: Path | None
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


def log_before(run_dir: Path, epochs: int) -> pd.DataFrame | None:
    """The CSV log rows of the first `epochs` epochs (CSVLogger rewrites its file on resume)."""
    path = run_dir / "logs" / "metrics.csv"
    if epochs <= 0 or not path.is_file():
        return None
    rows = pd.read_csv(path)
    return rows[rows["epoch"] < epochs] if "epoch" in rows else None


def prepend_log(run_dir: Path, earlier: pd.DataFrame) -> None:
    """Put the epochs logged before an interruption back in front of the resumed run's log."""
    path = run_dir / "logs" / "metrics.csv"
    later = pd.read_csv(path) if path.is_file() else earlier.iloc[0:0]
    atomic_write_text(path, pd.concat([earlier, later], ignore_index=True).to_csv(index=False))


def _checkpoint_epoch(path: Path) -> int | None:
    """The number of finished epochs a Lightning checkpoint holds, or None if unreadable."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        return int(checkpoint["epoch"]) + 1
    except Exception:  # a truncated or foreign file: the caller restarts the run
        return None


def resume_point(run_dir: Path, identity: str, name: str) -> tuple[Path | None, int]:
    """Where an interrupted run (or fused pass) with this identity resumes: its `last.ckpt`
    and the number of epochs it holds, or `(None, 0)` to start afresh. Writes the identity
    marker that the next attempt checks; an unreadable checkpoint is removed, with a warning.
    """
    resume_from = resume_checkpoint(run_dir, identity)
    (run_dir / "identity.txt").write_text(identity + "\n")
    if resume_from is None:
        return None, 0
    epoch = _checkpoint_epoch(resume_from)
    if epoch is None:
        log.warning("%s: %s is unreadable; starting the run again", name, resume_from)
        resume_from.unlink()
        return None, 0
    say(f"    resuming {name} after epoch {epoch} from {resume_from}")
    return resume_from, epoch


def epoch_checkpoint(folder: Path) -> ModelCheckpoint:
    """Lightning's own checkpointing: `last.ckpt` at every epoch end, nothing else kept."""
    return ModelCheckpoint(
        dirpath=folder,
        filename="last",
        monitor=None,
        save_top_k=1,  # with no monitor: the newest epoch, replacing the previous file
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )


class FinishedEpochs(Callback):
    """Puts the number of finished epochs into `trainer.callback_metrics` at the end of fit.

    A spawn-based strategy (`trainer=ddp`) trains in child processes and copies back only the
    weights and `callback_metrics`; the parent's own `trainer.current_epoch` stays 0.
    """

    KEY = "finished_epochs"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.callback_metrics[self.KEY] = torch.tensor(float(trainer.current_epoch))


def single_device_trainer(run_cfg: DictConfig, run_dir: Path) -> L.Trainer:
    """A one-device Trainer for testing after a multi-device fit.

    As Lightning advises, so that every test example counts once (a DistributedSampler pads
    the test set to a multiple of the device count); and it runs in this process, so the
    per-class accuracy the module keeps as an attribute is not lost in a spawned worker. No
    logger: a CSV logger created here would replace the metrics.csv the workers wrote.
    """
    trainer_cfg = copy.deepcopy(run_cfg.trainer)
    with _editable(trainer_cfg):
        trainer_cfg.strategy, trainer_cfg.devices, trainer_cfg.num_nodes = "auto", 1, 1
        trainer_cfg.pop("callbacks", None)
    return instantiate(
        trainer_cfg,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(run_dir),
    )


def result_row(
    run_cfg: DictConfig,
    module: ClassifierModule,
    datamodule: Any,
    tested: dict[str, Any],
    *,
    source_test_acc: float | None,
    train_seconds: float,
    epochs: int,
    identity: str | None,
    pretrained: Path | None,
    pass_id: str = "",
    val_acc: float | None = None,
    artefact: str | None = None,
) -> dict[str, Any]:
    """The result row of a finished run (`lora_lab.schema` names its columns).

    Args:
        run_cfg: The run's config, with `run_id` set.
        module: The trained module.
        datamodule: Its data (for the fingerprint and, on the linear-shift task, ΔW's error).
        tested: From `test_fields`.
        source_test_acc: Pretrain only: the accuracy on its own task.
        train_seconds: Time spent training (a fused pass's time shared out over its runs).
        epochs: Finished epochs.
        identity: The run's identity.
        pretrained: The weights the run started from.
        pass_id: The training pass that trained it; "" for a run trained on its own.
        val_acc: The validation accuracy after the last epoch (what learning rates are chosen
            by; None for regression).
        artefact: The adapter folder or weights file the run saved, relative to the study.
    """
    stage, run_id = run_cfg.stage, run_cfg.run_id
    counts = count_parameters(module.network)
    result: dict[str, Any] = {
        "run_id": run_id,
        "stage": stage,
        "rank": int(run_cfg.lora.rank) if stage == "lora" else None,
        "alpha": float(run_cfg.lora.alpha) if stage == "lora" else None,
        "seed": int(run_cfg.seed),
        "learning_rate": float(run_cfg.module.optimizer.lr),
        "method": method_of(run_cfg.lora) if stage == "lora" else None,
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        **tested,
        "val_acc": None if val_acc is None else float(val_acc),
        "source_test_acc": source_test_acc,
        "train_seconds": round(train_seconds, 3),
        "epochs": epochs,
        "run_dir": f"runs/{run_id}",
        "pass": pass_id or run_id,
        "status": "ok",
        "error": "",
        "identity": identity,
        "artefact": artefact,
    }
    fingerprint = getattr(datamodule, "fingerprint", None)
    if callable(fingerprint):
        result["data_fingerprint"] = fingerprint()
    delta_error = relative_delta_error(module, datamodule, pretrained)
    if delta_error is not None:
        result["delta_rel_error"] = delta_error
    if result["test_loss"] is not None and not math.isfinite(result["test_loss"]):
        result["status"], result["error"] = "failed", "test loss is not finite"
    return result


def run_stage(
    run_cfg: DictConfig,
    study_dir: Path,
    *,
    pretrained: Path | None = None,
    target_data: DictConfig | None = None,
    identity: str | None = None,
    run_id: str | None = None,
    adapter_name: str | None = None,
) -> StageRun:
    """Train and test one stage; save its weights or adapter; return its result row.

    Args:
        run_cfg: A config from `stage_config` (its `stage`, `seed`, `lora.rank` are this run's).
        study_dir: The study folder: runs go to `runs/<run_id>/`, pretrain and full-finetune
            weights to `checkpoints/`, adapters to `adapters/rank_<r>_seed_<s>/`.
        pretrained: Weights the finetune stages start from.
        target_data: For pretrain, the finetune stages' data config: when it differs from the
            pretrain data, `test_acc` is measured on it (accuracy before finetuning) and the
            pretrain task's own accuracy goes to `source_test_acc`.
        identity: The run's identity (`resume.run_identity`). With one, the run saves
            `last.ckpt` at the end of every epoch (only the latest is kept) and resumes from
            a `last.ckpt` left by an interrupted run with the same identity.
        run_id: The run's folder name; None derives it from stage, rank, alpha and seed.
        adapter_name: The LoRA adapter's folder under `adapters/`; None: `rank_<r>_seed_<s>`.

    Under a multi-process strategy (`trainer=ddp`) only `fit` runs in the spawned processes;
    everything else, every file write included, happens in this process, which is rank 0's
    parent. Testing then runs here on one device (see `single_device_trainer`).

    Returns:
        The result row and the objects that produced it.
    """
    stage, seed = run_cfg.stage, int(run_cfg.seed)
    rank = int(run_cfg.lora.rank) if stage == "lora" else None
    alpha = float(run_cfg.lora.alpha) if stage == "lora" else None
    run_id = run_id or run_id_for(stage, rank, alpha, seed)
    run_dir = study_dir / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    with _editable(run_cfg):
        run_cfg.run_id, run_cfg.run_dir = run_id, str(run_dir)

    L.seed_everything(seed, workers=True, verbose=False)
    datamodule = instantiate(run_cfg.data)
    network = instantiate(run_cfg.model)
    module = build_module(run_cfg, network, pretrained)
    loggers = [instantiate(c) for c in run_cfg.logger.values()] if run_cfg.get("logger") else []
    # Callbacks listed in the trainer config (e.g. trainer=ddp's replica check) come first.
    callbacks: list[Callback] = list(instantiate(run_cfg.trainer.get("callbacks")) or [])
    callbacks += [FinishedEpochs(), ThreadBudget(run_cfg)]
    resume_from, epoch = None, 0
    if identity is not None:
        resume_from, epoch = resume_point(run_dir, identity, run_id)
        callbacks.append(epoch_checkpoint(run_dir))
    progress, progress_callbacks = progress_options(run_cfg.trainer, run_id)
    trainer = instantiate(
        run_cfg.trainer,
        logger=loggers,
        callbacks=callbacks + progress_callbacks,
        enable_checkpointing=bool(callbacks),
        default_root_dir=str(run_dir),
        **progress,
    )

    start = time.perf_counter()
    earlier_log = log_before(run_dir, epoch if resume_from else 0)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
    train_seconds = time.perf_counter() - start
    if earlier_log is not None:
        prepend_log(run_dir, earlier_log)

    epochs = int(trainer.callback_metrics.get(FinishedEpochs.KEY, trainer.current_epoch))
    val_acc = trainer.callback_metrics.get("val_acc")  # the last epoch's; read before testing
    tester = trainer if trainer.world_size == 1 else single_device_trainer(run_cfg, run_dir)
    tested = _test(tester, module, datamodule)
    source_test_acc = None
    if stage == "pretrain":
        source_test_acc = tested["test_acc"]
        if target_data is not None and OmegaConf.to_container(
            target_data, resolve=True
        ) != OmegaConf.to_container(run_cfg.data, resolve=True):
            tested = _test(tester, module, instantiate(target_data))

    if stage == "lora":
        assert rank is not None
        artefact = f"adapters/{adapter_name or adapter_name_for(rank, seed)}"
        save_adapter(module.network, study_dir / artefact)
    else:
        artefact = f"checkpoints/{run_id}.safetensors"
        save_network_weights(module.network, study_dir / artefact)
    result = result_row(
        run_cfg,
        module,
        datamodule,
        tested,
        source_test_acc=source_test_acc,
        train_seconds=train_seconds,
        epochs=epochs,
        identity=identity,
        pretrained=pretrained,
        val_acc=None if val_acc is None else float(val_acc),
        artefact=artefact,
    )
    return StageRun(result=result, module=module, datamodule=datamodule, trainer=trainer)
