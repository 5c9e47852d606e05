"""Run identity comes from each run's result.json, never from folder names."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from lora_lab.analysis import analyze_study
from tests.analysis.testkit import (
    IN_DIM,
    OUT_DIM,
    toy_weights,
    write_lora_run,
    write_results_csv,
    write_run,
    write_weights_run,
)

# What `sweep.alphas` and `sweep.learning_rates` grids name their adapters.
GRIDS = {
    "alpha": [
        ("rank_4_seed_0_alpha_1", {"alpha": 1.0, "seed": 0}),
        ("rank_4_seed_1_alpha_1", {"alpha": 1.0, "seed": 1}),
        ("rank_4_seed_0_alpha_16", {"alpha": 16.0, "seed": 0}),
        ("rank_4_seed_1_alpha_16", {"alpha": 16.0, "seed": 1}),
    ],
    "learning_rate": [
        ("rank_4_seed_0_lr_0.001", {"learning_rate": 0.001, "seed": 0}),
        ("rank_4_seed_1_lr_0.001", {"learning_rate": 0.001, "seed": 1}),
        ("rank_4_seed_0_lr_0.003", {"learning_rate": 0.003, "seed": 0}),
        ("rank_4_seed_1_lr_0.003", {"learning_rate": 0.003, "seed": 1}),
    ],
}


def build_study(root: Path, runs: list[tuple[str, dict]]) -> dict[str, float]:
    """Pretrain and full finetune of `ToyNet`, and one rank-4 adapter of `hidden.0` per
    (folder name, record fields); returns each folder's test_acc."""
    generator = torch.Generator().manual_seed(0)
    pretrain = toy_weights(generator)
    full = {key: value + 0.1 * torch.randn(value.shape, generator=generator, dtype=value.dtype)
            for key, value in pretrain.items()}  # fmt: skip
    write_weights_run(root, "pretrain", "pretrain", pretrain, seed=0)
    write_weights_run(root, "full_finetune", "full_finetune", full, seed=0)
    accuracies = {}
    for index, (name, fields) in enumerate(runs):
        factors = {"hidden.0": (torch.randn(4, IN_DIM, generator=generator),
                                torch.randn(OUT_DIM, 4, generator=generator))}  # fmt: skip
        accuracies[name] = 0.8 + index / 100
        fields = {"alpha": 4.0, "learning_rate": 0.001, **fields}
        write_lora_run(root, name, 4, factors=factors, test_acc=accuracies[name], **fields)
    write_results_csv(root)
    return accuracies


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_grid_adapter_names_keep_their_seeds(tmp_path: Path, grid: str) -> None:
    accuracies = build_study(tmp_path, GRIDS[grid])
    table = analyze_study(tmp_path)

    compared = table[table["kind"] == "lora_vs_full"].set_index("adapter")
    assert sorted(compared.index) == sorted(accuracies)
    assert compared["seed"].notna().all()
    for name, fields in GRIDS[grid]:
        assert compared.loc[name, "seed"] == fields["seed"]
        assert compared.loc[name, "test_acc"] == pytest.approx(accuracies[name])

    subspace = table[table["kind"] == "subspace"]
    assert subspace[["seed_a", "seed_b"]].notna().all().all()
    seed_pairs = subspace[subspace["seed_a"] != subspace["seed_b"]]
    assert set(seed_pairs["seed_a"]) | set(seed_pairs["seed_b"]) == {0, 1}
    first, second = GRIDS[grid][2][0], GRIDS[grid][3][0]  # one setting, seeds 0 and 1
    pair = seed_pairs[(seed_pairs["adapter_a"] == first) & (seed_pairs["adapter_b"] == second)]
    assert len(pair) == 1

    figures = {path.name for path in table.attrs["figures"]}
    assert "analysis_seeds_hidden_0.png" in figures
    assert not [note for note in table.attrs["notes"] if "seed" in note]


def test_folder_names_are_never_read(tmp_path: Path) -> None:
    # A neutral name and a misleading one: only the records say which run is which.
    accuracies = build_study(tmp_path, [
        ("whatever", {"seed": 1}),
        ("rank_8_seed_3", {"seed": 0}),
    ])  # fmt: skip
    table = analyze_study(tmp_path)
    compared = table[table["kind"] == "lora_vs_full"].set_index("adapter")
    assert (compared.loc["whatever", "rank"], compared.loc["whatever", "seed"]) == (4, 1)
    assert (compared.loc["rank_8_seed_3", "rank"], compared.loc["rank_8_seed_3", "seed"]) == (4, 0)
    assert compared.loc["whatever", "test_acc"] == pytest.approx(accuracies["whatever"])
    subspace = table[table["kind"] == "subspace"].iloc[0]
    assert {subspace["seed_a"], subspace["seed_b"]} == {0, 1}
    assert subspace["rank_a"] == subspace["rank_b"] == 4
    assert "analysis_seeds_hidden_0.png" in {path.name for path in table.attrs["figures"]}


