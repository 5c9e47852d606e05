"""lora_lab against HF PEFT: LoRA and DoRA adapters both ways, PiSSA init and conversion, LoRA+."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lora_lab.interop import import_peft
from lora_lab.lora import (
    LoRAConfig,
    inject_lora,
    load_adapter,
    lora_layers,
    lora_parameter_groups,
    lora_parameters,
    save_adapter,
)
from tests.lora.testkit import make_input, make_model

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
DORA_CASES = [
    (
        "mlp",
        LoRAConfig(
            rank=3, alpha=6, target_modules=["fc1", "fc2", "head"], use_dora=True, bias="lora_only"
        ),
    ),
    (
        "conv",
        LoRAConfig(
            rank=2,
            alpha=4,
            target_modules=["conv1", "conv2"],
            use_dora=True,
            use_rslora=True,
            modules_to_save=["head"],
        ),
    ),
    (
        "conv",
        LoRAConfig(
            rank=2, alpha=2, target_modules=["conv1", "conv2", "head"], use_dora=True, bias="all"
        ),
    ),
    (
        "embed",
        LoRAConfig(
            rank=2, alpha=3, target_modules=["emb", "fc"], use_dora=True, modules_to_save=["head"]
        ),
    ),
]
CASES += DORA_CASES
IDS = [
    "mlp-save",
    "mlp-rslora-bias-all",
    "conv-lora-only",
    "conv-gaussian-bias-all",
    "embed-save",
    "embed-rslora-bias-all-save",
    "dora-mlp-lora-only",
    "dora-conv-rslora-save",
    "dora-conv-bias-all",
    "dora-embed-save",
]
PEFT_INIT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa"}


def _peft_config(config: LoRAConfig) -> object:
    return peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.target_modules),
        use_rslora=config.use_rslora,
        bias=config.bias,
        modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
        init_lora_weights=PEFT_INIT[config.init],
        use_dora=config.use_dora,
        lora_dropout=config.dropout,
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
@pytest.mark.parametrize(("kind", "config"), [CASES[2], *DORA_CASES], ids=["conv", *IDS[6:]])
def test_peft_and_lora_lab_files_have_the_same_keys(
    kind: str, config: LoRAConfig, tmp_path: Path
) -> None:
    base = make_model(kind)
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
    if config.use_dora:  # fresh magnitudes: ‖W‖ in PEFT's layout, bit for bit
        magnitudes = [k for k in theirs_file if k.endswith(".lora_magnitude_vector")]
        assert magnitudes and all(torch.equal(ours_file[k], theirs_file[k]) for k in magnitudes)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_dora_with_dropout_trains_as_peft(kind: str, tmp_path: Path) -> None:
    """Same dropout masks (same seed, same draw order) give the same training output."""
    targets = ["fc1", "fc2"] if kind == "mlp" else ["conv1", "conv2"]
    config = LoRAConfig(rank=2, alpha=4, target_modules=targets, use_dora=True, dropout=0.3)
    base = make_model(kind)
    ours = copy.deepcopy(base)
    inject_lora(ours, config)
    _randomize_trainables(ours, lora_parameters(ours), seed=7)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    x = make_input(kind)
    ours.train()
    theirs.train()
    torch.manual_seed(11)
    expected = theirs(x)
    torch.manual_seed(11)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


# PiSSA: PEFT's init, PEFT's conversion to a rank-2r LoRA on the unmodified base.
PISSA = LoRAConfig(rank=3, alpha=6, target_modules=["fc1", "fc2"], init="pissa")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_init_is_peft_s(use_rslora: bool) -> None:
    config = dataclasses.replace(PISSA, use_rslora=use_rslora)
    base = make_model("mlp")
    ours = copy.deepcopy(base)
    inject_lora(ours, config)
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(config))
    for name in config.target_modules:
        mine, peft_layer = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        for got, expected in [
            (mine.lora_A.weight, peft_layer.lora_A["default"].weight),
            (mine.lora_B.weight, peft_layer.lora_B["default"].weight),
            (mine.base_layer.weight, peft_layer.base_layer.weight),  # the residual
        ]:
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def _nudge_pissa(factors: list[nn.Parameter]) -> None:
    _randomize_trainables(nn.Module(), factors, seed=9)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_conversion_matches_peft_both_ways(use_rslora: bool, tmp_path: Path) -> None:
    config = dataclasses.replace(PISSA, use_rslora=use_rslora)
    base = make_model("mlp")
    x = make_input("mlp")
    ours = copy.deepcopy(base)
    inject_lora(ours, config)
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(config))
    theirs.save_pretrained(tmp_path / "init")  # PEFT needs the initial adapter on disk
    _nudge_pissa(lora_parameters(ours))  # the same noise, in the same A, B order
    _nudge_pissa([p for p in theirs.parameters() if p.requires_grad])
    expected = ours(x)
    torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-6)
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(
        tmp_path / "theirs", path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )

    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora", "use_dora"):
        assert ours_config[key] == pytest.approx(theirs_config[key]), key
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_file = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert ours_file.keys() == theirs_file.keys()
    for key, tensor in theirs_file.items():
        torch.testing.assert_close(ours_file[key], tensor, rtol=0, atol=1e-6)

    # Each converted adapter, on the unmodified base, gives the trained PiSSA model's logits.
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(in_peft(x), expected, rtol=1e-5, atol=1e-5)
    here = copy.deepcopy(base)
    load_adapter(here, tmp_path / "theirs")
    torch.testing.assert_close(here(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore")
def test_unconverted_peft_pissa_adapter_loads_here(tmp_path: Path) -> None:
    """PEFT's plain save of a PiSSA model (init 'pissa') is re-initialised from W, as PEFT does."""
    base = make_model("mlp")
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(PISSA))
    _nudge_pissa([p for p in theirs.parameters() if p.requires_grad])
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path)
    x = make_input("mlp")
    assert {layer.method for layer in lora_layers(ours).values()} == {"pissa"}
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


# LoRA+: the same tensors at the same learning rates as PEFT's create_loraplus_optimizer.
LORAPLUS_CASES = [
    ("mlp", DORA_CASES[0][1]),
    ("mlp", LoRAConfig(rank=2, alpha=2, target_modules=["fc1"], bias="all")),
    ("conv", DORA_CASES[1][1]),
    ("conv", DORA_CASES[2][1]),
    ("embed", DORA_CASES[3][1]),
    ("embed", CASES[4][1]),
]


def _lora_lab_name(peft_name: str) -> str:
    name = peft_name.removeprefix("base_model.model.")
    name = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
    return name.replace(".modules_to_save.default.", ".").replace(".default", "")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("kind", "config"), LORAPLUS_CASES)
def test_loraplus_groups_match_peft(kind: str, config: LoRAConfig) -> None:
    base = make_model(kind)
    ours = copy.deepcopy(base)
    inject_lora(ours, config)
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(config))
    # peft.optimizers is not imported by `import peft` (it needs transformers).
    optimizer = importlib.import_module("peft.optimizers").create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16
    )
    peft_names = {id(p): _lora_lab_name(n) for n, p in theirs.named_parameters()}
    expected: dict[float, set[str]] = {}
    for group in optimizer.param_groups:
        if group["params"]:
            expected.setdefault(group["lr"], set()).update(
                peft_names[id(p)] for p in group["params"]
            )
    our_names = {id(p): n for n, p in ours.named_parameters()}
    groups = lora_parameter_groups(ours, lr=1e-3, loraplus_lr_ratio=16)
    got = {g["lr"]: {our_names[id(p)] for p in g["params"]} for g in groups}
    assert got == expected
