"""Fused runner (`sweep.fused=true`, the default): the LoRA runs that share a frozen network
and the data (see `fusion` for which do) train together, in one pass over the data, as one
`FusedLoRAModule` under the stock Lightning `Trainer`.

Each member is built exactly as `run_stage` builds it (seeded by its run's seed), so with
dropout off a fused adapter equals its sequential one up to float rounding.

A group is one training pass, named `fused_<hash>` in the `pass` column of its rows. The pass
saves `passes/<pass>/last.ckpt` at every epoch end; an interrupted pass resumes from it,
and a finished one removes its folder.
Outputs are those of a sequential sweep: per run `runs/<run_id>/result.json`,
`runs/<run_id>/logs/metrics.csv` from the run's configured loggers, and its adapter.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from lora_lab.lora import save_adapter
from lora_lab.lora.grouped import check_grouped
from lora_lab.models import TaskModule
from lora_lab.models.fused import FusedLoRAModule
from lora_lab.pipeline.builders import build_module, single_device_trainer
from lora_lab.pipeline.checkpointing import (
    FinishedEpochs,
    epoch_checkpoint,
    log_before,
    prepend_log,
    resume_point,
)
from lora_lab.pipeline.console import progress_options, say
from lora_lab.pipeline.cpu import ThreadChooser, retain_freed_memory
from lora_lab.pipeline.fusion import TAKEN_OVER, Grouping, describe, fusable, step_options
from lora_lab.pipeline.plan import PlannedRun
from lora_lab.pipeline.progress import Progress
from lora_lab.pipeline.record import (
    failed_result,
    finished_result,
    record,
    tested_fields,
)
from lora_lab.pipeline.run_config import adapter_name_for, run_id_for
from lora_lab.pipeline.sequential import say_outcome
from lora_lab.pipeline.threads import ThreadBudget
from lora_lab.results import RunResult

PROBE_SIZE = 16
PASSES = "passes"


def _say(message: str) -> None:
    say(f"    {message}")


def run_fused(
    runs: Sequence[PlannedRun],
    study_dir: Path,
    pretrained: Path,
    env: dict[str, Any],
    progress: Progress | None = None,
    grouping: Grouping | None = None,
) -> tuple[list[RunResult], list[PlannedRun]]:
    """Train every fusable group of `runs`; say in one line why any other run is not fused.

    Args:
        runs: The LoRA runs to train.
        study_dir: The study folder.
        pretrained: The pretrain checkpoint the runs start from.
        env: The environment recorded with each result.
        progress: The study's progress, told as each pass starts and ends (and which runs
            it finished); None: each pass is said alone.
        grouping: `fusion.fusable(runs)`, where the caller has it already; None: found here.

    Returns:
        The result rows of the fused runs (already recorded), and the runs left to run
        sequentially (not fusable, or in a group that failed to build), in plan order.
    """
    groups, alone = fusable(runs) if grouping is None else grouping
    for reason, items in itertools.groupby(alone, key=lambda item: item[1]):
        skipped = [run for run, _ in items]
        how = "it runs on its own" if len(skipped) == 1 else "they run one after another"
        reason = reason.removesuffix("; they run one after another")  # some reasons say it
        _say(f"not fused: {describe(skipped)}: {reason}; {how}")
    results: list[RunResult] = []
    sequential = [run for run, _ in alone]
    for group in groups:
        what = f"fused: {describe(group)}: {len(group)} runs train in one pass"
        if progress is None:
            _say(what)
        else:
            progress.begin_pass(group, what)
        try:
            done = run_fused_group(group, study_dir, pretrained, env)
        except Exception as error:  # never lose the runs: they go the sequential way
            # the last line: a spawned worker's error carries its whole traceback
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            text = lines[-1] if lines else type(error).__name__
            _say(f"not fused: {describe(group)}: {text}; they run one after another")
            sequential += group
            if progress is not None:
                progress.pass_failed(group)
            continue
        results += done
        if progress is not None:
            progress.end_pass(group, done)
    order = {id(run): index for index, run in enumerate(runs)}
    return results, sorted(sequential, key=lambda run: order[id(run)])


def train_fused(
    indices: Sequence[int],
    progress: Progress,
    pretrained: Path,
    env: dict[str, Any],
    grouping: Grouping | None = None,
) -> list[int]:
    """The study's step: train the planned LoRA runs at `indices` in fused groups.

    Args:
        indices: Positions in the plan (`progress.runs`) of LoRA runs still to do.
        progress: The study's progress; told as each fused run ends.
        pretrained: The pretrain checkpoint the runs start from.
        env: The environment recorded with each result.
        grouping: `fusion.fusable` of those runs, where the caller has it already.

    Returns:
        The positions of the runs left to run on their own, in plan order.
    """
    runs = progress.runs
    todo = [runs[i] for i in indices]
    _, alone = run_fused(todo, progress.study_dir, pretrained, env, progress, grouping)
    position = {id(runs[i]): i for i in indices}
    return [position[id(run)] for run in alone]


@dataclass
class Member:
    """One run of a fused pass: its per-run config, module (network + adapter) and loggers."""

    run: PlannedRun
    cfg: DictConfig
    module: TaskModule
    loggers: list[Any]

    @classmethod
    def build(cls, run: PlannedRun, study_dir: Path, pretrained: Path) -> Member:
        """Build the run's module exactly as `run_stage` does, so it starts from the same init."""
        run_cfg = copy.deepcopy(run.cfg)
        # A bare PlannedRun (tests) gets run_stage's default names.
        run.run_id = run.run_id or run_id_for("lora", run.rank, float(run_cfg.lora.alpha), run.seed)
        run.adapter = run.adapter or adapter_name_for(int(run.rank or 0), run.seed)
        run_dir = study_dir / "runs" / run.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        with open_dict(run_cfg):
            run_cfg.run_id, run_cfg.run_dir = run.run_id, str(run_dir)
        L.seed_everything(int(run_cfg.seed), workers=True, verbose=False)
        instantiate(run_cfg.data)  # run_stage builds the data first; keep the RNG in step
        module = build_module(run_cfg, instantiate(run_cfg.model), pretrained)
        loggers = [instantiate(c) for c in run_cfg.logger.values()] if run_cfg.get("logger") else []
        return cls(run, run_cfg, module, loggers)


