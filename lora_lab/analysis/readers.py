"""Readers for a study folder's checkpoints and PEFT-format LoRA adapters.

Reads the files directly with safetensors + json, so the analysis depends on the on-disk
format only, never on the code that wrote it. Anything unreadable is skipped and described
in `notes` rather than raised: a half-finished study should still be analysable.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from lora_lab.analysis.spectra import lora_delta, lora_svd, right_singular_vectors

PRETRAIN_FILE = Path("checkpoints") / "pretrain.safetensors"
FULL_FINETUNE_FILE = Path("checkpoints") / "full_finetune.safetensors"
ADAPTERS_DIR = Path("adapters")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_ADAPTER_DIR_NAME = re.compile(r"rank_(?P<rank>\d+)(?:_seed_(?P<seed>\d+))?")
# PEFT strips the adapter name on save: `base_model.model.<module>.lora_A.weight`;
# embedding factors are bare parameters: `base_model.model.<module>.lora_embedding_A`.
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\."
    r"(?P<factor>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$"
)


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module's factors.

    Attributes:
        a: `[r, in]`, conv `[r, in, kh, kw]`, or embedding `[r, num_embeddings]`.
        b: `[out, r]`, conv `[out, r, 1, 1]`, or embedding `[embedding_dim, r]`.
        scaling: alpha / r, or alpha / sqrt(r) with rsLoRA.
        embedding: True for `nn.Embedding`, whose weight is `[num_embeddings, dim]`, so the
            update is (B·A)ᵀ·scaling rather than B·A·scaling.
    """

    a: Tensor
    b: Tensor
    scaling: float
    embedding: bool = False

    @property
    def rank(self) -> int:
        """The adapter's rank r for this module."""
        return int(self.a.shape[0])

    def delta(self) -> Tensor:
        """The dense update, shaped like the base weight (float64)."""
        if self.embedding:
            return lora_delta(self.a, self.b, self.scaling).T
        return lora_delta(self.a, self.b, self.scaling)

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """Thin SVD of `delta()` as (u `[out, m]`, s `[m]`, v `[in*kh*kw, m]`), from the factors."""
        u, s, v = lora_svd(self.a, self.b, self.scaling)
        return (v, s, u) if self.embedding else (u, s, v)  # an embedding's ΔW is (B·A)ᵀ

    @cached_property
    def input_basis(self) -> Tensor:
        """Right singular vectors of A, `[min(r, in), in]`: the subspace φ compares (cached)."""
        return right_singular_vectors(self.a)


@dataclass(frozen=True)
class Adapter:
    """A saved adapter: its identity, hyper-parameters and per-module factors.

    Attributes:
        name: the folder name, e.g. `rank_8_seed_0`.
        rank: the configured `r`.
        seed: parsed from the folder name; None when the name carries no seed.
        alpha: `lora_alpha`.
        use_rslora: whether scaling is alpha / sqrt(r).
        modules: module name (e.g. `hidden.0`) -> factors.
    """

    name: str
    rank: int
    seed: int | None
    alpha: float
    use_rslora: bool
    modules: dict[str, LoraFactors] = field(default_factory=dict)


def load_checkpoint(path: Path, notes: list[str]) -> dict[str, Tensor] | None:
    """Loads a safetensors state dict, or returns None (with a note) when absent/unreadable."""
    if not path.is_file():
        notes.append(f"{path} missing")
        return None
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        notes.append(f"{path} unreadable ({error}); skipped")
        return None


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's `rank_pattern`/`alpha_pattern` lookup: a key matches a module-name suffix."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    return default


def _scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def load_adapter(directory: Path, notes: list[str]) -> Adapter | None:
    """Reads one PEFT LoRA adapter folder; None (with a note) when it cannot be used."""
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not (config_path.is_file() and weights_path.is_file()):
        notes.append(f"{directory}: needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}; skipped")
        return None
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(weights_path)
    except (OSError, ValueError, SafetensorError) as error:
        notes.append(f"{directory}: unreadable ({error}); skipped")
        return None
    if config.get("use_dora"):
        notes.append(f"{directory}: DoRA magnitudes are ignored; ΔW is read as B·A·scaling")

    named = _ADAPTER_DIR_NAME.fullmatch(directory.name)
    named_rank = int(named["rank"]) if named else None
    rank = int(config.get("r") or named_rank or 0)
    if named_rank is not None and named_rank != rank:
        notes.append(f"{directory}: folder says rank {named_rank}, config r={rank}; using r")
    seed = int(named["seed"]) if named and named["seed"] is not None else None
    alpha = float(config.get("lora_alpha", 8))  # PEFT's LoraConfig default
    use_rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}

    factors: dict[str, dict[str, Tensor]] = {}
    ignored = []
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            ignored.append(key)
            continue
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    if ignored:
        notes.append(f"{directory}: ignored {len(ignored)} non-LoRA tensor(s), e.g. {ignored[0]}")

    modules: dict[str, LoraFactors] = {}
    for module, parts in sorted(factors.items()):
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            notes.append(f"{directory}: {module} has only one of A/B; skipped")
            continue
        module_rank = int(a.shape[0])  # the tensor is the truth; rank_pattern may override r
        expected = int(_pattern_value(rank_pattern, module, rank))
        if expected and module_rank != expected:
            notes.append(f"{directory}: {module} A has rank {module_rank}, config {expected}")
        module_alpha = _pattern_value(alpha_pattern, module, alpha)
        scaling = _scaling(module_alpha, module_rank, use_rslora)
        modules[module] = LoraFactors(a=a, b=b, scaling=scaling, embedding=embedding)
    if not modules:
        notes.append(f"{directory}: no LoRA factors found; skipped")
        return None
    rank = rank or max(factor.rank for factor in modules.values())
    return Adapter(directory.name, rank, seed, alpha, use_rslora, modules)


def _natural_key(text: str) -> list[int | str]:
    """`rank_8` sorts before `rank_16`; `hidden.2` before `hidden.10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def load_adapters(study_dir: Path, notes: list[str]) -> list[Adapter]:
    """Every readable adapter under `<study>/adapters/`, ordered by (rank, seed, name)."""
    root = study_dir / ADAPTERS_DIR
    if not root.is_dir():
        notes.append(f"{root} missing: no LoRA comparisons or subspace similarity")
        return []
    adapters = [
        adapter
        for directory in sorted(root.iterdir(), key=lambda p: _natural_key(p.name))
        if directory.is_dir() and (adapter := load_adapter(directory, notes)) is not None
    ]
    if not adapters:
        notes.append(f"{root} holds no readable adapter")
    return sorted(adapters, key=lambda a: (a.rank, -1 if a.seed is None else a.seed, a.name))


def natural_sorted(names: list[str]) -> list[str]:
    """Sorts layer names the way a reader expects (`hidden.2` before `hidden.10`)."""
    return sorted(names, key=_natural_key)
