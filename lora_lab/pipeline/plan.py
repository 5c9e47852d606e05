"""Plan a study: its runs in order, their per-run configs, names and identities, and the
checks of plain values that must pass before anything trains or is written. It imports no
torch, so that the command line refuses a bad value at once; `preflight` checks what only
built objects can."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field

from omegaconf import DictConfig

from lora_lab.pipeline.config_check import check_values
from lora_lab.pipeline.methods import lora_config_of, method_patch
from lora_lab.pipeline.resume import run_identity
from lora_lab.pipeline.run_config import adapter_name_for, run_id_for, stage_config

#: `sweep.seeds=auto`, and the seeds 0 … AUTO_FIRST_SEEDS − 1 such a study starts with.
AUTO = "auto"
AUTO_FIRST_SEEDS = 3


class StudyError(ValueError):
    """Bad study input, found before any training starts."""


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


def _ranks(cfg: DictConfig) -> list[int]:
    ranks = cfg.sweep.ranks
    if ranks is None or isinstance(ranks, (str, int)) or len(ranks) == 0:
        raise StudyError(
            f"sweep.ranks={ranks!r} must be a non-empty list of integers ≥ 1, e.g. sweep.ranks=[1,2,4,8]"
        )
    return list(ranks)


def _grid(cfg: DictConfig, key: str, example: str) -> list[float | None]:
    """The values of an optional sweep dimension: `[None]` (not swept) for null or [].

    Raises:
        StudyError: for a value that is not a list of positive numbers.
    """
    values = cfg.sweep.get(key)
    if values is None:
        return [None]
    if isinstance(values, (str, int, float)):
        raise StudyError(f"sweep.{key}={values!r} must be a list, e.g. sweep.{key}={example}")
    for value in values:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise StudyError(
                f"sweep.{key} holds {value!r}; it must list positive numbers, e.g. sweep.{key}={example}"
            )
    return [float(value) for value in values] or [None]


def sweep_jobs(cfg: DictConfig) -> int:
    """`sweep.jobs`: how many runs go at a time (1 when absent).

    Raises:
        StudyError: for anything but an integer ≥ 1.
    """
    jobs = cfg.sweep.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise StudyError(f"sweep.jobs={jobs!r} must be an integer ≥ 1, e.g. sweep.jobs=2")
    return jobs


def plan(cfg: DictConfig) -> list[PlannedRun]:
    """The runs of a study, in order, with their per-run configs, names and identities.

    Checks every plain value on the way (`check_values`, then the sweep's own rules); what
    only built objects can check is `preflight.check_study`'s. Imports no torch.

    Raises:
        StudyError / ValueError: on bad input (bad ranks, seeds, grids, methods, LoRA values,
            repeated runs), before anything is trained or written.
    """
    check_values(cfg)
    seeds = study_seeds(cfg)
    sweep_jobs(cfg)
    # `lora.rank` itself is replaced by each of sweep.ranks, but a bad value is still an error.
    lora_config_of(cfg.lora)
    alphas = _grid(cfg, "alphas", "[1,8,32]")
    learning_rates = _grid(cfg, "learning_rates", "[1e-4,1e-3]")
    methods = _methods(cfg)
    # (checked by the schema: a list of numbers > 0, or null)
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
            seeds, methods, _ranks(cfg), alphas, learning_rates
        )
    ]
    for run in runs:
        _name(cfg, run, runs[0])
    duplicates = sorted(n for n, count in Counter(r.run_id for r in runs).items() if count > 1)
    if duplicates:
        raise StudyError(
            f"the sweep lists the same run more than once ({', '.join(duplicates)}); "
            "check sweep.ranks, sweep.alphas, sweep.learning_rates, sweep.methods and "
            "sweep.seeds for repeats"
        )
    _check_one_split(runs)
    return runs


def _check_one_split(runs: list[PlannedRun]) -> None:
    """Every stage validates on one split of one dataset, which no stage trains on: a stage's
    own `data` may not change the dataset, `val_size` or `split_seed`.

    Raises:
        StudyError: naming the stage, the key and both values.
    """
    keys = ("name", "val_size", "split_seed")
    first = runs[0]
    for run in runs[1:]:
        for key in keys:
            mine, theirs = run.cfg.data.get(key), first.cfg.data.get(key)
            if mine != theirs:
                raise StudyError(
                    f"stages.{run.stage}.data.{key}={mine!r} differs from the {first.stage} "
                    f"stage's {theirs!r}: every stage must validate on one split, which no "
                    f"stage trains on; set data.{key} for the whole study instead"
                )


def _methods(cfg: DictConfig) -> list[str | None]:
    """`sweep.methods` (names of `conf/lora/` options), or `[None]`: the study's own `lora`."""
    names = cfg.sweep.get("methods")
    if not names:
        return [None]
    for name in names:
        method_patch(str(name))  # an unknown name lists the ones there are
    return [str(name) for name in names]


def study_seeds(cfg: DictConfig) -> list[int]:
    """The seeds a study starts with: `sweep.seeds`; `auto`: 0, 1, 2 (the fewest a verdict
    tests, `report.verdict.MIN_SEEDS`; `adaptive` adds more); null: the study's `seed`.

    Raises:
        StudyError: for an empty list.
    """
    seeds = cfg.sweep.seeds
    if seeds == AUTO:
        return list(range(AUTO_FIRST_SEEDS))
    if seeds is None:
        return [int(cfg.seed)]
    if len(seeds) == 0:
        raise StudyError("sweep.seeds=[] must list at least one seed, e.g. sweep.seeds=[0,1,2]")
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
    several = [len(_grid(cfg, key, "[1]")) > 1 for key in ("alphas", "learning_rates")]
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