def pass_identity(group: Sequence[PlannedRun]) -> str:
    """A hash of the members' identities, in order: a checkpoint fits only the same pass."""
    text = "\n".join(f"{run.run_id}:{run.identity}" for run in group)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_pass(
    group: Sequence[PlannedRun], study_dir: Path, pretrained: Path
) -> tuple[list[Member], FusedLoRAModule, Any]:
    """The members, their fused module and the shared DataModule of one pass.

    The members' networks share one set of frozen weights (`share_frozen`): merging one of
    them (`merge_lora`) would change the others too, so the pass never merges.

    Raises:
        GroupingError: If the networks cannot be fused.
    """
    members = [Member.build(run, study_dir, pretrained) for run in group]
    steps = step_options(members[0].cfg)  # clipping and accumulation, applied per member
    module = FusedLoRAModule([m.module for m in members], [m.loggers for m in members], steps)
    datamodule = instantiate(members[0].cfg.data)  # equal for all members (the fusion key)
    datamodule.prepare_data()
    datamodule.setup("fit")
    # A probe of K rows could pass a [B, ...] input off as [K, B, ...]: avoid that size.
    probe_rows = PROBE_SIZE + (len(members) == PROBE_SIZE)
    probe = next(iter(datamodule.val_dataloader()))[0][:probe_rows]
    check_grouped(module.grouped, [m.module.network for m in members], probe)
    return members, module, datamodule


