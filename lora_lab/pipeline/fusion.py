"""Which LoRA runs can train fused (`sweep.fused=true`), and why the others cannot.

What makes a group: equal resolved `data`, `model`, `module` and `trainer` configs, apart
from what each adapter owns: `lora.rank`, `lora.alpha`, the method (`lora.method`,
`use_rslora`, `use_dora`, `init`, `loraplus_lr_ratio`), `lora.dropout` and the optimizer and
scheduler (`module.optimizer.lr` above all). Trainer options that Lightning applies only
under automatic optimization (gradient clipping and accumulation) the pass applies per member
(`step_options`); `max_steps` counts steps as each run alone counts them; fp16 gives each
member its own gradient scaler. The seed is
free, but `data.seed` follows it (it draws the batch order; the validation split has a seed of
its own, `data.split_seed`, fixed per study), so runs of different seeds form separate groups,
each seeing exactly the data its sequential runs see; fix `data.seed` to fuse across seeds. The fused runner (`fused`) trains each group.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from lora_lab.lora import inject_lora
from lora_lab.lora.grouped import GroupingError, check_groupable
from lora_lab.models.member_steps import TAKEN_OVER, StepOptions
from lora_lab.pipeline.methods import lora_config_of
from lora_lab.pipeline.plan import PlannedRun
from lora_lab.pipeline.resume import flatten

__all__ = ["TAKEN_OVER", "Grouping", "describe", "fusable", "pass_config", "step_options"]

# What each member owns: these may differ within a group. The method is the adapter's own:
# a PiSSA member keeps the shared pretrained weight and adds its fixed correction, a DoRA
# member its magnitude, a LoRA+ member its own B learning rate.
OWN_LORA_KEYS = (
    "rank",
    "alpha",
    "use_rslora",
    "init",
    "dropout",
    "method",
    "use_dora",
    "loraplus_lr_ratio",
)
OWN_MODULE_KEYS = ("optimizer", "scheduler")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True)


def _fusion_key(run_cfg: DictConfig) -> dict[str, Any]:
    """Everything that must be equal for runs to share one pass."""
    key = {group: _plain(run_cfg[group]) for group in ("data", "model", "trainer")}
    key["module"] = {k: v for k, v in _plain(run_cfg.module).items() if k not in OWN_MODULE_KEYS}
    key["lora"] = {k: v for k, v in _plain(run_cfg.lora).items() if k not in OWN_LORA_KEYS}
    return key


def _differences(key: dict[str, Any], other: dict[str, Any]) -> list[str]:
    mine, theirs = flatten(key), flatten(other)
    return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


def _unsupported(run_cfg: DictConfig) -> str | None:
    """Why runs with this config cannot be fused, or None if they can."""
    network = instantiate(run_cfg.model)
    inject_lora(network, lora_config_of(run_cfg.lora))
    try:
        check_groupable([network])
    except GroupingError as error:
        return str(error)
    return None


def pass_config(run_cfg: DictConfig) -> DictConfig:
    """The config a fused pass builds its Trainer from: the run's, with the Trainer options
    the module applies per member (`step_options`) set to `TAKEN_OVER` (Lightning refuses
    them under manual optimization)."""
    cfg = copy.deepcopy(run_cfg)
    with open_dict(cfg):
        for key, value in TAKEN_OVER.items():
            cfg.trainer[key] = value
    return cfg


def step_options(run_cfg: DictConfig) -> StepOptions:
    """The gradient clipping and accumulation a pass applies per member (from `trainer.*`);
    the pass's own Trainer gets `TAKEN_OVER` instead."""
    return StepOptions.from_trainer(_plain(run_cfg.trainer))


#: `fusable`'s answer: the groups that train fused, and each other run with its reason.
Grouping = tuple[list[list[PlannedRun]], list[tuple[PlannedRun, str]]]


def fusable(runs: Sequence[PlannedRun]) -> Grouping:
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
    why = " (each seed draws its own batch order)" if differ == ["data.seed"] else ""
    return f"its {', '.join(differ)} differ from the other runs'{why}"


def describe(runs: Sequence[PlannedRun]) -> str:
    """`lora ranks 1,2,4 seed 0` for a list of runs."""
    ranks = ",".join(str(r) for r in dict.fromkeys(run.rank for run in runs))
    seeds = ",".join(str(s) for s in dict.fromkeys(run.seed for run in runs))
    return (
        f"lora rank{'s' if ',' in ranks else ''} {ranks} seed{'s' if ',' in seeds else ''} {seeds}"
    )
