"""`lora-lab train` one stage at a time, under Hydra multirun, then `lora-lab report` on the
multirun folder; and the linear-shift known answer."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lora_lab.cli import main


def test_train_multirun_then_report(tmp_path: Path, tiny_overrides: list[str]):
    base = tmp_path / "base"
    assert main(["train", "stage=pretrain", f"output_dir={base}", *tiny_overrides]) == 0
    ckpt = base / "checkpoints" / "pretrain.safetensors"
    assert ckpt.is_file()

    sweep_dir = tmp_path / "multi"
    code = main(
        [
            "train",
            "-m",
            "stage=lora",
            "lora.rank=1,4",
            f"pretrain_ckpt={ckpt}",
            f"output_dir={sweep_dir}",
            *tiny_overrides,
        ]
    )
    assert code == 0
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]

    assert main(["report", str(sweep_dir)]) == 0
    table = pd.read_csv(sweep_dir / "results.csv")
    assert sorted(table["rank"].tolist()) == [1, 4]
    assert set(table.run_dir) == {"0/runs/lora_r1_a1_s0", "1/runs/lora_r4_a4_s0"}
    assert (table.status == "ok").all()
    assert (sweep_dir / "report.md").is_file()
    assert (sweep_dir / "accuracy_vs_rank.png").is_file()


def test_linear_shift_recovers_the_rank_one_update(tmp_path: Path):
    out = tmp_path / "ls"
    # A smaller instance of the experiment: the SGD step scales with d_out (see the config).
    overrides = [
        "experiment=linear_shift",
        f"output_dir={out}",
        "trainer.enable_progress_bar=false",
        "data.n=3000",
        "data.d_in=101",
        "data.d_out=100",
        "data.batch_size=256",
        "module.optimizer.lr=20",
    ]
    assert main(["sweep", *overrides]) == 0
    table = pd.read_csv(out / "results.csv").set_index("stage")
    assert table.loc["lora", "delta_rel_error"] < 0.02
    assert table.loc["full_finetune", "delta_rel_error"] < 0.02
    assert table.loc["lora", "trainable_params"] == 101 + 100

    # LoRA paper §7 on the known answer: the full update is rank 1 and the adapter finds it.
    assert main(["analyze", str(out)]) == 0
    analysis = pd.read_csv(out / "analysis.csv")
    spectrum = analysis[analysis.kind == "spectrum"].set_index("layer").loc["linear"]
    assert spectrum.sigma1_over_sigma2 > 100
    assert spectrum.effective_rank < 1.05
    assert (
        analysis[analysis.kind == "lora_vs_full"].set_index("layer").loc["linear", "proj_top1"]
        > 0.99
    )
    assert "## Analysis" in (out / "report.md").read_text()
