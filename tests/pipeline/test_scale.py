"""Scaling out: parallel sweeps (`sweep.jobs`), Hydra launchers (joblib, submitit, Ray),
multi-device training (`trainer=ddp`), bf16-mixed precision, and sweep grids beyond rank."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from lora_lab.cli import CONF_DIR, main
from lora_lab.interop import side_python
from lora_lab.lora import LoRAConfig, inject_lora, load_adapter, lora_layers, merge_lora
from lora_lab.models import MLP, LoRAClassifierModule, load_network_weights
from lora_lab.pipeline import plan, stage_config
from lora_lab.pipeline.parallel import (
    REPLICAS_FILE,
    _init_worker,
    gpu_slices,
    run_in_pool,
    threads_per_job,
    trainable_digest,
)
from lora_lab.pipeline.plan import PlannedRun
from lora_lab.pipeline.threads import POOL_ENV
from tests.pipeline.study_config import BASE_EXPERIMENT

ROOT = Path(__file__).resolve().parents[2]


def composed(*overrides: str, hydra: bool = False) -> Any:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            config_name="config", overrides=[BASE_EXPERIMENT, *overrides], return_hydra_config=hydra
        )


def lora_runs(*overrides: str) -> list[PlannedRun]:
    return [run for run in plan(composed(*overrides)) if run.stage == "lora"]


@pytest.fixture
def pretrained(tmp_path: Path, tiny_overrides: list[str]) -> tuple[Path, list[str]]:
    """A pretrain checkpoint from `lora-lab train stage=pretrain`, and the tiny overrides."""
    base = tmp_path / "base"
    assert main(["train", "stage=pretrain", f"output_dir={base}", *tiny_overrides]) == 0
    return base / "checkpoints" / "pretrain.safetensors", tiny_overrides


# -- 4. sweep grids beyond rank ----------------------------------------------------------------


def test_default_sweep_keeps_its_names_and_identities():
    runs = lora_runs("sweep.ranks=[1,2]")
    assert [run.run_id for run in runs] == ["lora_r1_a1_s0", "lora_r2_a2_s0"]
    assert [run.adapter for run in runs] == ["rank_1_seed_0", "rank_2_seed_0"]
    assert [run.label() for run in runs] == ["lora rank=1 seed=0", "lora rank=2 seed=0"]
    # Empty lists mean "not swept", like null: the same runs, the same identities.
    same = lora_runs("sweep.ranks=[1,2]", "sweep.alphas=[]", "sweep.learning_rates=[]")
    assert [r.identity for r in same] == [r.identity for r in runs]


def test_alphas_learning_rates_and_seeds_form_a_grid_with_ranks():
    runs = plan(
        composed(
            "sweep.ranks=[1,2]",
            "sweep.alphas=[4,16]",
            "sweep.learning_rates=[1e-3,1e-2]",
            "sweep.seeds=[0,1]",
        )
    )
    pretrain, *rest = runs
    full = [run for run in rest if run.stage == "full_finetune"]
    lora = [run for run in rest if run.stage == "lora"]
    # with seeds swept, the baseline runs once per seed (the recommended rank compares them)
    assert [r.run_id for r in full] == ["full_finetune_s0", "full_finetune_s1"]
    assert len(lora) == 2 * 2 * 2 * 2
    assert {(r.rank, r.alpha, r.learning_rate, r.seed) for r in lora} == {
        (rank, alpha, lr, seed)
        for rank in (1, 2)
        for alpha in (4.0, 16.0)
        for lr in (1e-3, 1e-2)
        for seed in (0, 1)
    }
    for run in lora:
        assert run.cfg.lora.alpha == run.alpha and run.cfg.lora.rank == run.rank
        assert run.cfg.module.optimizer.lr == run.learning_rate
        assert run.run_id == f"lora_r{run.rank}_a{run.alpha:g}_lr{run.learning_rate:g}_s{run.seed}"
        assert run.adapter == (
            f"rank_{run.rank}_seed_{run.seed}_alpha_{run.alpha:g}_lr_{run.learning_rate:g}"
        )
    assert len({r.run_id for r in runs}) == len(runs)
    assert len({r.identity for r in runs}) == len(runs)
    assert len({r.adapter for r in lora}) == len(lora)
    # The learning-rate grid is the LoRA stage's; the other stages keep theirs.
    assert pretrain.cfg.module.optimizer.lr == full[0].cfg.module.optimizer.lr == 1e-3
    assert lora[0].label() == "lora rank=1 alpha=4 lr=0.001 seed=0"


def test_a_single_value_sets_without_renaming():
    runs = lora_runs("sweep.ranks=[1,2]", "sweep.alphas=[8]", "sweep.learning_rates=[0.01]")
    assert [run.run_id for run in runs] == ["lora_r1_a8_s0", "lora_r2_a8_s0"]
    assert [run.adapter for run in runs] == ["rank_1_seed_0", "rank_2_seed_0"]
    assert all(r.cfg.lora.alpha == 8 and r.cfg.module.optimizer.lr == 0.01 for r in runs)


BAD_GRID = {
    "sweep.learning_rates=[0.001,-1]": "sweep.learning_rates=[0.001, -1] is not allowed: it holds -1",
    "sweep.learning_rates=0.01": "must be a list",
    "sweep.alphas=[abc]": "sweep.alphas=['abc'] is not allowed: it must be a list, each a finite",
    "sweep.jobs=0": "sweep.jobs=0 is not allowed: it must be an integer ≥ 1",
    "sweep.jobs=1.5": "sweep.jobs=1.5 is not allowed: it must be an integer ≥ 1",
    "sweep.ranks=[1,1]": "lora_r1_a1_s0",
}


@pytest.mark.parametrize("bad", list(BAD_GRID))
def test_bad_grid_values_are_one_line_errors(bad: str, tmp_path: Path, tiny_overrides, capsys):
    out = tmp_path / "study"
    assert main(["sweep", *tiny_overrides, f"output_dir={out}", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-lab: error:") and "\n" not in err, err
    assert BAD_GRID[bad] in err
    assert not out.exists()


# -- 1. parallel local sweeps ------------------------------------------------------------------


def test_threads_per_job_splits_the_cores():
    assert threads_per_job(1, cores=8) == 8
    assert threads_per_job(2, cores=8) == 4
    assert threads_per_job(3, cores=8) == 2
    assert threads_per_job(4, cores=2) == 1


def test_pool_workers_get_disjoint_gpus(monkeypatch: pytest.MonkeyPatch):
    assert gpu_slices(["0", "1", "2", "3"], 2) == ["0,2", "1,3"]
    assert gpu_slices(["0", "1", "2", "3"], 4) == ["0", "1", "2", "3"]
    assert gpu_slices(["0", "1"], 3) is None  # fewer GPUs than jobs: all shared
    assert gpu_slices([], 2) is None and gpu_slices(["0", "1"], 1) is None
    # What a worker does with its slice (run here: no GPU needed to set the variable).
    import multiprocessing

    counter = multiprocessing.get_context("spawn").Value("i", 1)  # the second worker
    threads = torch.get_num_threads()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setenv(POOL_ENV, "")  # restored after the test: _init_worker sets it
    try:
        _init_worker(2, ["0,2", "1,3"], counter)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,3" and counter.value == 2
        assert torch.get_num_threads() == threads_per_job(2)
        assert os.environ[POOL_ENV] == "2"  # each run's ThreadBudget shares the CPUs by 2
    finally:
        torch.set_num_threads(threads)


def _table(study: Path) -> pd.DataFrame:
    columns = ["run_id", "status", "test_acc", "test_loss", "trainable_params", "epochs"]
    return pd.read_csv(study / "results.csv")[columns].sort_values("run_id").reset_index(drop=True)


def test_parallel_sweep_writes_what_a_serial_sweep_writes(
    tmp_path: Path, tiny_overrides: list[str], capfd
):
    overrides = [
        *tiny_overrides,
        "sweep.ranks=[1,2]",
        "sweep.fused=false",  # every run through the pool
        # 1e30 blows up at the first step: two of the four LoRA runs fail, in the workers.
        "sweep.learning_rates=[1e-3,1e30]",
    ]
    parallel = tmp_path / "parallel"
    # Every run (pretrain here, every run in the serial sweep below, the pool workers') gets
    # the same thread count: CPU kernels sum in a thread-count-dependent order, and the
    # comparison with the serial sweep is meant to be exact.
    overrides.append(f"threads={threads_per_job(2)}")
    threads = torch.get_num_threads()
    try:
        assert main(["sweep", *overrides, f"output_dir={parallel}", "sweep.jobs=2"]) == 1
        err = capfd.readouterr().err
        serial = tmp_path / "serial"
        assert main(["sweep", *overrides, f"output_dir={serial}", "sweep.jobs=1"]) == 1
        capfd.readouterr()
    finally:
        torch.set_num_threads(threads)
    assert "sweep.jobs=2: 5 run(s), up to 2 at a time" in err
    for number in range(1, 7):  # every run announced once, when it starts
        assert len(re.findall(rf"^\[{number}/6\] ", err, flags=re.M)) == 1, err
    assert "FAILED lora rank=1 lr=1e+30 seed=0: FloatingPointError" in err
    assert "FAILED lora rank=2 lr=1e+30 seed=0: FloatingPointError" in err
    assert "2 run(s) failed" in err

    table = _table(parallel)
    assert len(table) == 6
    failed = table[table.status == "failed"].run_id.tolist()
    assert failed == ["lora_r1_a1_lr1e+30_s0", "lora_r2_a2_lr1e+30_s0"]
    adapters = sorted(p.name for p in (parallel / "adapters").iterdir())
    assert adapters == ["rank_1_seed_0_lr_0.001", "rank_2_seed_0_lr_0.001"]
    assert (parallel / "report.md").is_file() and (parallel / "accuracy_vs_rank.png").is_file()
    result = json.loads((parallel / "runs" / "lora_r1_a1_lr0.001_s0" / "result.json").read_text())
    assert result["environment"]["device"].endswith(f"{threads_per_job(2)} threads)")
    assert not list(parallel.rglob("last.ckpt")), "finished runs keep no resume checkpoint"

    # The same study serially: the same rows, the same numbers.
    pd.testing.assert_frame_equal(_table(parallel), _table(serial), check_exact=True)

    # sweep.jobs does not change a study's identity: a serial rerun of the parallel study
    # skips what finished and redoes only the failed runs.
    assert main(["sweep", *overrides, f"output_dir={parallel}", "sweep.jobs=1"]) == 1
    err = capfd.readouterr().err
    assert err.count("done earlier, skipped") == 4
    assert err.count("previous attempt failed") == 2
    assert len(_table(parallel)) == 6


def test_pool_records_a_dead_worker_and_goes_on(tmp_path: Path, tiny_overrides: list[str]):
    cfg = composed(*tiny_overrides)
    dying = PlannedRun("lora", 0, 1, cfg=stage_config(cfg, "lora", rank=1))
    OmegaConf.update(dying.cfg, "model", {"_target_": "os._exit", "_args_": [3]}, merge=False)
    dying.run_id, dying.adapter = "dies", "dies"
    failing = PlannedRun("lora", 0, 2, cfg=stage_config(cfg, "lora", rank=2))
    failing.run_id, failing.adapter = "fails", "fails"
    crashes: list[int] = []
    started: list[int] = []

    def on_crash(position: int, error: BaseException) -> dict[str, Any]:
        crashes.append(position)
        return {"run_id": "dies", "status": "failed", "error": type(error).__name__}

    results = dict(
        run_in_pool(
            [dying, failing],
            tmp_path / "study",
            jobs=1,
            pretrained=tmp_path / "no-such-weights.safetensors",
            on_start=started.append,
            on_crash=on_crash,
        )
    )
    assert started == [0, 1] and crashes == [0]
    assert results[0] == {"run_id": "dies", "status": "failed", "error": "BrokenProcessPool"}
    # The pool was rebuilt: the next run ran in a new worker, failed normally, and was recorded.
    assert results[1]["status"] == "failed" and results[1]["run_id"] == "fails"
    recorded = json.loads((tmp_path / "study" / "runs" / "fails" / "result.json").read_text())
    assert recorded["status"] == "failed"


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


# -- 2. cluster launchers ------------------------------------------------------------------------


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


# -- 3. multi-device training --------------------------------------------------------------------


def test_ddp_gpu_and_auto_trainer_configs_compose():
    ddp = composed("trainer=ddp").trainer
    assert ddp.strategy._target_ == "lightning.pytorch.strategies.DDPStrategy"
    assert ddp.strategy.start_method == "spawn"
    assert ddp.strategy.find_unused_parameters is False
    assert ddp.accelerator == "auto" and ddp.devices == 2
    assert composed("trainer=gpu").trainer.accelerator == "gpu"
    on_gpus = composed("trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=4").trainer
    assert on_gpus.accelerator == "gpu" and on_gpus.devices == 4
    # accelerator=auto picks what is there: the CPU here, a GPU on a CUDA machine.
    auto = instantiate(composed("trainer.accelerator=auto").trainer, logger=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert auto.strategy.root_device.type == expected


def test_lora_trains_every_adapter_and_nothing_frozen():
    """Why DDP needs no `find_unused_parameters`: a backward pass gives every parameter that
    requires grad a gradient, and everything else has requires_grad=False."""
    module = LoRAClassifierModule(
        network=MLP(),
        lora=LoRAConfig(rank=2, alpha=2),
        optimizer=torch.optim.Adam,
    )
    images, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    module.on_train_epoch_start()
    module.training_step((images, labels), 0).backward()
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    adapters = {
        id(p) for layer in lora_layers(module.network).values() for p in layer.adapter_parameters()
    }
    assert trainable == adapters and len(adapters) == 6  # A and B of 3 Linear layers
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
    assert all(p.grad is None for p in module.parameters() if not p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["sequential", "fused"])
def test_ddp_sweep_on_two_cpu_processes(tmp_path: Path, tiny_overrides: list[str], fused: bool):
    out = tmp_path / "study"
    overrides = [*tiny_overrides, "sweep.ranks=[1,2]", "trainer=ddp", f"sweep.fused={fused}"]
    assert main(["sweep", *overrides, f"output_dir={out}"]) == 0
    table = pd.read_csv(out / "results.csv")
    assert table.run_id.tolist() == ["pretrain", "full_finetune", "lora_r1_a1_s0", "lora_r2_a2_s0"]
    assert (table.status == "ok").all() and (table.epochs == 1).all()
    assert table.per_class_acc.map(lambda text: len(json.loads(text)) == 10).all()
    # A fused pass trains its members under one Trainer: one replica check for the pass.
    checked = [*table.run_dir[:2], *sorted(out.glob("passes/*"))] if fused else table.run_dir
    assert table["pass"].nunique() == (3 if fused else 4)
    for run_dir in checked:
        replicas = json.loads((out / run_dir / REPLICAS_FILE).read_text())
        assert replicas["world_size"] == 2
        assert len(set(replicas["digests"])) == 1, "the processes' trainable weights differ"
    # The adapter rank 0 saved is the one every process trained.
    for rank in (1, 2) if not fused else ():
        network = MLP()
        load_network_weights(network, out / "checkpoints" / "pretrain.safetensors")
        load_adapter(network, out / "adapters" / f"rank_{rank}_seed_0")
        replicas = json.loads(
            (out / "runs" / f"lora_r{rank}_a{rank}_s0" / REPLICAS_FILE).read_text()
        )
        assert trainable_digest(network) == replicas["digests"][0]
    # One process wrote: one result per run, nothing per rank (no extra folders or logs).
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(table.run_id)
    assert len(list(out.rglob("result.json"))) == 4
    assert len(list(out.rglob("metrics.csv"))) == 4
    assert not list(out.rglob("lightning_logs")) and not list(out.rglob("version_*"))


# -- precision -------------------------------------------------------------------------------------


def test_bf16_mixed_sweep_end_to_end_keeps_fp32_adapters(tmp_path: Path, tiny_overrides: list[str]):
    out = tmp_path / "study"
    overrides = [*tiny_overrides, "sweep.ranks=[2]"]
    assert main(["sweep", *overrides, "trainer.precision=bf16-mixed", f"output_dir={out}"]) == 0
    table = pd.read_csv(out / "results.csv")
    assert (table.status == "ok").all() and table.test_loss.notna().all()
    saved = load_file(out / "adapters" / "rank_2_seed_0" / "adapter_model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}
    network = MLP()
    load_network_weights(network, out / "checkpoints" / "pretrain.safetensors")
    load_adapter(network, out / "adapters" / "rank_2_seed_0")
    inputs = torch.randn(4, 1, 28, 28)
    unmerged = network(inputs)
    merge_lora(network)
    torch.testing.assert_close(network(inputs), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_inside_an_autocast_region_still_computes_in_fp32():
    def network() -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        inject_lora(model, LoRAConfig(rank=4, alpha=8))
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B.weight)
        return model

    reference, autocast = network(), network()
    merge_lora(reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merge_lora(autocast)
    torch.testing.assert_close(
        autocast[0].base_layer.weight, reference[0].base_layer.weight, rtol=0, atol=0
    )
