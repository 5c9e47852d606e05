"""`lora-lab analyze` reads the configurations chosen on validation and never compares
subspaces across learning rates."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from lora_lab.analysis import analyze_study, find_runs
from lora_lab.analysis.adapters import load_adapter_runs
from lora_lab.analysis.plots import pick_rank_pair
from tests.analysis.testkit import IN_DIM, OUT_DIM, write_lora_run, write_results_csv

#: (rank, learning rate, chosen on validation): r=4 chose 0.03, r=8 chose 0.003, r=16 0.03.
RUNS = [(4, 0.003, False), (4, 0.03, True), (8, 0.003, True), (8, 0.03, False), (16, 0.03, True)]


def _lr_grid_study(root: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    for rank, lr, _chosen in RUNS:
        a = torch.randn(rank, IN_DIM, generator=generator, dtype=torch.float64)
        b = torch.randn(OUT_DIM, rank, generator=generator, dtype=torch.float64)
        write_lora_run(root, f"r{rank}_lr{lr:g}", rank, 2.0 * rank, 0, {"hidden.0": (a, b)},
                       learning_rate=lr)  # fmt: skip
    write_results_csv(root)
    table = pd.read_csv(root / "results.csv")
    chosen = {f"lora_r{rank}_lr{lr:g}" for rank, lr, pick in RUNS if pick}
    table["selected"] = table["run_id"].isin(chosen)
    table.to_csv(root / "results.csv", index=False)
    return root


def test_analysis_reads_the_selected_runs_only(tmp_path: Path) -> None:
    study = _lr_grid_study(tmp_path)
    notes: list[str] = []
    runs = find_runs(study, notes)
    assert sorted(run.result.run_id for run in runs.lora) == [
        "lora_r16_lr0.03", "lora_r4_lr0.03", "lora_r8_lr0.003",
    ]  # fmt: skip
    assert any("2 LoRA run(s) at a learning rate not chosen" in note for note in notes)


def test_subspaces_are_never_compared_across_learning_rates(tmp_path: Path) -> None:
    table = analyze_study(_lr_grid_study(tmp_path), make_plots=False)
    subspace = table[table["kind"] == "subspace"]
    # r=8 chose another learning rate than r=4 and r=16: only r=4 and r=16 are compared.
    assert list(zip(subspace["adapter_a"], subspace["adapter_b"], strict=True)) == [
        ("r4_lr0.03", "r16_lr0.03")
    ]
    notes: list[str] = []
    adapters = load_adapter_runs(find_runs(tmp_path, notes).lora, None, notes)
    small, large = pick_rank_pair(adapters)
    assert (small.rank, large.rank) == (4, 16)
    apart = [a for a in adapters if a.rank in (4, 8)]  # r=4 at 0.03, r=8 at 0.003
    assert pick_rank_pair(apart) is None
