"""The one run lifecycle (`pipeline.lifecycle`): what a run alone and a fused pass share, and
the checkpointing that `trainer.*` asks for, no more."""

from __future__ import annotations

from pathlib import Path

from lora_lab.cli import main


def test_lora_lab_train_checkpoints_only_when_the_trainer_config_asks(
    tmp_path: Path, tiny_overrides: list[str]
):
    # conf/trainer/cpu.yaml (via auto.yaml) says enable_checkpointing: false. A single run has no
    # identity to resume by, so nothing may write a Lightning checkpoint (it used to get
    # Lightning's default checkpointer: runs/<run>/logs/checkpoints/epoch=0-step=2.ckpt).
    plain = tmp_path / "plain"
    assert (
        main(["train", "stage=pretrain", "trainer=cpu", f"output_dir={plain}", *tiny_overrides])
        == 0
    )
    assert (plain / "checkpoints" / "pretrain.safetensors").is_file()
    assert sorted(plain.rglob("*.ckpt")) == []
    # The override takes effect: Lightning's own checkpointer, as the user asked.
    asked = tmp_path / "asked"
    overrides = ["trainer=cpu", "trainer.enable_checkpointing=true", f"output_dir={asked}"]
    assert main(["train", "stage=pretrain", *overrides, *tiny_overrides]) == 0
    assert [path.name for path in asked.rglob("*.ckpt")] == ["epoch=0-step=2.ckpt"]
