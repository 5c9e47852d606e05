"""Plan a study: its runs in order, their per-run configs, names and identities. The config
is checked already (`preflight`): the plan trusts it. It imports no torch."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from omegaconf import DictConfig

from lora_lab.pipeline.resume import run_identity
from lora_lab.pipeline.run_config import adapter_name_for, run_id_for, stage_config

#: `sweep.seeds=auto`, and the seeds 0 … AUTO_FIRST_SEEDS − 1 such a study starts with.
AUTO = "auto"
AUTO_FIRST_SEEDS = 3


@dataclass
class PlannedRun:
    """One run of the study: its stage, seed, rank, per-run config and identity.

    `alpha`, `learning_rate` and `method` are set only when the sweep varies them
    (`sweep.alphas`, `sweep.learning_rates`, `sweep.methods`); `adapter` is the LoRA run's
    folder under `adapters/`.
    """

    stage: str
    seed: int
    rank: int | None = None
    alpha: float | None = None
    learning_rate: float | None = None
    method: str | None = None
    epochs: int = 0
    cfg: DictConfig = field(repr=False, default=None)  # type: ignore[assignment]
    run_id: str = ""
    identity: str = ""
    adapter: str = ""

    @property
    def artefact_file(self) -> str:
        """The file the run leaves for later stages and `lora-lab analyze`, relative to the
        study: its adapter's weights, or its network weights."""
        if self.stage == "lora":
            return f"adapters/{self.adapter}/adapter_model.safetensors"
        return f"checkpoints/{self.run_id}.safetensors"

    def label(self) -> str:
        if self.stage == "full_finetune" and self.run_id not in ("", "full_finetune"):
            lr = f" lr={self.learning_rate:g}" if self.learning_rate is not None else ""
            return f"full_finetune{lr} seed={self.seed}"
        if self.stage != "lora":
            return self.stage
        swept = f" {self.method}" if self.method is not None else ""
        swept += f" alpha={self.alpha:g}" if self.alpha is not None else ""
        swept += f" lr={self.learning_rate:g}" if self.learning_rate is not None else ""
        return f"lora rank={self.rank}{swept} seed={self.seed}"


def _grid(cfg: DictConfig, key: str) -> list[float | None]:
    """The values of an optional sweep dimension: `[None]` (not swept) for null or []."""
    return [float(value) for value in cfg.sweep.get(key) or []] or [None]


def _methods(cfg: DictConfig) -> list[str | None]:
    """`sweep.methods` (names of `conf/lora/` options), or `[None]`: the study's own `lora`."""
    return [str(name) for name in cfg.sweep.get("methods") or []] or [None]


def plan(cfg: DictConfig) -> list[PlannedRun]:
    """The runs of a study, in order, with their per-run configs, names and identities.

    The config must have passed `preflight`'s checks of plain values (`config_check`); the
    plan's own (one name per run, one validation split) are `preflight.check_plan`'s.
    """
    seeds = study_seeds(cfg)
    alphas, learning_rates = _grid(cfg, "alphas"), _grid(cfg, "learning_rates")
    full_lrs = [float(v) for v in cfg.stages.full_finetune.get("learning_rates") or []] or [None]
    # The baseline runs for every seed too when seeds are swept: the recommended rank compares
    # LoRA's seeds with the full finetune's (one seed alone: the study's `seed`, as before).
    full_seeds = seeds if len(seeds) > 1 else [int(cfg.seed)]
    runs = [PlannedRun("pretrain", int(cfg.seed))]
    runs += [
        PlannedRun("full_finetune", int(seed), learning_rate=learning_rate)
        for seed, learning_rate in itertools.product(full_seeds, full_lrs)
    ]
    runs += [
        PlannedRun("lora", int(seed), rank, alpha, learning_rate, method)
        for seed, method, rank, alpha, learning_rate in itertools.product(
            seeds, _methods(cfg), cfg.sweep.ranks, alphas, learning_rates
        )
    ]
    for run in runs:
        _name(cfg, run, runs[0])
    return runs


def study_seeds(cfg: DictConfig) -> list[int]:
    """The seeds a study starts with: `sweep.seeds`; `auto`: 0, 1, 2 (the fewest a verdict
    tests, `report.verdict.MIN_SEEDS`; `adaptive` adds more); null: the study's `seed`."""
    seeds = cfg.sweep.seeds
    if seeds == AUTO:
        return list(range(AUTO_FIRST_SEEDS))
    if seeds is None:
        return [int(cfg.seed)]
    return [int(seed) for seed in seeds]


def variant(
    cfg: DictConfig, run: PlannedRun, pretrain: PlannedRun, seed: int, learning_rate: float | None
) -> PlannedRun:
    """`run` at another seed or learning rate, named as `plan` names its study's runs (a seed
    round of `sweep.seeds=auto`, a step past a grid's edge: see `adaptive`)."""
    new = PlannedRun(run.stage, seed, run.rank, run.alpha, learning_rate, run.method)
    _name(cfg, new, pretrain)
    return new


def _several(cfg: DictConfig, stage: str) -> tuple[bool, bool, bool, bool]:
    """Which dimensions a run's names carry: (alpha, learning rate, method, seed of a full
    finetune), each only when the study sweeps several values of it."""
    if stage == "full_finetune":
        full_lrs = cfg.stages.full_finetune.get("learning_rates") or []
        return False, len(full_lrs) > 1, False, len(study_seeds(cfg)) > 1
    several = [len(_grid(cfg, key)) > 1 for key in ("alphas", "learning_rates")]
    return several[0], several[1], len(_methods(cfg)) > 1, False


def _name(cfg: DictConfig, run: PlannedRun, pretrain: PlannedRun) -> None:
    """Fill a planned run's config, epochs, id, adapter folder and identity.

    Names carry a swept dimension only when it has several values, so the default layout
    (`lora_r8_a8_s0`, `adapters/rank_8_seed_0`) stays as it was.
    """
    name_alpha, name_lr, name_method, name_seed = _several(cfg, run.stage)
    run.cfg = stage_config(
        cfg,
        run.stage,
        rank=run.rank,
        seed=run.seed,
        alpha=run.alpha,
        learning_rate=run.learning_rate,
        method=run.method,
    )
    run.epochs = int(run.cfg.trainer.max_epochs)
    alpha = float(run.cfg.lora.alpha) if run.stage == "lora" else None
    learning_rate = run.learning_rate if name_lr else None
    method = run.method if name_method else None
    run.run_id = run_id_for(run.stage, run.rank, alpha, run.seed, learning_rate, method)
    run.run_id += f"_s{run.seed}" if name_seed else ""
    if run.stage == "lora":
        run.adapter = adapter_name_for(
            run.rank, run.seed, run.alpha if name_alpha else None, learning_rate, method
        )
    upstream = None if run.stage == "pretrain" else pretrain.identity
    run.identity = run_identity(run.cfg, upstream)
