"""Run configs: the config one run of a stage sees, and the names of its folders.

`stage_config` applies the one precedence rule (a stage's own setting wins over the shared
one, for that stage) and a run's grid values; `run_id_for` and `adapter_name_for` name its run
folder and adapter folder. The plan builds every run through them.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lora_lab.pipeline.methods import method_patch
from lora_lab.results import STAGE_ORDER

STAGES = STAGE_ORDER  # the result type's stage order
# A stage's shortcuts: `stages.<stage>.<shortcut>` sets the key it names for that stage.
SHORTCUTS = {
    "max_epochs": "trainer.max_epochs",
    "lr": "module.optimizer.lr",
    "classes": "data.classes",
}


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
    with open_dict(merged):
        for shortcut, key in SHORTCUTS.items():
            if overrides[shortcut] is not None:
                OmegaConf.update(merged, key, overrides[shortcut], merge=False)
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
