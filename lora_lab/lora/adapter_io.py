"""Save and load adapters in HF PEFT's on-disk format.

A folder holds `adapter_config.json` and `adapter_model.safetensors`. Tensor keys are
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (embeddings:
`.lora_embedding_A` / `.lora_embedding_B`; DoRA adds `.lora_magnitude_vector`, PEFT's saved key
without the adapter name and `.weight`), `base_model.model.<module>.<param>` for each entry
of a `modules_to_save` module's state dict, and for biases `base_model.model.<layer>.base_layer.bias`
(wrapped layers) or `base_model.model.<module>.bias` (others) — exactly as PEFT writes them.

Loading validates the whole file against the model before it copies a single tensor, so a
failed load leaves the model as it was.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

from lora_lab._atomic import atomic_write_bytes
from lora_lab.lora.config import LoRAConfig
from lora_lab.lora.expected import adapter_keys, canonical_keys, expected_shapes
from lora_lab.lora.inject import (
    STATE_ATTR,
    AdapterState,
    adapter_state,
    apply_adapter,
    lora_layers,
    mark_trainable,
    remove_adapter,
)
from lora_lab.lora.merge import is_merged
from lora_lab.lora.pissa import PiSSALinear, converted_config
from lora_lab.lora.targets import (
    ResolvedTargets,
    base_named_modules,
    name_matches,
    resolve_targets,
)

logger = logging.getLogger("lora_lab.lora")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_MAX_LISTED = 20


def _peft_targets(model: nn.Module, targets: tuple[str, ...]) -> str | list[str]:
    """Targets PEFT resolves to exactly `targets`: the names, or an anchored regex if needed.

    PEFT matches a list by ".name" suffix, so the plain list would over-match when, say, both
    `fc` and `block.fc` exist but only `fc` was wrapped; a full-match regex is exact.
    """
    names = [n for n, _ in base_named_modules(model) if n]
    if [n for n in names if name_matches(n, targets)] == list(targets):
        return list(targets)
    return "|".join(re.escape(t) for t in targets)


def save_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write the model's adapter to `directory` in PEFT's format (created if missing).

    DoRA adapters include their magnitude vectors. A PiSSA adapter is written, as PEFT's
    `save_pretrained(path_initial_model_for_weight_conversion=...)` converts it, as a plain
    LoRA of rank 2r relative to the unmodified pretrained weights (`lora_lab.lora.pissa`), so it
    loads on the pretrained network (here or in PEFT) and gives the trained model's outputs.

    Args:
        model: A model with an adapter from `inject_lora` / `load_adapter`. May be merged.
        directory: Destination folder.

    Returns:
        The folder path.

    Raises:
        ValueError: If the model carries no adapter.
    """
    tensors, peft = adapter_file_contents(model)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    # Atomic writes (temp file + rename), with the umask's file mode.
    weights = save_safetensors_bytes(tensors, metadata={"format": "pt"})
    config_text = json.dumps(peft, indent=2) + "\n"
    atomic_write_bytes(folder / WEIGHTS_NAME, weights, fsync=True)
    atomic_write_bytes(folder / CONFIG_NAME, config_text.encode(), fsync=True)
    return folder


