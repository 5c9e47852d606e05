"""save_adapter / load_adapter: exact round trips, the file format, errors, hot swap."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_lab.lora import (
    LoRAConfig,
    inject_lora,
    load_adapter,
    lora_config,
    lora_layers,
    merge_lora,
    save_adapter,
)
from tests.lora.testkit import (
    assert_same_snapshot,
    make_input,
    make_model,
    perturb_adapters,
    snapshot,
)

CASES = [
    ("mlp", LoRAConfig(rank=3, alpha=6, modules_to_save=["head"], bias="lora_only")),
    ("conv", LoRAConfig(rank=2, alpha=4, target_modules=["conv1", "conv2"], bias="all")),
    ("embed", LoRAConfig(rank=2, alpha=3.5, target_modules=["emb", "fc"], init="gaussian")),
]
PREFIX = "base_model.model."
Edit = Callable[[dict[str, torch.Tensor]], object]


def _trained(kind: str, config: LoRAConfig, seed: int = 0) -> nn.Module:
    """An adapted model whose adapter, saved modules and biases all differ from the base."""
    model = make_model(kind)
    inject_lora(model, config)
    perturb_adapters(model, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.dim() <= 2 and not _is_factor(model, param):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _is_factor(model: nn.Module, param: nn.Parameter) -> bool:
    return any(
        param is p for layer in lora_layers(model).values() for p in layer.adapter_parameters()
    )


@pytest.mark.parametrize(("kind", "config"), CASES)
def test_round_trip_is_exact(kind: str, config: LoRAConfig, tmp_path: Path) -> None:
    model = _trained(kind, config)
    x = make_input(kind)
    save_adapter(model, tmp_path / "nested" / "adapter")
    fresh = make_model(kind)
    names = load_adapter(fresh, tmp_path / "nested" / "adapter")
    assert names == list(lora_layers(model))
    assert torch.equal(fresh(x), model(x))
    trained = model.state_dict()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    assert lora_config(fresh).rank == config.rank


def test_file_format_matches_peft(tmp_path: Path) -> None:
    model = _trained(
        "mlp",
        LoRAConfig(rank=3, alpha=6, target_modules=["fc1"], modules_to_save=["head"], bias="all"),
    )
    inject_dir = save_adapter(model, tmp_path)
    tensors = load_file(inject_dir / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(
        PREFIX + k
        for k in [
            "fc1.lora_A.weight",
            "fc1.lora_B.weight",
            "fc1.base_layer.bias",
            "fc2.bias",  # bias="all": wrapped layers via base_layer
            "head.weight",
            "head.bias",  # modules_to_save, under the module's own name
        ]
    )
    assert tensors[PREFIX + "fc1.lora_A.weight"].shape == (3, 6)
    assert tensors[PREFIX + "fc1.lora_B.weight"].shape == (12, 3)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == 6
    assert config["target_modules"] == ["fc1"] and config["modules_to_save"] == ["head"]
    assert config["init_lora_weights"] is True and config["bias"] == "all"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",  # no temp files left behind
    ]


def test_ambiguous_targets_are_saved_as_an_exact_regex(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    inject_lora(model, LoRAConfig(rank=1, alpha=1, target_modules=r"0"))
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert saved == "0"  # as a list, ["0"] would also match "1.0" under suffix rules
    fresh = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    assert load_adapter(fresh, tmp_path) == ["0"]


def test_embedding_keys(tmp_path: Path) -> None:
    model = _trained("embed", LoRAConfig(rank=2, alpha=2, target_modules=["emb"]))
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        PREFIX + "emb.lora_embedding_A": (2, 30),
        PREFIX + "emb.lora_embedding_B": (8, 2),
    }


def test_save_without_adapter_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no LoRA adapter to save"):
        save_adapter(make_model("mlp"), tmp_path)


def _saved(tmp_path: Path, kind: str = "mlp", config: LoRAConfig | None = None) -> Path:
    config = config or LoRAConfig(rank=2, alpha=4, modules_to_save=["head"])
    save_adapter(_trained(kind, config), tmp_path / "adapter")
    return tmp_path / "adapter"


def _edit_tensors(folder: Path, edit: Edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("adapted", [False, True], ids=["base-model", "adapted-model"])
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.pop(PREFIX + "fc2.lora_B.weight"),
            r"missing keys: base_model\.model\.fc2\.lora_B\.weight",
        ),
        (
            lambda t: t.update({PREFIX + "fc9.lora_A.weight": torch.zeros(2, 2)}),
            r"unexpected keys: base_model\.model\.fc9\.lora_A\.weight",
        ),
        (
            lambda t: t.update({PREFIX + "fc1.lora_A.weight": torch.zeros(3, 6)}),
            r"shape mismatches: base_model\.model\.fc1\.lora_A\.weight \(file \[3, 6\], model \[2, 6\]\)",
        ),
        (
            lambda t: t.update({PREFIX + "head.weight": torch.zeros(4, 11)}),
            r"shape mismatches: base_model\.model\.head\.weight",
        ),
    ],
    ids=["missing", "unexpected", "shape", "modules-to-save-shape"],
)
def test_bad_weights_are_reported_and_change_nothing(
    tmp_path: Path, edit: Edit, message: str, adapted: bool
) -> None:
    folder = _saved(tmp_path)
    _edit_tensors(folder, edit)
    model = make_model("mlp")
    if adapted:
        inject_lora(model, LoRAConfig(rank=1, alpha=1, target_modules=["fc1"]))
        perturb_adapters(model, seed=5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, folder)
    assert_same_snapshot(before, snapshot(model))


def test_all_problems_are_reported_in_one_error(tmp_path: Path) -> None:
    folder = _saved(tmp_path)

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors.pop(PREFIX + "fc2.lora_A.weight")
        tensors[PREFIX + "extra"] = torch.zeros(1)
        tensors[PREFIX + "fc1.lora_B.weight"] = torch.zeros(1, 1)

    _edit_tensors(folder, edit)
    with pytest.raises(ValueError, match=r"missing keys.*unexpected keys.*shape mismatches"):
        load_adapter(make_model("mlp"), folder)


def test_loading_into_a_merged_model_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    model = make_model("mlp")
    load_adapter(model, folder)
    merge_lora(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="merged model; call unmerge_lora first"):
        load_adapter(model, folder)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "adapter_model.safetensors",
            b"\x00garbage",
            r"cannot read adapter weights .*adapter_model",
        ),
        ("adapter_model.safetensors", None, r"cannot read adapter weights .*adapter_model"),
        ("adapter_config.json", b"{not json", r"cannot read adapter config .*adapter_config.json"),
        ("adapter_config.json", None, r"cannot read adapter config .*adapter_config.json"),
        ("adapter_config.json", b"[1, 2]", r"adapter_config.json is not a JSON object"),
        (
            "adapter_config.json",
            b'{"peft_type": "LORA", "r": 0, "target_modules": ["fc1"]}',
            r"adapter_config.json: rank must be an int >= 1, got 0",
        ),
    ],
)
def test_unreadable_files_are_named(
    tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    folder = _saved(tmp_path)
    if content is None:
        (folder / name).unlink()
    else:
        (folder / name).write_bytes(content)
    model = make_model("mlp")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, folder)
    assert_same_snapshot(before, snapshot(model))


def test_truncated_safetensors_is_named(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="cannot read adapter weights"):
        load_adapter(make_model("mlp"), folder)


def test_config_targets_missing_from_the_model(tmp_path: Path) -> None:
    folder = _saved(tmp_path, "conv", LoRAConfig(rank=2, alpha=2, target_modules=["conv1"]))
    with pytest.raises(ValueError, match="matched no module; candidate layers"):
        load_adapter(make_model("mlp"), folder)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (LoRAConfig(rank=2, alpha=4), LoRAConfig(rank=2, alpha=3, dropout=0.1)),  # same layout
        (LoRAConfig(rank=2, alpha=4), LoRAConfig(rank=5, alpha=4)),  # new rank
        (
            LoRAConfig(rank=2, alpha=4, target_modules=["fc1", "head"]),
            LoRAConfig(rank=2, alpha=4, target_modules=["fc2"], use_rslora=True),
        ),  # new targets
        (
            LoRAConfig(rank=2, alpha=4, target_modules=["head"]),
            LoRAConfig(rank=2, alpha=4, modules_to_save=["head"]),
        ),  # head: adapted -> saved
    ],
    ids=["same-layout", "new-rank", "new-targets", "head-adapted-then-saved"],
)
def test_hot_swap_gives_the_second_adapters_outputs(
    tmp_path: Path, first: LoRAConfig, second: LoRAConfig
) -> None:
    x = make_input("mlp")
    model_x, model_y = _trained("mlp", first, seed=1), _trained("mlp", second, seed=2)
    save_adapter(model_x, tmp_path / "x")
    save_adapter(model_y, tmp_path / "y")
    model_y.eval()
    expected = model_y(x)

    model = make_model("mlp")
    load_adapter(model, tmp_path / "x")
    torch.testing.assert_close(model(x), model_x(x), rtol=0, atol=0)
    load_adapter(model, tmp_path / "y")
    model.eval()
    assert torch.equal(model(x), expected)
    loaded = lora_config(model)
    assert loaded is not None  # targets come back resolved, e.g. "all-linear" -> a list
    assert dataclasses.replace(second, target_modules=loaded.target_modules) == loaded
    assert list(lora_layers(model)) == list(lora_layers(model_y))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in model_y.named_parameters() if p.requires_grad
    }


def test_hot_swap_warns_when_saved_modules_keep_old_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_adapter(
        _trained("mlp", LoRAConfig(rank=2, alpha=2, modules_to_save=["head"])), tmp_path / "x"
    )
    save_adapter(_trained("mlp", LoRAConfig(rank=2, alpha=2)), tmp_path / "y")
    model = make_model("mlp")
    load_adapter(model, tmp_path / "x")
    with caplog.at_level(logging.WARNING, logger="lora_lab.lora"):
        load_adapter(model, tmp_path / "y")
    assert "['head'] keep the previous adapter's trained weights" in caplog.text
