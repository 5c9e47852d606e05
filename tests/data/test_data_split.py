"""Validation never seen in training: the train/val split is fixed per study
(`data.split_seed`), the same for every stage and run seed, so no stage validates on images
another stage (the pretrain above all) trained on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from lora_lab.pipeline.plan import plan
from lora_lab.pipeline.preflight import check_plan
from lora_lab.pipeline.run_config import stage_config
from tests.pipeline.study_config import composed, tiny_study_overrides


def rows(images: torch.Tensor) -> set[bytes]:
    """Each image as bytes (random fake images never repeat)."""
    return {image.numpy().tobytes() for image in images}


def splits(cfg, stage: str, seed: int) -> tuple[set[bytes], set[bytes]]:
    datamodule = instantiate(stage_config(cfg, stage, seed=seed).data)
    datamodule.setup("fit")
    train, val = datamodule.train_dataset, datamodule.val_dataset
    return rows(train.inputs), rows(val.inputs)


def test_no_stage_or_seed_validates_on_images_any_stage_trains_on(tmp_path: Path):
    # The same-task study: pretrain and finetune on the same classes.
    cfg = composed(*tiny_study_overrides(tmp_path))
    assert cfg.stages.pretrain.classes == cfg.stages.lora.classes
    seen = {
        (stage, seed): splits(cfg, stage, seed)
        for stage in ("pretrain", "full_finetune", "lora")
        for seed in (0, 1, 2)
    }
    trained = set().union(*(train for train, _ in seen.values()))
    validations = [val for _, val in seen.values()]
    assert all(val == validations[0] for val in validations)  # one split for the study
    assert validations[0] and not validations[0] & trained


def test_the_split_seed_moves_the_split_and_the_run_seed_does_not(tmp_path: Path):
    cfg = composed(*tiny_study_overrides(tmp_path))
    _, val = splits(cfg, "lora", 0)
    assert splits(cfg, "lora", 5)[1] == val
    other = composed(*tiny_study_overrides(tmp_path), "data.split_seed=1")
    assert splits(other, "lora", 0)[1] != val


@pytest.mark.parametrize("override", ["split_seed=3", "val_size=50"])
def test_a_stage_cannot_validate_on_a_split_of_its_own(tmp_path: Path, override: str):
    cfg = composed(*tiny_study_overrides(tmp_path), f"+stages.lora.data.{override}")
    key = override.split("=")[0]
    (problem,) = check_plan(plan(cfg))
    assert problem.key == f"stages.lora.data.{key}"
    assert re.search(rf"stages\.lora\.data\.{key}=.* every stage must", problem.line())