def test_artefacts_are_read_from_each_runs_own_study(tmp_path: Path) -> None:
    # `lora-lab train -m`: each Hydra job folder is a study; the root holds no adapters/.
    for job, seed in (("0", 0), ("1", 1)):
        factors = {"hidden.0": (torch.randn(4, IN_DIM), torch.randn(OUT_DIM, 4))}
        write_lora_run(tmp_path / job, f"rank_4_seed_{seed}", 4, 4.0, seed, factors)
    table = analyze_study(tmp_path, make_plots=False)
    subspace = table[table["kind"] == "subspace"]
    assert len(subspace) == 1
    assert {subspace.iloc[0]["seed_a"], subspace.iloc[0]["seed_b"]} == {0, 1}


def test_records_without_artefact_and_failed_runs_are_skipped_with_a_note(
    tmp_path: Path,
) -> None:
    build_study(tmp_path, [("rank_4_seed_0", {"seed": 0}), ("rank_4_seed_1", {"seed": 1})])
    # An adapter folder whose record predates `artefact`: not guessed from its name.
    write_lora_run(tmp_path, "rank_2_seed_0", 2, alpha=2.0, seed=0,
                   factors={"hidden.0": (torch.ones(2, IN_DIM), torch.ones(OUT_DIM, 2))})  # fmt: skip
    write_run(tmp_path, "lora_rank_2_seed_0", "lora", artefact=None, rank=2, alpha=2.0, seed=0)
    write_run(tmp_path, "lora_r8_a8_s0", "lora", artefact=None, rank=8, seed=0, status="failed")
    table = analyze_study(tmp_path, make_plots=False)
    notes = " | ".join(table.attrs["notes"])
    assert "lora_rank_2_seed_0" in notes and "artefact" in notes
    assert "lora_r8_a8_s0" in notes and "failed" in notes
    compared = table[table["kind"] == "lora_vs_full"]
    assert sorted(compared["adapter"]) == ["rank_4_seed_0", "rank_4_seed_1"]


def test_a_study_without_artefacts_raises_one_line(tmp_path: Path) -> None:
    write_run(tmp_path, "lora_r4_a4_s0", "lora", artefact=None, rank=4, alpha=4.0, seed=0)
    with pytest.raises(ValueError, match="nothing to analyze") as error:
        analyze_study(tmp_path)
    assert "\n" not in str(error.value)


def test_analysis_csv_keeps_its_columns(tmp_path: Path) -> None:
    build_study(tmp_path, GRIDS["alpha"][:2])
    analyze_study(tmp_path, make_plots=False)
    assert list(pd.read_csv(tmp_path / "analysis.csv").columns) == [
        "kind", "layer", "shape",
        "adapted", "full_rank", "fro_norm", "weight_fro_norm", "relative_update",
        "sigma1", "sigma2", "sigma1_over_sigma2", "effective_rank", "rank90", "rank99",
        "adapter", "rank", "seed", "alpha", "scaling", "k_top_r", "proj_top1", "proj_top_r",
        "relative_error", "norm_ratio", "amplification", "test_acc",
        "adapter_a", "rank_a", "seed_a", "adapter_b", "rank_b", "seed_b",
        "grid_size", "phi_top1", "phi_mean", "phi_full",
    ]  # fmt: skip


def test_adapters_of_one_name_in_two_jobs_keep_apart(tmp_path: Path) -> None:
    # `lora-lab train -m stage=lora lora.alpha=4,16`: both jobs name their adapter rank_4_seed_0.
    for job, alpha in (("0", 4.0), ("1", 16.0)):
        factors = {"hidden.0": (torch.randn(4, IN_DIM), torch.randn(OUT_DIM, 4))}
        write_lora_run(tmp_path / job, "rank_4_seed_0", 4, alpha, 0, factors)
    table = analyze_study(tmp_path, make_plots=False)
    (pair,) = table[table["kind"] == "subspace"].itertuples()
    assert {pair.adapter_a, pair.adapter_b} == {
        "0/adapters/rank_4_seed_0",
        "1/adapters/rank_4_seed_0",
    }
