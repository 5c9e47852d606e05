"""The schema of our own config nodes, as Hydra structured configs.

The top level, `stages.<stage>`, `sweep`, `report` and the `lora` group's keys are the
dataclasses below, registered in Hydra's `ConfigStore` as `lora_lab_schema`, the first entry
of `conf/config.yaml`'s defaults list: Hydra itself types every value given to them, by a file
or on the command line, and refuses a key they do not declare (unless added with `+`, which
`config_check` refuses). What a type cannot say is in each field's metadata, checked by
`config_check` on the composed config:
- `range`: the values allowed, in words and as a test (`sweep.ranks` ≥ 1, …);
- `hint`: the type of a field Hydra cannot type (a union such as a list of seeds or `auto`);
- `choices`: the names allowed (`lora.init`, `stage`).

The nodes Hydra cannot type (`data`, `model`, `module`, `trainer`, `logger`: each is whatever
its `_target_` takes) are checked against that target's signature (`config_check`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from hydra.core.config_store import ConfigStore

from lora_lab.lora.config import BIAS_MODES, INIT_MODES

# The name of the schema in the ConfigStore, as conf/config.yaml's defaults list names it.
SCHEMA_NAME = "lora_lab_schema"

Range = tuple[str, Callable[[Any], bool]]
AT_LEAST_1: Range = ("an integer ≥ 1", lambda v: v >= 1)
AT_LEAST_0: Range = ("an integer ≥ 0", lambda v: v >= 0)
POSITIVE: Range = ("a finite number > 0", lambda v: math.isfinite(v) and v > 0)
FRACTION: Range = ("a number in [0, 1)", lambda v: 0 <= v < 1)
STAGE_NAMES = ("pretrain", "full_finetune", "lora")


def _bound(rng: Range, hint: Any = None) -> dict[str, Any]:
    return {"range": rng} | ({"hint": hint} if hint is not None else {})


def _choices(*names: str) -> dict[str, Any]:
    return {"choices": names}


@dataclass
class SweepSchema:
    ranks: list[int] = field(default_factory=lambda: [8], metadata=_bound(AT_LEAST_1))
    # a list of seeds, `auto` (rounds of seeds: `adaptive`), or null (the study's `seed`)
    seeds: Any = field(default=None, metadata={"hint": list[int] | Literal["auto"] | None})
    alphas: list[float] | None = field(default=None, metadata=_bound(POSITIVE))
    learning_rates: list[float] | None = field(default=None, metadata=_bound(POSITIVE))
    methods: list[str] | None = None  # names of conf/lora/ options
    jobs: int = field(default=1, metadata=_bound(AT_LEAST_1))
    fused: bool = True
    restart: bool = False
    lr_extend: int = field(default=2, metadata=_bound(AT_LEAST_0))
    verify: int = field(default=1, metadata=_bound(AT_LEAST_0))  # the exactness certificate
    verify_tolerance: float = field(default=0.005, metadata=_bound(POSITIVE))


@dataclass
class StageSchema:
    """`stages.<stage>`: the shortcuts (`run_config.SHORTCUTS`) and the mappings merged over
    the top-level groups of the same name."""

    max_epochs: int | None = field(default=None, metadata=_bound(AT_LEAST_1))
    classes: list[Any] | None = field(default=None, metadata={"hint": list[int | str] | None})
    lr: float | None = field(default=None, metadata=_bound(POSITIVE))
    data: dict[str, Any] = field(default_factory=dict)
    module: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)


@dataclass
class FullFinetuneSchema(StageSchema):
    learning_rates: list[float] | None = field(default=None, metadata=_bound(POSITIVE))


@dataclass
class StagesSchema:
    pretrain: StageSchema = field(default_factory=StageSchema)
    full_finetune: FullFinetuneSchema = field(default_factory=FullFinetuneSchema)
    lora: StageSchema = field(default_factory=StageSchema)


@dataclass
class ReportSchema:
    tolerance: float = field(default=0.01, metadata=_bound(FRACTION))
    max_seeds: int = field(default=10, metadata=_bound(("an integer ≥ 3", lambda v: v >= 3)))


@dataclass
class LoRASchema:
    """The `lora` group: LoRAConfig's fields, the option's `method` name and LoRA+'s ratio.

    `alpha` and `loraplus_lr_ratio` keep a number as written (an integer stays one: run
    identities hash it; by default `alpha` is the interpolation `${lora.rank}`)."""

    method: str = "default"
    rank: int = field(default=8, metadata=_bound(AT_LEAST_1))
    alpha: Any = field(default=8, metadata=_bound(POSITIVE, hint=float))
    dropout: float = field(default=0.0, metadata=_bound(FRACTION))
    target_modules: Any = field(default="all-linear", metadata={"hint": str | list[str]})
    use_rslora: bool = False
    init: str = field(default="kaiming", metadata=_choices(*INIT_MODES))
    use_dora: bool = False
    loraplus_lr_ratio: Any = field(default=None, metadata=_bound(POSITIVE, float | None))
    bias: str = field(default="none", metadata=_choices(*BIAS_MODES))
    modules_to_save: list[str] | None = None


@dataclass
class StudySchema:
    """The top level. `data`, `model`, `module`, `trainer` and `logger` are config groups of
    `_target_` nodes: Hydra leaves them untyped, `config_check` checks their targets."""

    name: str = "study"
    seed: int = 0
    output_dir: str = "outputs"
    stage: str = field(default="lora", metadata=_choices(*STAGE_NAMES))
    pretrain_ckpt: str | None = None
    threads: int | None = field(default=None, metadata=_bound(AT_LEAST_1))
    run_id: str | None = None  # filled in per run
    run_dir: str | None = None
    stages: StagesSchema = field(default_factory=StagesSchema)
    sweep: SweepSchema = field(default_factory=SweepSchema)
    report: ReportSchema = field(default_factory=ReportSchema)
    lora: LoRASchema = field(default_factory=LoRASchema)
    data: Any = None
    model: Any = None
    module: Any = None
    trainer: Any = None
    logger: Any = None


def register_schema() -> None:
    """Store the schema in Hydra's ConfigStore (once per process; the launchers hand the store
    on to their jobs), before any config of conf/ is composed."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=StudySchema)


class _NoValue:
    def __repr__(self) -> str:
        return "NO_VALUE"


# A problem about a key as such (an unknown key, a whole node), with no one value to show.
NO_VALUE: Any = _NoValue()


@dataclass(frozen=True)
class Problem:
    """One bad input: the key as the user names it, its value (or NO_VALUE), and why."""

    key: str
    value: Any
    reason: str

    def line(self, shown: Any = NO_VALUE) -> str:
        """The one line that says it: `key=value reason`, or `key: reason` without a value.

        Args:
            shown: The value to show instead of `value` (the command line shows it as typed).
        """
        if self.value is NO_VALUE:
            return f"{self.key}: {self.reason}"
        value = self.value if shown is NO_VALUE else shown
        return f"{self.key}={value!r} {self.reason}"


class ConfigError(ValueError):
    """Bad config input, found before anything trains or is written: every problem found,
    each with its key, value and reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems: list[Problem] = []
        for problem in problems:  # each once (the stages of a study share most keys)
            if problem not in self.problems:
                self.problems.append(problem)
        super().__init__("; ".join(problem.line() for problem in self.problems))

    @classmethod
    def one(cls, key: str, value: Any, reason: str) -> ConfigError:
        return cls([Problem(key, value, reason)])


def raise_problems(problems: list[Problem]) -> None:
    """Raise a ConfigError holding `problems`, if there are any."""
    if problems:
        raise ConfigError(problems)
