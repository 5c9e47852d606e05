"""Fused runner (`sweep.fused=true`, the default): the LoRA runs that share a frozen network
and the data train together, in one pass over the data, as one `FusedLoRAModule` under the
stock Lightning `Trainer`.

What makes a group: equal resolved `data`, `model`, `module` and `trainer` configs, apart
from what each adapter owns: `lora.rank`, `lora.alpha`, `lora.use_rslora`, `lora.init`,
`lora.dropout` and the optimizer and scheduler (`module.optimizer.lr` above all). The seed is
free, but `data.seed` follows it (it draws the validation split and the batch order), so runs
of different seeds form separate groups, each seeing exactly the data its sequential runs see;
fix `data.seed` to fuse across seeds. Each member is built exactly as `run_stage` builds it
(seeded by its run's seed), so with dropout off a fused adapter equals its sequential one up
to float rounding.

A group is one training pass, named `fused_<hash>` in the `pass` column of its rows. The pass
saves `passes/<pass>/last.ckpt` at every epoch end; an interrupted pass resumes from it.
Outputs are those of a sequential sweep: per run `runs/<run_id>/result.json`,
`runs/<run_id>/logs/metrics.csv` from the run's configured loggers, and its adapter.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from lora_lab.lora import inject_lora, save_adapter
from lora_lab.lora.grouped import GroupingError, check_groupable, check_grouped
from lora_lab.models import ClassifierModule
from lora_lab.models.fused import FusedLoRAModule
from lora_lab.pipeline.console import progress_options, say
from lora_lab.pipeline.cpu import ThreadChooser, retain_freed_memory
from lora_lab.pipeline.methods import lora_config_of
from lora_lab.pipeline.plan import PlannedRun
from lora_lab.pipeline.record import failed_result, record
from lora_lab.pipeline.resume import CHECKPOINT_FILE, flatten
from lora_lab.pipeline.stages import (
    FinishedEpochs,
    adapter_name_for,
    build_module,
    epoch_checkpoint,
    log_before,
    prepend_log,
    result_row,
    resume_point,
    run_id_for,
    single_device_trainer,
    test_fields,
)
from lora_lab.pipeline.threads import ThreadBudget

PROBE_SIZE = 16
PASSES = "passes"
# What each member owns: these may differ within a group.
# `init` is the adapter's own except for PiSSA, which also changes the frozen base (the key
# records `pissa` apart: those runs never join a group of others).
OWN_LORA_KEYS = ("rank", "alpha", "use_rslora", "init", "dropout", "method")
OWN_MODULE_KEYS = ("optimizer", "scheduler")
# Trainer options that manual optimization (one optimizer per member) cannot honour.
UNSUPPORTED_TRAINER = {
    "gradient_clip_val": "Lightning clips gradients only under automatic optimization",
    "accumulate_grad_batches": "Lightning accumulates gradients only under automatic optimization",
    "max_steps": "a fused pass counts one optimizer step per member, so max_steps would end it early",
}


def _say(message: str) -> None:
    say(f"    {message}")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True)


def _fusion_key(run_cfg: DictConfig) -> dict[str, Any]:
    """Everything that must be equal for runs to share one pass."""
    key = {group: _plain(run_cfg[group]) for group in ("data", "model", "trainer")}
    key["module"] = {k: v for k, v in _plain(run_cfg.module).items() if k not in OWN_MODULE_KEYS}
    key["lora"] = {k: v for k, v in _plain(run_cfg.lora).items() if k not in OWN_LORA_KEYS}
    key["lora"]["pissa"] = run_cfg.lora.get("init") == "pissa"
    return key


def _differences(key: dict[str, Any], other: dict[str, Any]) -> list[str]:
    mine, theirs = flatten(key), flatten(other)
    return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


def _unsupported(run_cfg: DictConfig) -> str | None:
    """Why runs with this config cannot be fused, or None if they can."""
    trainer = _plain(run_cfg.trainer)
    allowed = {"gradient_clip_val": (None, 0), "accumulate_grad_batches": (None, 1)}
    allowed["max_steps"] = (None, -1)
    for key, why in UNSUPPORTED_TRAINER.items():
        if trainer.get(key) not in allowed[key]:
            return f"trainer.{key}={trainer[key]!r}: {why}"
    if str(trainer.get("precision")) in ("16-mixed", "16", "16-true"):
        # Lightning's gradient scaler updates after every optimizer step: K times a batch.
        return (
            f"trainer.precision={trainer['precision']!r}: the fp16 gradient scaler would update "
            "once per member; fused passes run in 32-true, bf16-mixed or bf16-true"
        )
    if run_cfg.lora.get("loraplus_lr_ratio") is not None:
        return (
            f"lora.loraplus_lr_ratio={run_cfg.lora.loraplus_lr_ratio}: LoRA+ gives B its own "
            "learning rate, and a fused pass gives each member one"
        )
    network = instantiate(run_cfg.model)
    inject_lora(network, lora_config_of(run_cfg.lora))
    try:
        check_groupable([network])
    except GroupingError as error:
        return str(error)
    return None


def fusable(
    runs: Sequence[PlannedRun],
) -> tuple[list[list[PlannedRun]], list[tuple[PlannedRun, str]]]:
    """Split runs into groups that train fused and runs that must run alone, with the reason.

    Args:
        runs: Planned runs (normally the LoRA runs of a study), in plan order.

    Returns:
        `(groups, alone)`: groups of ≥ 2 LoRA runs, and `(run, one-line reason)` for the rest.
    """
    alone: list[tuple[PlannedRun, str]] = []
    buckets: list[tuple[dict[str, Any], list[PlannedRun]]] = []
    for run in runs:
        if run.stage != "lora":
            alone.append((run, "only LoRA runs are fused"))
            continue
        key = _fusion_key(run.cfg)
        match = next((members for other, members in buckets if other == key), None)
        if match is None:
            buckets.append((key, [run]))
        else:
            match.append(run)
    groups: list[list[PlannedRun]] = []
    for key, members in buckets:
        if len(members) == 1:
            alone.append((members[0], _why_alone(key, members, buckets)))
            continue
        reason = _unsupported(members[0].cfg)
        if reason is None:
            groups.append(members)
        else:
            alone.extend((member, reason) for member in members)
    return groups, alone


def _why_alone(
    key: dict[str, Any],
    members: list[PlannedRun],
    buckets: list[tuple[dict[str, Any], list[PlannedRun]]],
) -> str:
    others = [other for other, group in buckets if group is not members]
    if not others:
        return "no other run to fuse with"
    differ = min((_differences(key, other) for other in others), key=len)
    why = " (each seed draws its own split and batch order)" if differ == ["data.seed"] else ""
    return f"its {', '.join(differ)} differ from the other runs'{why}"


def describe(runs: Sequence[PlannedRun]) -> str:
    """`lora ranks 1,2,4 seed 0` for a list of runs."""
    ranks = ",".join(str(r) for r in dict.fromkeys(run.rank for run in runs))
    seeds = ",".join(str(s) for s in dict.fromkeys(run.seed for run in runs))
    return (
        f"lora rank{'s' if ',' in ranks else ''} {ranks} seed{'s' if ',' in seeds else ''} {seeds}"
    )


def run_fused(
    runs: Sequence[PlannedRun], study_dir: Path, pretrained: Path, env: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[PlannedRun]]:
    """Train every fusable group of `runs`; say in one line why any other run is not fused.

    Returns:
        The result rows of the fused runs (already recorded), and the runs left to run
        sequentially (not fusable, or in a group that failed to build), in plan order.
    """
    groups, alone = fusable(runs)
    for reason, items in itertools.groupby(alone, key=lambda item: item[1]):
        skipped = [run for run, _ in items]
        how = "it runs on its own" if len(skipped) == 1 else "they run one after another"
        reason = reason.removesuffix("; they run one after another")  # some reasons say it
        _say(f"not fused: {describe(skipped)}: {reason}; {how}")
    results: list[dict[str, Any]] = []
    sequential = [run for run, _ in alone]
    for group in groups:
        _say(f"fused: {describe(group)}: {len(group)} runs train in one pass")
        try:
            results += run_fused_group(group, study_dir, pretrained, env)
        except Exception as error:  # never lose the runs: they go the sequential way
            # the last line: a spawned worker's error carries its whole traceback
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            text = lines[-1] if lines else type(error).__name__
            _say(f"not fused: {describe(group)}: {text}; they run one after another")
            sequential += group
    order = {id(run): index for index, run in enumerate(runs)}
    return results, sorted(sequential, key=lambda run: order[id(run)])


@dataclass
class Member:
    """One run of a fused pass: its per-run config, module (network + adapter) and loggers."""

    run: PlannedRun
    cfg: DictConfig
    module: ClassifierModule
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
    module = FusedLoRAModule([m.module for m in members], [m.loggers for m in members])
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
) -> list[dict[str, Any]]:
    """Train a group from `fusable` in one pass under a Lightning Trainer; test it; save and
    record every run as `execute` does.

    Returns:
        One result row per run, in group order (a run whose loss went non-finite has status
        "failed"; the others are unaffected).

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
    (pass_dir / CHECKPOINT_FILE).unlink(missing_ok=True)  # every row is on disk now
    return results


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
) -> dict[str, Any]:
    """Member k's row: its test row logged (if `log`), its adapter saved, its loggers
    finalised."""
    tested = module.test_metrics.get(k)
    if tested is None:
        error = FloatingPointError(module.errors[k] or "training loss is not finite")
        for logger in member.loggers:
            logger.finalize("failed")
        result = failed_result(member.run, error, pass_id)
        say(f"FAILED {member.run.label()}: {result['error']}", logging.ERROR)
        return result
    for logger in member.loggers if log else []:
        logger.log_metrics({**tested, "epoch": epochs}, step=int(module.batches_seen))
        logger.finalize("success")
    save_adapter(member.module.network, study_dir / "adapters" / member.run.adapter)
    return result_row(
        member.cfg,
        member.module,
        datamodule,
        test_fields(tested, member.module, datamodule),
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
