"""Our own config nodes are Hydra structured configs (lora_lab.pipeline.schema): Hydra types
them as it composes, a key they do not declare is refused with or without `+` (the nearest
known key suggested), and every bad input is said at once, one line each, exit code 2,
before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from lora_lab.cli import main
from lora_lab.pipeline.schema import StudySchema, SweepSchema
from tests.pipeline.study_config import composed


def test_hydra_itself_types_our_nodes():
    cfg = composed()
    assert OmegaConf.get_type(cfg) is StudySchema and OmegaConf.get_type(cfg.sweep) is SweepSchema
    with pytest.raises(ConfigCompositionException):
        composed("sweep.jobs=abc")
    with pytest.raises(ConfigCompositionException):
        composed("sweep.rank=[1,4]")  # an unknown key, not added with +


def test_config_groups_still_merge_into_the_typed_nodes():
    cfg = composed("lora=pissa", "experiment=fashion_mnist_methods")
    assert cfg.lora.init == "pissa" and cfg.lora.modules_to_save == ["head"]
    assert cfg.sweep.methods[-1] == "loraplus" and cfg.lora.alpha == 8


UNKNOWN = {
    "+sweep.rank=[1,4]": "sweep.rank: no such key; did you mean sweep.ranks?",
    "sweep.rank=[1,4]": "sweep.rank: no such key; did you mean sweep.ranks?",
    "+report.tolerence=0.1": "report.tolerence: no such key; did you mean report.tolerance?",
    "stages.lora.max_epoch=2": "stages.lora.max_epoch: no such key; did you mean stages.lora.max_epochs?",
    "+stages.pretrain.lrs=0.1": "stages.pretrain.lrs: no such key; did you mean stages.pretrain.lr?",
    "+lora.rnak=4": "lora.rnak: no such key; did you mean lora.rank?",
    "+rank=4": "rank: no such key; did you mean lora.rank?",
    "trainer.max_epoch=1": "trainer.max_epoch: no such key; did you mean trainer.max_epochs?",
}


@pytest.mark.parametrize("bad", list(UNKNOWN))
def test_an_unknown_key_is_refused_with_the_nearest_key(
    bad: str, tmp_path: Path, tiny_overrides: list[str], capsys
):
    out = tmp_path / "study"
    assert main(["sweep", *tiny_overrides, f"output_dir={out}", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lora-lab: error: {UNKNOWN[bad]}"
    assert not out.exists()


def test_every_bad_input_is_said_at_once(tmp_path: Path, tiny_overrides: list[str], capsys):
    out = tmp_path / "study"
    bad = [
        "sweep.fused=maybe",  # refused by Hydra as it composes
        "+sweep.rank=[1,4]",  # composed, refused by the schema check
        "sweep.jobs=0",  # a range
        "sweep.alphas=[-1]",  # a range, the value shown as typed (Hydra holds [-1.0])
        "trainer.max_epochs=0",  # a `_target_` argument's range
        "seed=x",  # refused by Hydra
    ]
    assert main(["sweep", *tiny_overrides, f"output_dir={out}", *bad]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("lora-lab: error: ") for line in lines), lines
    assert sorted(line.removeprefix("lora-lab: error: ") for line in lines) == sorted(
        [
            "sweep.fused='maybe' is not allowed: it must be true or false",
            "sweep.rank: no such key; did you mean sweep.ranks?",
            "sweep.jobs=0 is not allowed: it must be an integer ≥ 1",
            "sweep.alphas=[-1] is not allowed: it holds -1.0, and each must be a finite number > 0",
            "trainer.max_epochs=0 is not allowed: it must be an integer ≥ 1",
            "seed='x' is not allowed: it must be an integer",
        ]
    )
    assert not out.exists()


def test_bad_target_arguments_are_said_together(tmp_path: Path, tiny_overrides: list[str], capsys):
    out = tmp_path / "study"
    bad = ["+trainer.foo=1", "model.hidden_sizes=[a]"]
    assert main(["sweep", *tiny_overrides, f"output_dir={out}", *bad]) == 2
    lines = sorted(capsys.readouterr().err.strip().splitlines())
    assert len(lines) == 2
    assert "model.hidden_sizes=['a'] is not allowed: it must be a list of integers" in lines[0]
    assert "trainer.foo=1 is not allowed: lightning.Trainer takes no argument 'foo'" in lines[1]
    assert not out.exists()


def test_a_bad_override_is_refused_under_cfg_job_too(capsys):
    assert main(["sweep", "--cfg", "job", "+sweep.rank=[1,4]"]) == 2
    assert "sweep.rank: no such key; did you mean sweep.ranks?" in capsys.readouterr().err


def test_a_bad_value_in_a_users_config_file_names_its_key(tmp_path: Path, capsys):
    (tmp_path / "experiment").mkdir()
    mine = "# @package _global_\nsweep:\n  jobs: many\n"
    (tmp_path / "experiment" / "mine.yaml").write_text(mine)
    out = tmp_path / "study"
    args = ["sweep", "--config-dir", str(tmp_path), "experiment=mine", f"output_dir={out}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-lab: error: sweep.jobs") and "\n" not in err, err
    assert not out.exists()
