"""analyze_study on synthetic study folders with known answers (see testkit.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from lora_lab.analysis import (
    ANALYSIS_CSV,
    AdapterRun,
    amplification_factor,
    analyze_study,
    find_runs,
    load_adapter_run,
)
from lora_lab.analysis.plots import choose_layers, pick_rank_pair, pick_seed_pair
from lora_lab.lora import LoRAConfig, inject_lora, lora_delta_weight, lora_layers, save_adapter
from lora_lab.results import RunResult
from tests.analysis.testkit import (
    EMBEDDER,
    OUT_DIM,
    toy_weights,
    write_lora_run,
    write_results_csv,
    write_run,
    write_weights_run,
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
    runs = find_runs(main_study, [])
    run = next(run for run in runs.lora if run.path.name == "rank_2_seed_0")
    adapter = load_adapter_run(run, runs.pretrain.path, [])
    expected = amplification_factor(adapter.layers["hidden.0"].delta, weight, 2)
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
    assert row["test_acc"] == pytest.approx(0.84)  # from the run's result.json


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
    assert any("no finished LoRA run" in note for note in table.attrs["notes"])
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
    model = {"_target_": "lora_lab.models.LinearMap", "d_in": d_in, "d_out": d_out}
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(d_out, d_in, generator=generator)
    shift = torch.ones(d_out, d_in) + 1e-4 * torch.randn(d_out, d_in, generator=generator)
    write_weights_run(tmp_path, "pretrain", "pretrain", {"linear.weight": weight}, model=model)
    write_weights_run(
        tmp_path, "full_finetune", "full_finetune", {"linear.weight": weight + shift}, model=model
    )
    # A ∝ a ones row, B ∝ a ones column: the direction, not the exact size, of the shift.
    write_lora_run(
        tmp_path, "rank_1_seed_0", 1, 1.0, 0,
        {"linear": (0.3 * torch.ones(1, d_in), 2.0 * torch.ones(d_out, 1))}, model=model,
    )  # fmt: skip
    table = analyze_study(tmp_path, make_plots=False)
    spectrum = one(table, "spectrum", layer="linear")
    assert spectrum["sigma1_over_sigma2"] > 100
    assert spectrum["effective_rank"] < 1.1
    assert spectrum["rank90"] == spectrum["rank99"] == 1
    compared = one(table, "lora_vs_full", layer="linear")
    assert compared["proj_top1"] > 0.99
    assert compared["norm_ratio"] == pytest.approx(0.6, rel=1e-3)  # 0.3·2·ones vs ones


def test_embedding_adapter_delta_is_transposed(tmp_path: Path) -> None:
    # nn.Embedding weight is [num_embeddings, dim]; PEFT stores A [r, num], B [dim, r].
    num, dim, rank = 10, 4, 2
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(rank, num, generator=generator)
    b = torch.randn(dim, rank, generator=generator)
    weight = torch.randn(num, dim, generator=generator)
    full = {"emb.weight": weight + (b @ a).T * 1.5}
    write_weights_run(tmp_path, "pretrain", "pretrain", {"emb.weight": weight}, model=EMBEDDER)
    write_weights_run(tmp_path, "full_finetune", "full_finetune", full, model=EMBEDDER)
    write_lora_run(tmp_path, "rank_2_seed_0", rank, 3.0, 0, {"emb": (a, b)}, embedding=True,
                   model=EMBEDDER)  # fmt: skip
    table = analyze_study(tmp_path, make_plots=False)
    row = one(table, "lora_vs_full", layer="emb")
    assert row["relative_error"] == pytest.approx(0, abs=1e-5)
    assert row["proj_top_r"] == pytest.approx(1, abs=1e-5)


def test_dora_delta_is_the_cores_and_matches_the_merged_update(tmp_path: Path) -> None:
    # The DoRA update m/‖W + s·B·A‖·(W + s·B·A) − W is not B·A·s: the analysis must take
    # ΔW from the core on the pretrained network.
    from tests.analysis.testkit import ToyNet

    generator = torch.Generator().manual_seed(4)
    pretrain = toy_weights(generator)
    network = ToyNet()
    network.load_state_dict({key: value.float() for key, value in pretrain.items()})
    inject_lora(network, LoRAConfig(rank=2, alpha=4, target_modules=["hidden.0", "conv1"],
                                    use_dora=True))  # fmt: skip
    with torch.no_grad():
        for layer in lora_layers(network).values():
            for tensor in layer.adapter_parameters():
                tensor.add_(0.3 * torch.randn(tensor.shape, generator=generator))
    expected = {
        name: lora_delta_weight(layer).detach() for name, layer in lora_layers(network).items()
    }
    save_adapter(network, tmp_path / "adapters" / "dora")
    full = {key: value + expected[key.removesuffix(".weight")].double()
            if key.removesuffix(".weight") in expected else value
            for key, value in pretrain.items()}  # fmt: skip
    write_weights_run(tmp_path, "pretrain", "pretrain", pretrain)
    write_weights_run(tmp_path, "full_finetune", "full_finetune", full)
    write_run(tmp_path, "lora_dora_r2_a4_s0", "lora", artefact="adapters/dora", rank=2,
              alpha=4.0, seed=0, method="dora")  # fmt: skip

    notes: list[str] = []
    runs = find_runs(tmp_path, notes)
    adapter = load_adapter_run(runs.lora[0], runs.pretrain.path, notes)
    assert adapter is not None and notes == []
    assert set(adapter.layers) == {"conv1", "hidden.0"}
    for name, delta in expected.items():
        torch.testing.assert_close(adapter.layers[name].delta, delta.double())
        assert not torch.allclose(delta, lora_layers(network)[name].delta_weight(), atol=1e-3)
    table = analyze_study(tmp_path, make_plots=False)
    for layer in ("conv1", "hidden.0"):
        row = one(table, "lora_vs_full", layer=layer, adapter="dora")
        assert row["relative_error"] == pytest.approx(0, abs=1e-5)
        assert row["proj_top_r"] <= 1 + 1e-9
    assert not [note for note in table.attrs["notes"] if "DoRA" in note]


def test_unreadable_and_foreign_files_are_noted_not_fatal(
    study_builder: Callable[..., Path],
) -> None:
    study = study_builder()
    broken = study / "adapters" / "rank_8_seed_0"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["hidden.0"]})
    )
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    write_run(study, "lora_r8_a8_s0", "lora", artefact="adapters/rank_8_seed_0", rank=8, seed=0)
    (study / "adapters" / "rank_16_seed_0").mkdir()  # a run whose adapter went missing
    write_run(study, "lora_r16_a16_s0", "lora", artefact="adapters/rank_16_seed_0", rank=16)
    (study / "runs" / "lora_r32_a32_s0").mkdir()
    (study / "runs" / "lora_r32_a32_s0" / "result.json").write_text("{not json")
    table = analyze_study(study, make_plots=False)
    notes = " | ".join(table.attrs["notes"])
    assert "lora_r8_a8_s0" in notes and "adapter weights" in notes
    assert "lora_r16_a16_s0" in notes and "rank_16_seed_0" in notes
    assert "lora_r32_a32_s0" in notes and "corrupt" in notes
    assert len(rows(table, "lora_vs_full")) == 6


def fake_adapter(rank: int, seed: int | None, **fields: object) -> AdapterRun:
    """A run with no layers, for the figure choices (which only read identities)."""
    fields = {"alpha": 2.0 * rank, **fields}
    run = RunResult(f"r{rank}_s{seed}", "lora", rank=rank, seed=seed, **fields)  # type: ignore[arg-type]
    return AdapterRun(f"adapter_{rank}_{seed}", run, {})


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


def test_a_seed_pair_differs_in_the_seed_only() -> None:
    # An alpha grid: rank 4 at α 1 and 16, seeds 0 and 1 each.
    grid = [fake_adapter(4, seed, alpha=alpha) for alpha in (1.0, 16.0) for seed in (0, 1)]
    first, second = pick_seed_pair(grid)
    assert (first.run.alpha, second.run.alpha, first.seed, second.seed) == (1.0, 1.0, 0, 1)
    assert pick_seed_pair([fake_adapter(4, 0, alpha=1.0), fake_adapter(4, 1, alpha=16.0)]) is None
    low, high = pick_rank_pair([*grid, fake_adapter(8, 1, alpha=16.0)])
    assert (low.seed, low.run.alpha, high.rank) == (1, 16.0, 8)


def test_layer_choice_is_all_when_few_else_first_and_head() -> None:
    few = ["hidden.2", "hidden.0", "head"]
    assert choose_layers(few) == ["head", "hidden.0", "hidden.2"]
    many = ["hidden.0", "hidden.2", "hidden.4", "hidden.6", "hidden.10", "head"]
    assert choose_layers(many) == ["hidden.0", "head"]
    convnet = ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert choose_layers(convnet) == ["conv1", "fc3"]


def test_the_full_finetune_compared_with_is_the_chosen_one(tmp_path: Path) -> None:
    # A baseline per seed and learning rate: the lowest seed at the lr chosen on validation.
    state = {"linear.weight": torch.zeros(2, 2)}
    for run_id, lr, seed in [("full_finetune_lr0.001_s1", 0.001, 1),
                             ("full_finetune_lr0.003_s1", 0.003, 1),
                             ("full_finetune_lr0.003_s0", 0.003, 0),
                             ("full_finetune_lr0.001_s0", 0.001, 0)]:  # fmt: skip
        write_weights_run(tmp_path, run_id, "full_finetune", state, learning_rate=lr, seed=seed)
    write_results_csv(tmp_path)
    table = pd.read_csv(tmp_path / "results.csv")
    table["selected"] = table["learning_rate"] == 0.003
    table.to_csv(tmp_path / "results.csv", index=False)
    notes: list[str] = []
    runs = find_runs(tmp_path, notes)
    assert runs.full_finetune.result.run_id == "full_finetune_lr0.003_s0"
    assert runs.full_finetune.path == tmp_path / "checkpoints/full_finetune_lr0.003_s0.safetensors"
    assert notes == []
    # Without a readable results.csv: the lowest seed of any learning rate, with a note.
    (tmp_path / "results.csv").unlink()
    runs = find_runs(tmp_path, notes)
    assert runs.full_finetune.result.run_id == "full_finetune_lr0.001_s0"
    assert any("results.csv" in note for note in notes)