def run_fused_group(
    group: Sequence[PlannedRun], study_dir: Path, pretrained: Path, env: dict[str, Any]
) -> list[RunResult]:
    """Train a group from `fusable` in one pass under a Lightning Trainer; test it; save and
    record every run as `execute` does.

    Returns:
        One result row per run, in group order (a run whose loss went non-finite, or whose
        validation accuracy is at chance, has status "diverged"; the others are unaffected).

    Raises:
        GroupingError: If the networks cannot be fused (nothing is recorded then).
    """
    members, module, datamodule = build_pass(group, study_dir, pretrained)
    identity = pass_identity(group)
    pass_id = f"fused_{identity[:8]}"
    pass_dir = study_dir / PASSES / pass_id
    pass_dir.mkdir(parents=True, exist_ok=True)
    resume_from, epoch = resume_point(pass_dir, identity, pass_id)
    cfg = members[0].cfg
    callbacks = [*(instantiate(cfg.trainer.get("callbacks")) or []), FinishedEpochs()]
    # The budget first: each epoch's ThreadChooser trial starts from it.
    callbacks += [ThreadBudget(cfg), ThreadChooser()]
    callbacks += [epoch_checkpoint(pass_dir)]
    progress, progress_callbacks = progress_options(cfg.trainer, f"{pass_id} ({len(members)} runs)")
    trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=callbacks + progress_callbacks,
        enable_checkpointing=True,
        default_root_dir=str(pass_dir),
        **progress,
        **TAKEN_OVER,  # the module applies them per member
    )
    # Before the loggers open their files (a CSV logger's writer deletes an old metrics.csv).
    earlier = [log_before(Path(m.cfg.run_dir), epoch) for m in members]
    for member in members:
        for logger in member.loggers:
            logger.log_hyperparams(datamodule.hparams)  # hparams.yaml, as the Trainer writes
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # reproducible dropout
    retain_freed_memory()
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    for member, rows in zip(members, earlier, strict=True):
        if rows is not None:
            prepend_log(Path(member.cfg.run_dir), rows)
    epochs = int(trainer.callback_metrics.get(FinishedEpochs.KEY, trainer.current_epoch))
    tester = trainer if trainer.world_size == 1 else single_device_trainer(cfg, pass_dir)
    if module.indices():
        tester.test(module, datamodule=datamodule, verbose=False)
    # Under a multi-process strategy the workers wrote the members' logs; the parent's loggers
    # never saw those rows, and a CSV logger would rewrite the file with the test row alone
    # (the sequential path tests without a logger then, too).
    log_test = trainer.world_size == 1
    results = [
        _finish(k, m, module, datamodule, pretrained, study_dir, pass_id, seconds, epochs, log_test)
        for k, m in enumerate(members)
    ]
    for member, result in zip(members, results, strict=True):
        record(member.run.cfg, study_dir, result, env)  # as `execute` records it
    remove_pass(pass_dir)  # every row is on disk now
    return results


def remove_pass(pass_dir: Path) -> None:
    """Remove a pass's resume folder (its checkpoint and identity), and `passes/` once empty."""
    shutil.rmtree(pass_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # other passes' folders are still there
        pass_dir.parent.rmdir()


def _finish(
    k: int,
    member: Member,
    module: FusedLoRAModule,
    datamodule: Any,
    pretrained: Path,
    study_dir: Path,
    pass_id: str,
    seconds: float,
    epochs: int,
    log: bool = True,
) -> RunResult:
    """Member k's row: its test row logged (if `log`), its adapter saved, its loggers
    finalised."""
    tested = module.test_metrics.get(k)
    if tested is None:
        error = FloatingPointError(module.member_error(k) or "training loss is not finite")
        for logger in member.loggers:
            logger.finalize("failed")
        result = failed_result(member.run, error, pass_id)  # `diverged`: a FloatingPointError
        say_outcome(member.run, result)
        return result
    for logger in member.loggers if log else []:
        logger.log_metrics({**tested, "epoch": epochs}, step=int(module.batches_seen))
        logger.finalize("success")
    save_adapter(member.module.network, study_dir / "adapters" / member.run.adapter)
    result = finished_result(
        member.cfg,
        member.module,
        datamodule,
        tested_fields(tested, member.module, datamodule),
        source_test_acc=None,
        # The pass's training time, shared out: the column still sums to the time spent.
        train_seconds=seconds / len(module.members),
        epochs=epochs,
        identity=member.run.identity or None,
        pretrained=pretrained,
        pass_id=pass_id,
        val_acc=module.val_metrics.get(k, {}).get("val_acc"),
        artefact=f"adapters/{member.run.adapter}",
    )
    say_outcome(member.run, result)  # at chance: diverged
    return result
