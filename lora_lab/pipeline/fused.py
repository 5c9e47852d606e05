"""Fused rank sweep (`sweep.fused=true`): the LoRA runs that differ only in rank, alpha and
seed train together, in one pass over the data.

What is shared: each batch is read once, and the frozen network runs once up to the first
adapted layer (`lora.grouped`); every adapter then has its own activations, stacked
`[K, B, ...]`. The loss is the sum of the per-adapter losses, so each adapter gets exactly the
gradient it would get alone; each keeps its own optimizer and scheduler (ReduceLROnPlateau
steps on its own `val_loss`); dropout masks are independent per adapter.

What makes a group: equal resolved `data`, `model`, `module`, `trainer` and `lora` configs
apart from `lora.rank` / `lora.alpha`. The seed is free, but `data.seed` follows it (it draws
the validation split and the batch order), so runs of different seeds form separate groups,
each seeing exactly the data its sequential runs see; fix `data.seed` to fuse across seeds.
Each adapter is built exactly as `run_stage` builds it (seeded by its run's seed), so with
dropout off a fused adapter equals its sequential one up to float rounding.

Outputs are those of a sequential sweep: per run `runs/<run_id>/result.json` (same columns;
`train_seconds` is the group's time divided by its size), `runs/<run_id>/logs/metrics.csv`
from the run's configured loggers, and `adapters/rank_<r>_seed_<s>/`.

This module decides which runs fuse and runs the groups; the training loop itself (one
forward pass per batch, per-member optimizer steps, testing and recording) is in
`pipeline.fused_training`.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lora_lab.lora import LoRAConfig, inject_lora
from lora_lab.lora.grouped import GroupingError, check_groupable
from lora_lab.pipeline.fused_training import FusedGroup

if TYPE_CHECKING:
    from lora_lab.pipeline.sweep import PlannedRun

# Trainer options the fused loop reproduces (max_epochs, limit_*), or that change nothing it
# computes. Any other option set in the config (gradient clipping, accumulation, callbacks, ...)
# keeps the runs sequential.
TRAINER_KEYS = {
    "_target_", "accelerator", "devices", "max_epochs", "deterministic", "precision",
    "enable_checkpointing", "enable_model_summary", "enable_progress_bar",
    "num_sanity_val_steps", "log_every_n_steps",
    "limit_train_batches", "limit_val_batches", "limit_test_batches",
}  # fmt: skip


def _say(message: str) -> None:
    print(f"    {message}", file=sys.stderr, flush=True)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True)


def _fusion_key(run_cfg: DictConfig) -> dict[str, Any]:
    """Everything that must be equal for runs to share one pass."""
    key = {group: _plain(run_cfg[group]) for group in ("data", "model", "module", "trainer")}
    key["lora"] = {k: v for k, v in _plain(run_cfg.lora).items() if k not in ("rank", "alpha")}
    return key


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _differences(key: dict[str, Any], other: dict[str, Any]) -> list[str]:
    mine, theirs = _flat(key), _flat(other)
    return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


def _unsupported(run_cfg: DictConfig) -> str | None:
    """Why runs with this config cannot be fused, or None if they can."""
    trainer = _plain(run_cfg.trainer)
    extra = sorted(k for k, v in trainer.items() if k not in TRAINER_KEYS and v is not None)
    if extra:
        return f"trainer.{extra[0]}={trainer[extra[0]]!r} is not supported by fused training"
    if str(trainer.get("precision", "32-true")) not in ("32-true", "32"):
        return f"trainer.precision={trainer['precision']!r}: fused training runs in float32 only"
    if trainer.get("accelerator", "cpu") != "cpu":
        return "fused training runs on the CPU only (trainer.accelerator=cpu)"
    network = instantiate(run_cfg.model)
    inject_lora(network, LoRAConfig(**_plain(run_cfg.lora)))
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
            others = [other for other, group in buckets if group is not members]
            if not others:
                alone.append((members[0], "no other run to fuse with"))
                continue
            differ = min((_differences(key, other) for other in others), key=len)
            why = (
                " (each seed draws its own split and batch order)"
                if differ == ["data.seed"]
                else ""
            )
            alone.append((members[0], f"its {', '.join(differ)} differ from the other runs'{why}"))
            continue
        reason = _unsupported(members[0].cfg)
        if reason is None:
            groups.append(members)
        else:
            alone.extend((member, reason) for member in members)
    return groups, alone


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
        sequentially (not fusable, or in a group that failed to build or train), in plan order.
    """
    groups, alone = fusable(runs)
    for reason, items in itertools.groupby(alone, key=lambda item: item[1]):
        skipped = [run for run, _ in items]
        how = "it runs on its own" if len(skipped) == 1 else "they run one after another"
        _say(f"not fused: {describe(skipped)}: {reason}; {how}")
    results: list[dict[str, Any]] = []
    sequential = [run for run, _ in alone]
    for group in groups:
        _say(f"fused: {describe(group)}: {len(group)} runs train in one pass")
        try:
            results += run_fused_group(group, study_dir, pretrained, env)
        except Exception as error:  # never lose the runs: they go the sequential way
            text = " ".join(str(error).split()) or type(error).__name__
            _say(f"not fused: {describe(group)}: {text}; they run one after another")
            sequential += group
    order = {id(run): index for index, run in enumerate(runs)}
    return results, sorted(sequential, key=lambda run: order[id(run)])


def run_fused_group(
    group: Sequence[PlannedRun], study_dir: Path, pretrained: Path, env: dict[str, Any]
) -> list[dict[str, Any]]:
    """Train a group from `fusable` in one pass; save and record each run like `execute` does.

    Returns:
        One result row per run, in group order (a run whose loss went non-finite has status
        "failed"; the others are unaffected).

    Raises:
        GroupingError: If the networks cannot be fused (nothing is recorded then).
    """
    fused = FusedGroup(group, study_dir, pretrained)
    try:
        fused.fit()
        return fused.finish(env)  # tests with the thread count training chose last
    finally:
        fused.threads.restore()
