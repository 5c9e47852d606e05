"""A LoRA run's adapter, read through the core: the run's network, its adapter, each layer's ΔW.

The network is built from the run's recorded model config (a Hydra `_target_` node) and given
the study's pretrained weights (`lora_lab.models`); `lora_lab.lora.load_adapter` then reads the
adapter folder into it, which parses `adapter_config.json` with `LoRAConfig.from_peft_dict`
and validates every tensor before it copies one. Each layer's ΔW is `lora_delta_weight`, the
core's own formula for every method: B·A·scaling for LoRA, and for DoRA the rescaled update,
which depends on the pretrained W (hence the pretrained weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from lora_lab.analysis.runs import StudyRun
from lora_lab.analysis.spectra import as_matrix, right_singular_vectors
from lora_lab.lora import (
    LoRAConv2d,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    load_adapter,
    lora_config,
    lora_delta_weight,
    lora_layers,
)
from lora_lab.models import load_network_weights
from lora_lab.results import RunResult


@dataclass(frozen=True)
class LayerUpdate:
    """One adapted layer of a run: its A factor and its ΔW.

    Attributes:
        a: A in float64: `[r, in]`, conv `[r, in, kh, kw]`, or embedding `[r, num_embeddings]`.
        delta: ΔW = `lora_delta_weight(layer)` in float64, shaped like the base weight:
            `[out, in]`, conv `[out, in, kh, kw]`, embedding `[num_embeddings, dim]`.
        scaling: alpha / r, or alpha / sqrt(r) with rsLoRA.
    """

    a: Tensor
    delta: Tensor
    scaling: float

    @property
    def rank(self) -> int:
        """The layer's rank r (a saved PiSSA adapter is a rank-2r LoRA)."""
        return int(self.a.shape[0])

    @cached_property
    def input_basis(self) -> Tensor:
        """Right singular vectors of A, `[min(r, in), in]`: the subspace φ compares (cached)."""
        return right_singular_vectors(self.a)

    @cached_property
    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """Thin SVD of ΔW as (u `[out, m]`, s `[m]`, v `[in*kh*kw, m]`), m = min(out, in*kh*kw).

        Dense rather than from the factors: a DoRA update is not B·A·scaling.
        """
        u, s, vh = torch.linalg.svd(as_matrix(self.delta), full_matrices=False)
        return u, s, vh.T


@dataclass(frozen=True)
class AdapterRun:
    """A finished LoRA run and its adapted layers.

    Attributes:
        name: The adapter folder's name: a label for tables and figures, never parsed.
        run: Identity (rank, alpha, seed, learning rate, method) and metrics, from result.json.
        layers: Layer name (e.g. `hidden.0`) -> its update, in network order.
    """

    name: str
    run: RunResult
    layers: dict[str, LayerUpdate] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The run's configured rank r."""
        return int(self.run.rank or 0)

    @property
    def seed(self) -> int | None:
        return self.run.seed

    @property
    def alpha(self) -> float | None:
        return self.run.alpha


def _factor_a(layer: LoRALayer) -> Tensor:
    """A of any core LoRA layer (DoRA and PiSSA layers subclass these three)."""
    if isinstance(layer, LoRAEmbedding):
        return layer.lora_embedding_A
    if isinstance(layer, LoRALinear | LoRAConv2d):
        return layer.lora_A.weight
    raise TypeError(f"unknown LoRA layer type {type(layer).__name__}")


def _build_network(run: StudyRun, pretrain: Path | None) -> nn.Module:
    """The run's network from its recorded model config, with the pretrained weights."""
    if run.model is None:
        raise ValueError("its result.json records no model config")
    try:
        network = instantiate(run.model)
    except Exception as error:  # Hydra wraps whatever the constructor raised
        raise ValueError(
            f"its model config does not build ({str(error).splitlines()[0]})"
        ) from None
    if not isinstance(network, nn.Module):
        raise ValueError(f"its model config builds a {type(network).__name__}, not a network")
    if pretrain is not None:
        load_network_weights(network, pretrain)
    return network


def load_adapter_run(run: StudyRun, pretrain: Path | None, notes: list[str]) -> AdapterRun | None:
    """Reads one LoRA run through the core; None (with a note) when it cannot be used.

    Args:
        run: A LoRA run; `run.path` is its adapter folder (PEFT format).
        pretrain: The pretrained weights the run started from. None builds the network
            untrained: A and B are still exact, but a DoRA ΔW (which depends on W) is not.
        notes: Collects what was skipped and why.
    """
    try:
        network = _build_network(run, pretrain)
        load_adapter(network, run.path)  # ValueError (one line) for a missing or foreign file
    except ValueError as error:  # WeightsError is one too
        notes.append(f"run {run.result.run_id}: {error}; skipped")
        return None
    result = run.result
    if result.rank is None:  # a hand-written record: the adapter's config knows the rank
        result = dataclasses.replace(result, rank=lora_config(network).rank)  # type: ignore[union-attr]
    with torch.no_grad():
        layers = {
            name: LayerUpdate(
                _factor_a(layer).detach().double(),
                lora_delta_weight(layer).detach().double(),
                float(layer.scaling),
            )
            for name, layer in lora_layers(network).items()
        }
    return AdapterRun(run.label or run.path.name, result, layers)


def _order(adapter: AdapterRun) -> tuple:
    """Rank, then the other settings, then seed: the runs of one setting sit together."""
    run = adapter.run
    return (
        adapter.rank, run.alpha or 0.0, run.learning_rate or 0.0, run.method or "",
        -1 if run.seed is None else run.seed, adapter.name,
    )  # fmt: skip


def load_adapter_runs(
    runs: Iterable[StudyRun], pretrain: Path | None, notes: list[str]
) -> list[AdapterRun]:
    """Every readable LoRA run, ordered by rank, alpha, learning rate, method, seed, name."""
    runs = list(runs)
    if not runs:
        notes.append("no finished LoRA run names an adapter: no LoRA comparison or similarity")
        return []
    adapters = [a for run in runs if (a := load_adapter_run(run, pretrain, notes)) is not None]
    return sorted(adapters, key=_order)