def adapter_file_contents(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """What `save_adapter` writes: the tensors, copied to the host, and the PEFT config.

    The model's tensors may live on any device (a GPU after training); every tensor returned
    is a contiguous host copy keyed as in the file (`base_model.model.<module>.lora_A.weight`).

    Raises:
        ValueError: If the model carries no adapter.
    """
    state = adapter_state(model)
    if state is None or not lora_layers(model):
        raise ValueError("model has no LoRA adapter to save; call inject_lora first")
    live, config = _saved_tensors(model, state)
    # Clone: safetensors refuses tensors that share storage (e.g. tied modules_to_save weights).
    tensors = {
        PREFIX + key: tensor.detach().to("cpu", copy=True).contiguous()
        for key, tensor in live.items()
    }
    _warn_loose_peft_match(model, state.modules_to_save)
    peft = config.to_peft_dict(
        _peft_targets(model, state.targets), list(state.modules_to_save) or None
    )
    return tensors, peft


def _saved_tensors(model: nn.Module, state: AdapterState) -> tuple[dict[str, Tensor], LoRAConfig]:
    """The tensors to write (keys without prefix) and the config that describes them.

    A PiSSA adapter is written as PEFT converts it: a rank-2r plain LoRA on the pretrained
    weights (`lora_lab.lora.pissa`). Unlike PEFT's conversion, which keeps only lora_A/lora_B,
    `modules_to_save` and bias tensors are kept, so the file reproduces the trained model.
    """
    tensors = adapter_keys(model, state)
    if state.config.method != "pissa":
        return tensors, state.config
    for name, layer in lora_layers(model).items():
        assert isinstance(layer, PiSSALinear)
        for suffix, tensor in layer.converted_factors().items():
            tensors[f"{name}.{suffix}"] = tensor
    return tensors, converted_config(state.config)


def _warn_loose_peft_match(model: nn.Module, saved: tuple[str, ...]) -> None:
    # PEFT matches modules_to_save by a bare `endswith`, so "head" also picks "pre_head".
    names = [n for n, _ in base_named_modules(model) if n]
    for entry in saved:
        extra = [n for n in names if n.endswith(entry) and n != entry and not n.startswith(entry)]
        if extra:
            logger.warning("PEFT would also treat %s as modules_to_save %r", extra, entry)


def _read_config(path: Path) -> LoRAConfig:
    try:
        raw: Any = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read adapter config {path}: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"adapter config {path} is not a JSON object")
    try:
        return LoRAConfig.from_peft_dict(raw)
    except ValueError as err:
        raise ValueError(f"adapter config {path}: {err}") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types; any failure = bad file
        raise ValueError(f"cannot read adapter weights {path}: {err}") from None


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def load_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> list[str]:
    """Load a PEFT-format adapter into `model`, injecting or replacing LoRA layers as needed.

    Without LoRA layers the adapter is injected from `adapter_config.json`. With an adapter
    already present it is replaced (hot swap): layers are re-created if the targets or rank
    differ, otherwise updated in place. Everything is validated before anything changes.

    Args:
        model: The base model, or one already holding an (unmerged) adapter.
        directory: A folder written by `save_adapter` or PEFT's `save_pretrained`.

    Returns:
        The names of the wrapped modules.

    Raises:
        ValueError: If the model is merged; a file is missing, unreadable or corrupt (named);
            the config is unsupported or does not resolve on this model; or the weights have
            missing keys, unexpected keys or wrong shapes (all listed in one message).
    """
    if is_merged(model):
        raise ValueError("cannot load an adapter into a merged model; call unmerge_lora first")
    folder = Path(directory)
    config = _read_config(folder / CONFIG_NAME)
    raw = _read_tensors(folder / WEIGHTS_NAME)

    resolved = resolve_targets(model, config)
    expected = expected_shapes(model, config, resolved)
    unexpected = sorted(k for k in raw if not k.startswith(PREFIX))
    tensors = canonical_keys(
        {k[len(PREFIX) :]: v for k, v in raw.items() if k.startswith(PREFIX)},
        resolved.modules_to_save,
    )
    unexpected += sorted(PREFIX + k for k in tensors if k not in expected)
    missing = sorted(PREFIX + k for k in expected if k not in tensors)
    wrong_shape = sorted(
        f"{PREFIX}{k} (file {list(tensors[k].shape)}, model {list(shape)})"
        for k, shape in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(shape)
    )
    problems = [
        f"{label}: {_listing(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", wrong_shape),
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"adapter {folder / WEIGHTS_NAME} does not fit the model: " + "; ".join(problems)
        )

    _prepare_layers(model, config, resolved)
    targets = adapter_keys(model, adapter_state(model))  # type: ignore[arg-type]
    with torch.no_grad():
        for key, destination in targets.items():
            destination.copy_(tensors[key])
    return list(resolved.targets)


def _prepare_layers(model: nn.Module, config: LoRAConfig, resolved: ResolvedTargets) -> None:
    """Make the model's adapter structure match `config`, reusing layers when possible."""
    old = adapter_state(model)
    layers = lora_layers(model)
    # A PiSSA layer's base weight depends on its own factors: it is always rebuilt.
    same_shape = (
        old is not None
        and old.config.method == config.method != "pissa"
        and tuple(layers) == resolved.targets
        and all(layer.rank == config.rank for layer in layers.values())
    )
    if old is not None:
        _warn_leftovers(old.config, old.modules_to_save, config, resolved.modules_to_save)
    if same_shape:
        for layer in layers.values():
            layer.configure(config.alpha, config.dropout, config.use_rslora)
        setattr(model, STATE_ATTR, AdapterState(config, resolved.targets, resolved.modules_to_save))
        mark_trainable(model)
        return
    if layers:
        remove_adapter(model)
    apply_adapter(model, config, resolved)


def _warn_leftovers(
    old: LoRAConfig, old_saved: tuple[str, ...], new: LoRAConfig, new_saved: tuple[str, ...]
) -> None:
    # modules_to_save and biases train in place (no copy), so a swap cannot restore them.
    left = sorted(set(old_saved) - set(new_saved))
    if left:
        logger.warning("hot swap: %s keep the previous adapter's trained weights", left)
    coverage = {"none": 0, "lora_only": 1, "all": 2}
    if coverage[new.bias] < coverage[old.bias]:
        logger.warning("hot swap: biases trained by the previous adapter (bias=%r) stay", old.bias)
