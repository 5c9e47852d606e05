"""analyze_study on synthetic study folders with known answers (see conftest.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_lab.analysis import ANALYSIS_CSV, amplification_factor, analyze_study, load_adapter
from lora_lab.analysis.plots import choose_modules, pick_rank_pair, pick_seed_pair
from lora_lab.analysis.readers import Adapter
from tests.analysis.analysis_testkit import (
    OUT_DIM,
    orthonormal_rows,
    write_adapter,
    write_checkpoint,
)

SQRT26 = math.sqrt(26)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def table(main_study: Path) -> pd.DataFrame:
    return pd.read_csv(main_study / ANALYSIS_CSV)


def rows(table: pd.DataFrame, kind: str, **match: object) -> pd.DataFrame:
    selected = table[table["kind"] == kind]
    for column, value in match.items():
        selected = selected[selected[column] == value]
    return selected


def one(table: pd.DataFrame, kind: str, **match: object) -> pd.Series:
    selected = rows(table, kind, **match)
    assert len(selected) == 1, selected
    return selected.iloc[0]


def test_spectrum_rows_cover_every_weight_matrix_once(table: pd.DataFrame) -> None:
    spectrum = rows(table, "spectrum")
    # 1-D tensors (bias, norm scale) carry no spectrum.
    assert list(spectrum["layer"]) == ["conv1", "head", "hidden.0", "hidden.2"]
    assert dict(zip(spectrum["layer"], spectrum["adapted"], strict=True)) == {
        "conv1": True, "head": False, "hidden.0": True, "hidden.2": False,
    }  # fmt: skip
    conv = one(table, "spectrum", layer="conv1")
    assert conv["shape"] == "6x3x3x3" and conv["full_rank"] == 6


def test_spectrum_values_of_the_known_update(table: pd.DataFrame) -> None:
    # ΔW = 5·p1q1ᵀ + 1·p2q2ᵀ: σ = (5, 1), energies 25 and 1 of 26.
    row = one(table, "spectrum", layer="hidden.0")
    assert row["shape"] == f"{OUT_DIM}x12" and row["full_rank"] == 12
    assert row["sigma1"] == pytest.approx(5, rel=1e-5)
    assert row["sigma2"] == pytest.approx(1, rel=1e-5)
    assert row["sigma1_over_sigma2"] == pytest.approx(5, rel=1e-5)
    assert row["fro_norm"] == pytest.approx(SQRT26, rel=1e-5)
    assert row["rank90"] == 1 and row["rank99"] == 2
    p = torch.tensor([5.0, 1.0]) / 6
    assert row["effective_rank"] == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=1e-4)
    assert row["relative_update"] == pytest.approx(row["fro_norm"] / row["weight_fro_norm"])


@pytest.mark.parametrize(
    ("adapter", "scaling", "proj_top1", "proj_top_r", "relative_error", "norm_ratio"),
    [
        ("rank_2_seed_0", 2.0, 5 / SQRT26, 1.0, 0.0, 1.0),
        ("rank_4_seed_0", 2.0, 1.0, 1.0, 1 / SQRT26, 5 / SQRT26),
        # rsLoRA: scaling α/√r = 8/2, so ΔW = p3 q5ᵀ, orthogonal to ΔW_full.
        ("rank_4_seed_1", 4.0, 0.0, None, math.sqrt(27 / 26), 1 / SQRT26),
    ],
)
def test_lora_vs_full_known_values(
    table: pd.DataFrame,
    adapter: str,
    scaling: float,
    proj_top1: float,
    proj_top_r: float | None,
    relative_error: float,
    norm_ratio: float,
) -> None:
    row = one(table, "lora_vs_full", adapter=adapter, layer="hidden.0")
    assert row["scaling"] == pytest.approx(scaling)
    assert row["proj_top1"] == pytest.approx(proj_top1, abs=1e-5)
    if proj_top_r is not None:  # beyond rank 2, ΔW_full's singular vectors are arbitrary
        assert row["proj_top_r"] == pytest.approx(proj_top_r, abs=1e-5)
    assert row["relative_error"] == pytest.approx(relative_error, abs=1e-5)
    assert row["norm_ratio"] == pytest.approx(norm_ratio, rel=1e-5)
    assert row["k_top_r"] == row["rank"]
    assert row["amplification"] > 0


def test_amplification_matches_the_dense_definition(main_study: Path, table: pd.DataFrame) -> None:
    # The table computes it from the factors; the dense route must agree (rank-2 update with
    # distinct singular values, so its top-2 directions are well defined).
    weight = load_file(main_study / "checkpoints" / "pretrain.safetensors")["hidden.0.weight"]
    full = load_file(main_study / "checkpoints" / "full_finetune.safetensors")["hidden.0.weight"]
    adapter = load_adapter(main_study / "adapters" / "rank_2_seed_0", [])
    expected = amplification_factor(adapter.modules["hidden.0"].delta(), weight, 2)
    row = one(table, "lora_vs_full", adapter="rank_2_seed_0", layer="hidden.0")
    assert row["amplification"] == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(
        amplification_factor(full.double() - weight.double(), weight, 2), rel=1e-4
    )


def test_lora_vs_full_identity_columns_and_conv(table: pd.DataFrame) -> None:
    compared = rows(table, "lora_vs_full")
    assert len(compared) == 6  # 3 adapters × {hidden.0, conv1}
    conv = one(table, "lora_vs_full", adapter="rank_2_seed_0", layer="conv1")
    assert conv["relative_error"] == pytest.approx(0, abs=1e-5)
    assert conv["proj_top_r"] == pytest.approx(1, abs=1e-5)
    row = one(table, "lora_vs_full", adapter="rank_4_seed_1", layer="hidden.0")
    assert (row["rank"], row["seed"], row["alpha"]) == (4, 1, 8.0)
    assert row["test_acc"] == pytest.approx(0.84)  # joined from results.csv


@pytest.mark.parametrize(
    ("adapter_a", "adapter_b", "grid_size", "phi"),
    [
        ("rank_2_seed_0", "rank_4_seed_0", 2, 1.0),  # q1, q2 on top of both
        ("rank_2_seed_0", "rank_4_seed_1", 2, 0.0),  # orthogonal row spaces
        ("rank_4_seed_0", "rank_4_seed_1", 4, 0.0),
    ],
)
def test_subspace_rows_known_values(
    table: pd.DataFrame, adapter_a: str, adapter_b: str, grid_size: int, phi: float
) -> None:
    row = one(table, "subspace", layer="hidden.0", adapter_a=adapter_a, adapter_b=adapter_b)
    assert row["grid_size"] == grid_size
    for column in ("phi_top1", "phi_mean", "phi_full"):
        assert row[column] == pytest.approx(phi, abs=1e-6)


def test_subspace_rows_are_one_per_layer_and_pair(table: pd.DataFrame) -> None:
    subspace = rows(table, "subspace")
    assert sorted(subspace["layer"].unique()) == ["conv1", "hidden.0"]
    assert len(subspace) == 2 * 3
    assert (subspace["rank_a"] <= subspace["rank_b"]).all()
    assert subspace["phi_mean"].between(0, 1).all()


def test_csv_matches_the_returned_table_and_leaves_no_temp_files(main_study: Path) -> None:
    returned = analyze_study(main_study, make_plots=False)
    written = pd.read_csv(main_study / ANALYSIS_CSV)
    assert list(written.columns) == list(returned.columns)
    assert written["kind"].value_counts().to_dict() == {
        "spectrum": 4, "lora_vs_full": 6, "subspace": 6,
    }  # fmt: skip
    pd.testing.assert_series_equal(
        written["phi_mean"], returned["phi_mean"].astype(float), check_names=False
    )
    assert returned.attrs["notes"] == []
    assert not [p for p in main_study.iterdir() if p.name.endswith(".tmp")]


def test_pngs_are_real_images(main_study: Path) -> None:
    expected = {
        "analysis_spectrum.png",
        "analysis_subspace_hidden_0.png", "analysis_seeds_hidden_0.png",
        "analysis_subspace_conv1.png", "analysis_seeds_conv1.png",
    }  # fmt: skip
    assert {p.name for p in main_study.glob("analysis_*.png")} == expected
    for name in expected:
        path = main_study / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 200 and width > 300


def test_missing_adapters_give_spectrum_only_with_a_note(
    study_builder: Callable[..., Path],
) -> None:
    study = study_builder(adapters=False)
    table = analyze_study(study)
    assert set(table["kind"]) == {"spectrum"}
    assert not table["adapted"].any()
    assert any("adapters" in note and "missing" in note for note in table.attrs["notes"])
    assert [p.name for p in table.attrs["figures"]] == ["analysis_spectrum.png"]


def test_adapters_without_checkpoints_give_subspace_only(
    study_builder: Callable[..., Path],
) -> None:
    study = study_builder(checkpoints=False)
    table = analyze_study(study, make_plots=False)
    assert set(table["kind"]) == {"subspace"}
    assert any("both checkpoints" in note for note in table.attrs["notes"])
    row = one(table, "subspace", layer="hidden.0", adapter_a="rank_2_seed_0",
              adapter_b="rank_4_seed_0")  # fmt: skip
    assert row["phi_mean"] == pytest.approx(1.0)


@pytest.mark.parametrize("create", [True, False])
def test_folder_without_inputs_raises_one_clear_line(tmp_path: Path, create: bool) -> None:
    study = tmp_path / "empty_study"
    if create:
        (study / "adapters").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty_study") as error:
        analyze_study(study)
    message = str(error.value)
    assert "\n" not in message
    assert "pretrain.safetensors" in message and "adapters" in message


def test_linear_shift_update_is_rank_one_and_a_rank_one_adapter_finds_it(tmp_path: Path) -> None:
    # The synthetic linear-shift task in miniature: ΔW_full = ones + small noise.
    d_out, d_in = 10, 20
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(d_out, d_in, generator=generator)
    shift = torch.ones(d_out, d_in) + 1e-4 * torch.randn(d_out, d_in, generator=generator)
    write_checkpoint(tmp_path / "checkpoints" / "pretrain.safetensors", {"fc.weight": weight})
    write_checkpoint(
        tmp_path / "checkpoints" / "full_finetune.safetensors", {"fc.weight": weight + shift}
    )
    # A ∝ a ones row, B ∝ a ones column: the direction, not the exact size, of the shift.
    write_adapter(
        tmp_path / "adapters" / "rank_1_seed_0", 1, 1.0,
        {"fc": (0.3 * torch.ones(1, d_in), 2.0 * torch.ones(d_out, 1))},
    )  # fmt: skip
    table = analyze_study(tmp_path, make_plots=False)
    spectrum = one(table, "spectrum", layer="fc")
    assert spectrum["sigma1_over_sigma2"] > 100
    assert spectrum["effective_rank"] < 1.1
    assert spectrum["rank90"] == spectrum["rank99"] == 1
    compared = one(table, "lora_vs_full", layer="fc")
    assert compared["proj_top1"] > 0.99
    assert compared["norm_ratio"] == pytest.approx(0.6, rel=1e-3)  # 0.3·2·ones vs ones


def test_embedding_adapter_delta_is_transposed(tmp_path: Path) -> None:
    # nn.Embedding weight is [num_embeddings, dim]; PEFT stores A [r, num], B [dim, r].
    num, dim, rank = 10, 4, 2
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(rank, num, generator=generator)
    b = torch.randn(dim, rank, generator=generator)
    weight = torch.randn(num, dim, generator=generator)
    write_checkpoint(tmp_path / "checkpoints" / "pretrain.safetensors", {"emb.weight": weight})
    write_checkpoint(
        tmp_path / "checkpoints" / "full_finetune.safetensors",
        {"emb.weight": weight + (b @ a).T * 1.5},
    )
    directory = tmp_path / "adapters" / "rank_2_seed_0"
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 3}))
    save_file(
        {
            "base_model.model.emb.lora_embedding_A": a.contiguous(),
            "base_model.model.emb.lora_embedding_B": b.contiguous(),
        },
        directory / "adapter_model.safetensors",
    )
    table = analyze_study(tmp_path, make_plots=False)
    row = one(table, "lora_vs_full", layer="emb")
    assert row["relative_error"] == pytest.approx(0, abs=1e-5)
    assert row["proj_top_r"] == pytest.approx(1, abs=1e-5)


def test_unreadable_and_foreign_files_are_noted_not_fatal(
    study_builder: Callable[..., Path],
) -> None:
    study = study_builder()
    broken = study / "adapters" / "rank_8_seed_0"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    (study / "adapters" / "rank_16_seed_0").mkdir()  # an unfinished run
    table = analyze_study(study, make_plots=False)
    notes = " | ".join(table.attrs["notes"])
    assert "rank_8_seed_0" in notes and "rank_16_seed_0" in notes
    assert len(rows(table, "lora_vs_full")) == 6


def fake_adapter(rank: int, seed: int | None) -> Adapter:
    return Adapter(f"rank_{rank}_seed_{seed}", rank, seed, 2.0 * rank, False, {})


def test_figure_choices_follow_the_paper() -> None:
    adapters = [fake_adapter(r, s) for r in (1, 8, 32, 64) for s in (0, 1)]
    small, large = pick_rank_pair(adapters)
    assert (small.rank, large.rank, small.seed, large.seed) == (8, 64, 0, 0)
    first, second = pick_seed_pair(adapters)
    assert (first.rank, second.rank, {first.seed, second.seed}) == (64, 64, {0, 1})
    others = [fake_adapter(r, 0) for r in (2, 4, 16)]
    assert [a.rank for a in pick_rank_pair(others)] == [2, 16]
    assert pick_seed_pair(others) is None
    assert pick_rank_pair([fake_adapter(4, 0), fake_adapter(4, 1)]) is None


def test_layer_choice_is_all_when_few_else_first_and_head() -> None:
    few = ["hidden.2", "hidden.0", "head"]
    assert choose_modules(few, {}) == ["head", "hidden.0", "hidden.2"]
    many = ["hidden.0", "hidden.2", "hidden.4", "hidden.6", "hidden.10", "head"]
    assert choose_modules(many, {}) == ["hidden.0", "head"]
    convnet = ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert choose_modules(convnet, {}) == ["conv1", "fc3"]


def test_a_wrapper_prefix_in_the_checkpoint_still_matches(tmp_path: Path) -> None:
    q = orthonormal_rows(6, 0)
    weight = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    delta = torch.outer(torch.ones(5, dtype=torch.float64), q[0])
    write_checkpoint(tmp_path / "checkpoints" / "pretrain.safetensors", {"net.fc.weight": weight})
    write_checkpoint(
        tmp_path / "checkpoints" / "full_finetune.safetensors", {"net.fc.weight": weight + delta}
    )
    write_adapter(tmp_path / "adapters" / "rank_1_seed_0", 1, 1.0,
                  {"fc": (q[:1], torch.ones(5, 1))})  # fmt: skip
    table = analyze_study(tmp_path, make_plots=False)
    assert one(table, "spectrum", layer="net.fc")["adapted"]
    assert one(table, "lora_vs_full", layer="net.fc")["relative_error"] == pytest.approx(
        0, abs=1e-5
    )


def test_the_full_finetune_compared_with_is_the_chosen_one(tmp_path: Path) -> None:
    # A baseline per seed and learning rate: the lowest seed at the lr chosen on validation.
    from lora_lab.analysis.study import full_finetune_file

    rows = [
        "run_id,stage,seed,learning_rate,selected,status",
        "pretrain,pretrain,0,0.001,True,ok",
        "full_finetune_lr0.001_s1,full_finetune,1,0.001,False,ok",
        "full_finetune_lr0.003_s1,full_finetune,1,0.003,True,ok",
        "full_finetune_lr0.003_s0,full_finetune,0,0.003,True,ok",
        "full_finetune_lr0.001_s0,full_finetune,0,0.001,False,ok",
    ]
    (tmp_path / "results.csv").write_text("\n".join(rows) + "\n")
    assert full_finetune_file(tmp_path) == Path("checkpoints/full_finetune_lr0.003_s0.safetensors")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "full_finetune.safetensors").write_bytes(b"")
    assert full_finetune_file(tmp_path) == Path("checkpoints/full_finetune.safetensors")
