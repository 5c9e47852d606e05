"""Adapters move both ways between lora_lab and HF PEFT and give the same outputs."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from lora_testkit import make_input, make_model
from safetensors.torch import load_file
from torch import nn

from lora_lab.interop import import_peft
from lora_lab.lora import LoRAConfig, inject_lora, load_adapter, lora_parameters, save_adapter

# Not skipped when missing: `make setup` installs PEFT (into the interop venv, see
# lora_lab.interop), so a missing PEFT is a broken setup.
peft = import_peft()

# (model kind, lora_lab config); PEFT gets the equivalent LoraConfig.
CASES = [
    ("mlp", LoRAConfig(rank=3, alpha=6, target_modules=["fc1", "fc2"], modules_to_save=["head"])),
    (
        "mlp",
        LoRAConfig(
            rank=4, alpha=4, target_modules=["fc1", "fc2", "head"], use_rslora=True, bias="all"
        ),
    ),
    (
        "conv",
        LoRAConfig(
            rank=2,
            alpha=4,
            target_modules=["conv1", "conv2"],
            bias="lora_only",
            modules_to_save=["head"],
        ),
    ),
    (
        "conv",
        LoRAConfig(
            rank=2,
            alpha=2,
            target_modules=["conv1", "conv2", "head"],
            bias="all",
            modules_to_save=None,
            init="gaussian",
        ),
    ),
    ("embed", LoRAConfig(rank=2, alpha=3, target_modules=["emb", "fc"], modules_to_save=["head"])),
    (
        "embed",
        LoRAConfig(
            rank=3,
            alpha=2,
            target_modules=["emb", "fc"],
            use_rslora=True,
            bias="all",
            modules_to_save=["head"],
        ),
    ),
]
IDS = [
    "mlp-save",
    "mlp-rslora-bias-all",
    "conv-lora-only",
    "conv-gaussian-bias-all",
    "embed-save",
    "embed-rslora-bias-all-save",
]


def _peft_config(config: LoRAConfig) -> object:
    return peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.target_modules),
        use_rslora=config.use_rslora,
        bias=config.bias,
        modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
        init_lora_weights=True if config.init == "kaiming" else "gaussian",
    )


def _randomize_trainables(model: nn.Module, params: list[nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)


@pytest.fixture(autouse=True)
def _quiet_peft(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("kind", "config"), CASES, ids=IDS)
def test_lora_lab_adapter_loads_in_peft(kind: str, config: LoRAConfig, tmp_path: Path) -> None:
    base = make_model(kind)
    ours = copy.deepcopy(base)
    inject_lora(ours, config)
    _randomize_trainables(ours, lora_parameters(ours), seed=3)
    save_adapter(ours, tmp_path)

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = make_input(kind)
    expected = ours(x)
    assert not torch.allclose(expected, base(x), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("kind", "config"), CASES, ids=IDS)
def test_peft_adapter_loads_in_lora_lab(kind: str, config: LoRAConfig, tmp_path: Path) -> None:
    base = make_model(kind)
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(config))
    _randomize_trainables(theirs, [p for p in theirs.parameters() if p.requires_grad], seed=4)
    theirs.save_pretrained(tmp_path)

    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path)
    x = make_input(kind)
    expected = theirs(x)
    assert not torch.allclose(expected, base(x), atol=1e-3)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)
    # Same trainable set as PEFT (names differ only by PEFT's wrapper internals).
    ours_count = sum(p.numel() for p in lora_parameters(ours))
    peft_count = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    if config.bias != "all" or not config.modules_to_save:  # PEFT counts the head bias twice
        assert ours_count == peft_count


@pytest.mark.filterwarnings("ignore")
def test_peft_and_lora_lab_files_have_the_same_keys(tmp_path: Path) -> None:
    config = CASES[2][1]
    base = make_model("conv")
    ours = copy.deepcopy(base)
    inject_lora(ours, config)
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(config))
    theirs.save_pretrained(tmp_path / "theirs")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_file = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_file.items()} == {
        k: v.shape for k, v in theirs_file.items()
    }
