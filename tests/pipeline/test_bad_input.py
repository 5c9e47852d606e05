"""Bad input: one line naming the key, exit code 2, before anything trains or is written.

Each case runs `lora-lab sweep` twice: into an existing study folder, which must come out
byte-for-byte untouched, and into a new folder, which must not appear.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lora_lab.cli import main

# override → a fragment the one-line message must hold (the key, and the bad value)
BAD_INPUT = {
    "trainer.max_epochs=abc": "trainer.max_epochs='abc' is not allowed: it must be an integer ≥ 1",
    "trainer.max_epochs=0": "trainer.max_epochs=0 is not allowed",
    "trainer.max_epochs=null": "trainer.max_epochs=None is not allowed",
    "trainer.precision=fp8": "trainer.precision='fp8' is not allowed: it must be one of",
    "trainer.devices=two": "trainer.devices='two' is not allowed: the pretrain stage's trainer cannot be built",
    "trainer.accelerator=nosuch": "trainer.accelerator='nosuch' is not allowed: the pretrain stage's trainer",
    "+logger.csv.bogus=1": "logger.csv.bogus=1 is not allowed: lightning.pytorch.loggers.CSVLogger",
    "module.optimizer._target_=torch.optim.Nosuch": "module.optimizer._target_='torch.optim.Nosuch' cannot be imported",
    "+trainer.foo=1": "trainer.foo=1 is not allowed: lightning.Trainer takes no argument 'foo'",
    "trainer.max_epoch=1": "trainer.max_epoch",
    "stages.lora.lr=fast": "stages.lora.lr='fast' is not allowed: it must be a finite number > 0",
    "stages.pretrain.max_epochs=-1": "stages.pretrain.max_epochs=-1 is not allowed",
    "+stages.lora.trainer.max_epochs=x": "stages.lora.trainer.max_epochs='x' is not allowed",
    "sweep.ranks=[a,b]": "sweep.ranks=['a', 'b'] is not allowed",
    "sweep.ranks=[0,4]": "sweep.ranks=[0, 4] is not allowed: it holds 0",
    "sweep.seeds=[x]": "sweep.seeds=['x'] is not allowed",
    "sweep.alphas=[-1]": "sweep.alphas=[-1] is not allowed",
    "sweep.learning_rates=[abc]": "sweep.learning_rates=['abc'] is not allowed",
    "sweep.jobs=0": "sweep.jobs=0 is not allowed",
    "sweep.fused=maybe": "sweep.fused='maybe' is not allowed: it must be true or false",
    "sweep.verify=-1": "sweep.verify=-1 is not allowed: it must be an integer ≥ 0",
    "sweep.verify=some": "sweep.verify='some' is not allowed: it must be an integer ≥ 0",
    "sweep.verify_tolerance=0": "sweep.verify_tolerance=0 is not allowed: it must be a finite number > 0",
    "data.batch_size=0": "data.batch_size=0 is not allowed: it must be an integer ≥ 1",
    "data.val_size=-5": "data.val_size=-5 is not allowed",
    "data.classes=[99]": "classes=[99] holds index 99, out of range 0..9",
    "stages.lora.classes=[unicorn]": "names unknown class 'unicorn'",
    "data.root=/nonexistent/fm": "data.root='/nonexistent/fm' holds no fashion_mnist files",
    "data=nosuch": "data='nosuch' is not allowed: it must be one of cifar10, fashion_mnist",
    "model.hidden_sizes=[a]": "model.hidden_sizes=['a'] is not allowed: it must be a list of integers",
    "module.optimizer.lr=-1": "module.optimizer.lr=-1 is not allowed: it must be a finite number > 0",
    "module.optimizer.lr=fast": "module.optimizer.lr='fast' is not allowed",
    "lora.dropout=2": "lora.dropout=2 is not allowed: it must be a number in [0, 1)",
    "lora.init=zeros": "lora.init='zeros' is not allowed: it must be one of kaiming, gaussian, pissa",
    "lora.target_modules=[nosuch]": "lora: target_modules=('nosuch',) matched no module",
    "seed=x": "seed='x' is not allowed: it must be an integer",
    "threads=0": "threads=0 is not allowed",
    "output_dir=/proc/lora-lab-study": "output_dir='/proc/lora-lab-study' cannot be written",
}


def _snapshot(folder: Path) -> dict[str, tuple[str, float]]:
    """Every file under `folder`: content hash and modification time."""
    return {
        str(path.relative_to(folder)): (
            hashlib.sha1(path.read_bytes()).hexdigest(),
            path.stat().st_mtime,
        )
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def existing_study(tmp_path: Path) -> Path:
    """A folder that looks like a finished study (study.json, results, a run)."""
    study = tmp_path / "existing"
    (study / "runs" / "pretrain").mkdir(parents=True)
    (study / "study.json").write_text(json.dumps({"command": "lora-lab sweep", "config": {}}))
    (study / "results.csv").write_text("run_id,stage\npretrain,pretrain\n")
    (study / "report.md").write_text("# report\n")
    (study / "runs" / "pretrain" / "result.json").write_text('{"status": "ok"}')
    return study


def test_the_table_has_at_least_twenty_cases():
    assert len(BAD_INPUT) >= 20


@pytest.mark.parametrize("bad", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2_and_touches_nothing(
    bad: str, tmp_path: Path, tiny_overrides: list[str], existing_study: Path, capsys
):
    before = _snapshot(existing_study)
    targets = [existing_study, tmp_path / "new-study"]
    for target in targets:
        args = ["sweep", *tiny_overrides, f"output_dir={target}", bad]
        assert main(args) == 2, bad
        err = capsys.readouterr().err.strip()
        assert err.startswith("lora-lab: error:") and "\n" not in err, err
        assert BAD_INPUT[bad] in err, err
        if bad.startswith("output_dir="):
            break  # the override replaced the target folder itself
    assert _snapshot(existing_study) == before
    assert not (tmp_path / "new-study").exists()


def test_a_folder_that_is_not_a_study_is_refused_and_untouched(
    tmp_path: Path, tiny_overrides: list[str], capsys
):
    mine = tmp_path / "my-results"
    mine.mkdir()
    (mine / "results.csv").write_text("my,own\n1,2\n")
    before = _snapshot(mine)
    assert main(["sweep", *tiny_overrides, f"output_dir={mine}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a folder that is not a lora_lab study (it holds results.csv)" in err
    assert "\n" not in err
    assert _snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["results.csv"]


def test_a_missing_dataset_stops_before_the_study_folder_exists(
    tmp_path: Path, tiny_overrides: list[str], capsys
):
    out = tmp_path / "study"
    assert (
        main(
            ["sweep", *tiny_overrides, f"output_dir={out}", "data=mnist", "data.root=/nonexistent"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "data.root='/nonexistent' holds no mnist files" in err and "\n" not in err
    assert not out.exists()


def test_train_checks_its_one_stage_too(tmp_path: Path, tiny_overrides: list[str], capsys):
    out = tmp_path / "run"
    assert (
        main(["train", *tiny_overrides, f"output_dir={out}", "stage=lora", "stages.lora.lr=x"]) == 2
    )
    assert "stages.lora.lr='x' is not allowed" in capsys.readouterr().err
    assert main(["train", *tiny_overrides, f"output_dir={out}", "stage=finetune"]) == 2
    assert "stage='finetune' is not allowed: it must be one of pretrain, full_finetune, lora" in (
        capsys.readouterr().err
    )
    assert not out.exists()


# What the schema must not refuse: every option and overrides users write.
VALID = [
    "trainer=ddp",
    "trainer.devices=[0]",
    "trainer.precision=16-mixed",
    "trainer.precision=bf16",
    "output_dir=2024",
    "data.classes=[Sandal,Bag]",
    "lora.target_modules=hidden\\..*",
    "module.scheduler={_target_:torch.optim.lr_scheduler.CosineAnnealingLR,_partial_:true,T_max:5}",
    "+trainer.strategy={_target_:lightning.pytorch.strategies.DDPStrategy,"
    "timeout:{_target_:datetime.timedelta,seconds:60}}",
    "logger=tensorboard",
    "logger=mlflow",
]


@pytest.mark.parametrize("override", VALID)
def test_valid_values_pass_the_schema(override: str):
    from hydra import compose, initialize_config_dir

    from lora_lab.cli import CONF_DIR
    from lora_lab.pipeline.config_check import check_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        check_config(compose("config", overrides=[override]))


@pytest.mark.parametrize("experiment", ["linear_shift", "mnist_seed", "cifar_subset"])
def test_every_experiment_passes_the_schema(experiment: str):
    from hydra import compose, initialize_config_dir

    from lora_lab.cli import CONF_DIR
    from lora_lab.pipeline.config_check import check_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        check_config(compose("config", overrides=[f"experiment={experiment}"]))


def test_a_missing_logger_package_is_found_before_training(
    tmp_path: Path, tiny_overrides: list[str], capsys
):
    pytest.importorskip("lightning")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("mlflow is installed here")
    out = tmp_path / "study"
    assert main(["sweep", *tiny_overrides, f"output_dir={out}", "logger=mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the pretrain stage's logger cannot be built from the config" in err and "mlflow" in err
    assert not out.exists()


def test_a_cluster_launcher_builds_its_trainers_where_the_jobs_run(
    tmp_path: Path, tiny_overrides: list[str]
):
    # trainer=gpu from a login node without a GPU: the jobs run on GPU nodes.
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from lora_lab.cli.checks import preflight
    from lora_lab.cli.compose import hydra_args

    args = ["-m", "hydra/launcher=slurm", "trainer=gpu", "stage=pretrain", "seed=0,1"]
    args += [*tiny_overrides, f"output_dir={tmp_path / 'multi'}"]
    assert preflight("train", hydra_args(args)).notes == []
    assert not (tmp_path / "multi").exists()
