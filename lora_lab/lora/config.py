"""`LoRAConfig`: the validated hyper-parameters of one LoRA adapter, and its PEFT mapping.

The config is the single source of truth for how `inject_lora` builds adapters. It maps to and
from PEFT's `adapter_config.json` (`to_peft_dict` / `from_peft_dict`) so that adapter folders are
interchangeable with `peft.PeftModel.from_pretrained` / `save_pretrained`.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ALL_LINEAR = "all-linear"
INIT_MODES = ("kaiming", "gaussian", "pissa")
BIAS_MODES = ("none", "all", "lora_only")

# PEFT config keys whose non-default values change what the adapter computes. We do not implement
# them, so a file that uses them must be refused rather than silently loaded as something else.
_UNSUPPORTED_PEFT_KEYS: dict[str, Any] = {
    "lora_bias": False,
    "fan_in_fan_out": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layers_pattern": None,
    "exclude_modules": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "use_bdlora": None,
    "alora_invocation_tokens": None,
}


def _is_int(value: object) -> bool:
    # bool is a subclass of int, but rank=True is a bug, not a rank of 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_name_tuple(value: object, field: str) -> tuple[str, ...]:
    """Validate a non-empty sequence of non-empty strings (list, tuple, OmegaConf ListConfig)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(
            f"{field} must be a string or a list/tuple of module names, got {value!r} "
            f"({type(value).__name__})"
        )
    names = tuple(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{field} must be a non-empty list of non-empty strings, got {value!r}")
    return names


@dataclass
class LoRAConfig:
    """Hyper-parameters of a LoRA adapter (Hu et al. 2021), validated on construction.

    Args:
        rank: Rank r of the update ΔW = B·A; an int >= 1. May exceed min(in, out).
        alpha: Scale numerator; the update is multiplied by alpha/r (alpha/sqrt(r) with rsLoRA).
        dropout: Dropout probability on the adapter input, in [0, 1). Not applied to embeddings
            (their input is indices), as in PEFT.
        target_modules: Which modules to wrap: "all-linear" (every nn.Linear, the output head
            included unless `modules_to_save` names it), a regex string fully matched against
            module names, or a list/tuple of names matched exactly or as a ".name" suffix.
        use_rslora: Use the rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski 2023).
        init: "kaiming" (A kaiming-uniform(a=√5), B zeros), "gaussian" (A normal with
            std 1/r, B zeros) or "pissa" (Meng et al. 2024: A, B from the top-r SVD of W, and
            the frozen weight becomes the residual W - scaling·B·A; nn.Linear targets only, as
            in PEFT). Embedding adapters use A zeros, B normal, as PEFT does.
        use_dora: Weight-decomposed LoRA (DoRA, Liu et al. 2024): a trainable magnitude per
            output row (per output channel for Conv2d, per embedding dimension for Embedding)
            rescales W + scaling·B·A normalised, as PEFT computes it. Not with init="pissa".
        bias: Which biases train: "none", "all" (every bias in the model) or "lora_only" (the
            biases of wrapped layers).
        modules_to_save: Names (exact or ".name" suffix) of modules trained in full and saved
            with the adapter, e.g. a new classification head. They are never wrapped.

    Raises:
        ValueError: On any out-of-range or mistyped value; the message names the value and the
            allowed range.
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: str | Sequence[str] = ALL_LINEAR
    use_rslora: bool = False
    init: str = "kaiming"
    use_dora: bool = False
    bias: str = "none"
    modules_to_save: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(
                f"rank must be an int >= 1, got {self.rank!r} ({type(self.rank).__name__})"
            )
        self.rank = int(self.rank)
        if not _is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(
                f"alpha must be a finite number > 0, got {self.alpha!r} ({type(self.alpha).__name__})"
            )
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be True or False, got {self.use_rslora!r}")
        if self.init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {self.init!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora must be True or False, got {self.use_dora!r}")
        if self.use_dora and self.init == "pissa":
            # A PiSSA adapter is saved as a plain LoRA relative to the pretrained weights (as
            # PEFT converts it); DoRA's magnitude has no such form, PEFT's conversion drops it.
            raise ValueError("use_dora=True cannot be combined with init='pissa'")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        self.target_modules = self._validated_targets(self.target_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = _as_name_tuple(self.modules_to_save, "modules_to_save")

    @staticmethod
    def _validated_targets(value: object) -> str | tuple[str, ...]:
        if isinstance(value, str):
            if not value:
                raise ValueError("target_modules must not be an empty string")
            if value != ALL_LINEAR:
                try:
                    re.compile(value)
                except re.error as err:
                    raise ValueError(
                        f"target_modules {value!r} is neither 'all-linear' nor a valid regex: {err}"
                    ) from None
            return value
        return _as_name_tuple(value, "target_modules")

    @property
    def method(self) -> str:
        """The kind of layer `inject_lora` builds: "dora", "pissa" or "lora"."""
        if self.use_dora:
            return "dora"
        return "pissa" if self.init == "pissa" else "lora"

    @property
    def scaling(self) -> float:
        """The factor applied to B·A: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_peft_dict(
        self, target_modules: str | list[str], modules_to_save: list[str] | None
    ) -> dict[str, Any]:
        """The `adapter_config.json` content PEFT's `LoraConfig` reads.

        Args:
            target_modules: The resolved, exact targets (PEFT has no generic "all-linear").
            modules_to_save: The resolved module names, or None.

        Returns:
            A JSON-serialisable dict.
        """
        alpha: float | int = int(self.alpha) if float(self.alpha).is_integer() else self.alpha
        peft: dict[str, Any] = {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "revision": None,
            "inference_mode": True,
            "r": self.rank,
            "lora_alpha": alpha,
            "lora_dropout": self.dropout,
            "target_modules": target_modules,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "modules_to_save": modules_to_save,
            # PEFT: True means kaiming-uniform A; "gaussian" means normal A with std 1/r.
            "init_lora_weights": True if self.init == "kaiming" else self.init,
            "megatron_config": None,
            "megatron_core": "megatron.core",
            "loftq_config": {},
        }
        peft.update(_UNSUPPORTED_PEFT_KEYS)
        peft["use_dora"] = self.use_dora
        return peft

    @classmethod
    def from_peft_dict(cls, peft: dict[str, Any]) -> LoRAConfig:
        """Build a config from PEFT's `adapter_config.json` content.

        Raises:
            ValueError: If the file is not a LoRA config or uses a PEFT feature this library does
                not implement (lora_bias, rank_pattern, pissa_niter_*, ...).
        """
        if peft.get("peft_type") != "LORA":
            raise ValueError(f"peft_type must be 'LORA', got {peft.get('peft_type')!r}")
        for key, default in _UNSUPPORTED_PEFT_KEYS.items():
            value = peft.get(key, default)
            if value not in (default, None, {}, [], False):
                raise ValueError(f"PEFT option {key}={value!r} is not supported by lora_lab.lora")
        init_weights = peft.get("init_lora_weights", True)
        # False (PEFT's "random B") only matters before training; the loaded weights replace it.
        init_map = {True: "kaiming", False: "kaiming", "gaussian": "gaussian", "pissa": "pissa"}
        if not isinstance(init_weights, bool | str) or init_weights not in init_map:
            raise ValueError(
                f"init_lora_weights={init_weights!r} is not supported; use true, 'gaussian' "
                "or 'pissa'"
            )
        if peft.get("target_modules") is None:
            raise ValueError("adapter config has no target_modules")
        return cls(
            rank=peft.get("r", 8),
            alpha=peft.get("lora_alpha", 8),
            dropout=peft.get("lora_dropout", 0.0),
            target_modules=peft["target_modules"],
            use_rslora=peft.get("use_rslora", False),
            init=init_map[init_weights],
            use_dora=peft.get("use_dora") or False,
            bias=peft.get("bias", "none"),
            modules_to_save=peft.get("modules_to_save") or None,
        )
