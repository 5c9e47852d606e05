"""Hydra launchers under `lora-lab train -m`: joblib on this machine, and the cluster
launchers, SLURM (submitit) and Ray (in a venv of its own)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lora_lab.cli import CONF_DIR, main
from lora_lab.interop import side_python
from tests.pipeline.study_config import composed

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pretrained(tmp_path: Path, tiny_overrides: list[str]) -> tuple[Path, list[str]]:
    """A pretrain checkpoint from `lora-lab train stage=pretrain`, and the tiny overrides."""
    base = tmp_path / "base"
    assert main(["train", "stage=pretrain", f"output_dir={base}", *tiny_overrides]) == 0
    return base / "checkpoints" / "pretrain.safetensors", tiny_overrides


# -- joblib ----------------------------------------------------------------------------------------


def test_train_multirun_with_the_joblib_launcher_then_report(pretrained, tmp_path: Path):
    ckpt, overrides = pretrained
    sweep_dir = tmp_path / "multi"
    args = ["train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "stage=lora"]
    code = main(
        [*args, "lora.rank=1,2,4", f"pretrain_ckpt={ckpt}", f"output_dir={sweep_dir}", *overrides]
    )
    assert code == 0
    assert main(["report", str(sweep_dir)]) == 0
    table = pd.read_csv(sweep_dir / "results.csv")
    assert sorted(table["rank"]) == [1, 2, 4] and (table.status == "ok").all()
    assert set(table.run_dir) == {f"{n}/runs/lora_r{r}_a{r}_s0" for n, r in enumerate((1, 2, 4))}
    assert (sweep_dir / "accuracy_vs_rank.png").is_file()


def test_bad_input_under_multirun_stops_before_any_job(
    tmp_path: Path, tiny_overrides: list[str], capfd
):
    # stage=lora without pretrain_ckpt: the preflight checks every job of the sweep first.
    args = ["train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "stage=lora"]
    assert main([*args, "lora.rank=1,2", f"output_dir={tmp_path / 'multi'}", *tiny_overrides]) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("lora-lab: error: stage=lora needs pretrain_ckpt=") and "\n" not in err
    assert not (tmp_path / "multi").exists()


def test_a_failed_job_under_the_joblib_launcher_fails_the_command(
    tmp_path: Path, tiny_overrides: list[str], capfd
):
    # Files that are there (the preflight finds them) but corrupt: each job fails as it loads.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(
        next(o for o in tiny_overrides if o.startswith("data.root=")).split("=", 1)[1], corrupt
    )
    images = next(corrupt.glob("train-images*"))
    images.write_bytes(images.read_bytes()[:100])
    args = ["train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "stage=pretrain"]
    overrides = [*tiny_overrides, f"data.root={corrupt}", "seed=0,1"]
    assert main([*args, f"output_dir={tmp_path / 'multi'}", *overrides]) == 1
    # (The workers' own one-line errors go to the stderr they started with: joblib reuses
    # its worker processes across calls, so they need not be in this test's capture.)
    err = capfd.readouterr().err
    assert "Error executing job with overrides: ['stage=pretrain'" in err
    assert "a job exited with code 2" in err
    assert not list((tmp_path / "multi").rglob("result.json"))


# -- cluster launchers -----------------------------------------------------------------------------


def test_slurm_launcher_composes_instantiates_and_makes_a_valid_sbatch_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit

    cfg = composed(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=1",
        "trainer=gpu",
        hydra=True,
    )
    launcher = instantiate(cfg.hydra.launcher)
    expected = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert _class_path(launcher) == expected
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert params["partition"] == "gpu" and params["tasks_per_node"] == 1
    # submitit checks the parameters against sbatch's options (and needs an `srun` to exist).
    _fake_srun(tmp_path, monkeypatch)
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    generic = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb"}
    executor.update_parameters(
        **{
            (key if key in generic | {"nodes"} else f"slurm_{key}"): value
            for key, value in params.items()
            if key in generic | {"nodes", "partition", "signal_delay_s"}
        }
    )
    script = executor._executor._make_submission_file_text("lora-lab", "uid")
    for option in ("--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=4", "--time=120"):
        assert option in script


def _class_path(obj: object) -> str:
    # By name: Hydra's plugin scan may import a plugin module a second time, so the class
    # imported here need not be the very object `instantiate` used.
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _fake_srun(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An `srun` on PATH that does nothing: submitit's SLURM executor insists on finding one."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.slow
def test_slurm_launcher_end_to_end_with_jobs_run_locally(
    pretrained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`hydra/launcher=slurm` through the real plugin; only `sbatch` is replaced, by
    submitit's local executor, after the SLURM executor has accepted every parameter."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit

    _fake_srun(tmp_path, monkeypatch)
    scripts: list[str] = []
    real_executor = submitit.AutoExecutor

    class SlurmCheckedLocalExecutor:
        def __init__(self, folder: str, cluster: str, **kwargs: Any) -> None:
            assert cluster == "slurm"
            self.slurm = real_executor(folder=folder, cluster="slurm", **kwargs)
            self.local = real_executor(folder=folder, cluster="local")

        def update_parameters(self, **params: Any) -> None:
            self.slurm.update_parameters(**params)
            scripts.append(self.slurm._executor._make_submission_file_text("lora-lab", "uid"))
            local = {k: v for k, v in params.items() if not k.startswith("slurm_")}
            self.local.update_parameters(**{**local, "gpus_per_node": 0})

        def map_array(self, fn: Any, *iterable: Any) -> Any:
            return self.local.map_array(fn, *iterable)

    monkeypatch.setattr(submitit, "AutoExecutor", SlurmCheckedLocalExecutor)
    ckpt, overrides = pretrained
    sweep_dir = tmp_path / "slurm"
    args = ["train", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug"]
    args += ["stage=lora", "lora.rank=1,2", f"pretrain_ckpt={ckpt}", f"output_dir={sweep_dir}"]
    code = main([*args, *overrides])
    assert code == 0
    assert "--partition=debug" in scripts[0]
    assert main(["report", str(sweep_dir)]) == 0
    table = pd.read_csv(sweep_dir / "results.csv")
    assert sorted(table["rank"]) == [1, 2] and (table.status == "ok").all()


def _in_ray_venv(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run Python in the side venv where the Ray launcher lives (see lora_lab.interop)."""
    return subprocess.run(
        [str(side_python("ray")), *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def test_ray_launcher_composes_and_instantiates():
    code = f"""
import json
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lora_lab.pipeline.schema import register_schema
register_schema()
with initialize_config_dir(config_dir={str(CONF_DIR)!r}, version_base="1.3"):
    cfg = compose("config", overrides=["hydra/launcher=ray_cluster"], return_hydra_config=True)
launcher = instantiate(cfg.hydra.launcher)
print(json.dumps({{
    "class": f"{{type(launcher).__module__}}.{{type(launcher).__qualname__}}",
    "num_cpus": cfg.hydra.launcher.ray.remote.num_cpus,
    "address": cfg.hydra.launcher.ray.init.address,
}}))
"""
    done = _in_ray_venv("-c", code)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["class"] == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert got["num_cpus"] == 1
    assert got["address"] is None  # a local Ray unless told otherwise


@pytest.mark.slow
def test_ray_launcher_runs_a_sweep_on_a_local_ray(pretrained, tmp_path: Path):
    ckpt, overrides = pretrained
    sweep_dir = tmp_path / "ray"
    args = ["-m", "lora_lab.cli", "train", "-m", "hydra/launcher=ray_cluster", "stage=lora"]
    args += ["lora.rank=1,2", f"pretrain_ckpt={ckpt}", f"output_dir={sweep_dir}", *overrides]
    done = _in_ray_venv(*args, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["report", str(sweep_dir)]) == 0
    table = pd.read_csv(sweep_dir / "results.csv")
    assert sorted(table["rank"]) == [1, 2] and (table.status == "ok").all()
