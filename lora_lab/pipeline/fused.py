"""Fused runner (`sweep.fused=true`, the default): the LoRA runs that share a frozen network
and the data (see `fusion` for which do) train together, in one pass over the data, as one
`FusedLoRAModule` under the stock Lightning `Trainer`.

Each member is built exactly as `run_stage` builds it (seeded by its run's seed), so with
dropout off a fused adapter equals its sequential one up to float rounding: both go through the
one run lifecycle (`lifecycle`: folder, loggers, Trainer callbacks, resume point, log rows,
tester, artefact and result); a fused pass adds the `ThreadChooser`.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from lora_lab.lora.grouped import check_grouped
from lora_lab.models import TaskModule
from lora_lab.models.fused import FusedLoRAModule
from lora_lab.pipeline.console import say
from lora_lab.pipeline.cpu import retain_freed_memory
from lora_lab.pipeline.fusion import Grouping, describe, fusable, pass_config, step_options
from lora_lab.pipeline.lifecycle import Fit, RunSetup, TrainingPass
from lora_lab.pipeline.plan import PlannedRun
from lora_lab.pipeline.progress import Progress
from lora_lab.pipeline.record import failed_result, record, tested_fields
from lora_lab.pipeline.sequential import say_outcome
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
    """One run of a fused pass: its setup (config, folder, loggers) and module (network +
    adapter)."""

    run: PlannedRun
    setup: RunSetup
    module: TaskModule

    @property
    def cfg(self) -> DictConfig:
        return self.setup.cfg

    @property
    def loggers(self) -> list[Any]:
        return self.setup.loggers

    @classmethod
    def build(cls, run: PlannedRun, study_dir: Path, pretrained: Path) -> Member:
        """Build the run's module exactly as `run_stage` does, so it starts from the same init."""
        setup = RunSetup.open(
            copy.deepcopy(run.cfg),
            study_dir,
            run_id=run.run_id or None,
            adapter=run.adapter or None,
            identity=run.identity or None,
            pretrained=pretrained,
        )
        # A bare PlannedRun (tests) gets run_stage's default names.
        run.run_id, run.adapter = setup.cfg.run_id, setup.adapter
        module, _ = setup.build()  # the data too: the RNG stays in step with run_stage
        return cls(run, setup, module)


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
    cfg = members[0].cfg
    setups = [member.setup for member in members]
    training = TrainingPass(  # its Trainer without the options the module applies per member
        pass_config(cfg),
        pass_dir,
        pass_id,
        setups,
        identity=identity,
        loggers=False,
        choose_threads=True,
    )
    for member in members:
        for logger in member.loggers:
            logger.log_hyperparams(datamodule.hparams)  # hparams.yaml, as the Trainer writes
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # reproducible dropout
    retain_freed_memory()
    fit = training.fit(module, datamodule)
    if module.indices():
        training.tester().test(module, datamodule=datamodule, verbose=False)
    # Under a multi-process strategy the workers wrote the members' logs; the parent's loggers
    # never saw those rows, and a CSV logger would rewrite the file with the test row alone
    # (the sequential path tests without a logger then, too).
    log_test = fit.trainer.world_size == 1
    results = [
        _finish(k, member, module, datamodule, fit, pass_id, log_test)
        for k, member in enumerate(members)
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
    fit: Fit,
    pass_id: str,
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
        logger.log_metrics({**tested, "epoch": fit.epochs}, step=int(module.batches_seen))
        logger.finalize("success")
    result = member.setup.finish(
        member.module,
        datamodule,
        tested_fields(tested, member.module, datamodule),
        fit,
        val_acc=module.val_metrics.get(k, {}).get("val_acc"),
        pass_id=pass_id,
    )
    say_outcome(member.run, result)  # at chance: diverged
    return result
