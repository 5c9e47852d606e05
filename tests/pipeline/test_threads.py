"""Torch threads per process: the CPUs it may use, shared among the jobs it knows of."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from lora_lab.cli import CONF_DIR
from lora_lab.pipeline import threads
from lora_lab.pipeline.threads import ThreadBudget, TrainingRegistry, threads_for


@pytest.fixture
def registry(tmp_path: Path) -> TrainingRegistry:
    return TrainingRegistry(tmp_path / "registry")


@pytest.fixture
def four_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "cpu_budget", lambda: 4)


HOLD = """
import fcntl, os, sys, time
handle = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o644)
fcntl.flock(handle, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def other_process(registry: TrainingRegistry) -> Iterator[Path]:
    """A second live process registered as training (it holds the lock on its file)."""
    registry.folder.mkdir(parents=True, exist_ok=True)
    path = registry.folder / "other"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    yield path
    process.kill()
    process.wait()


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_alone_a_process_takes_every_cpu(registry, four_cpus):
    registry.enter()
    assert registry.count() == 1
    assert threads_for(OmegaConf.create({"threads": None}), registry=registry) == 4


def test_a_second_training_process_halves_the_threads(registry, four_cpus, other_process):
    registry.enter()
    assert registry.count() == 2
    assert threads_for(OmegaConf.create({"threads": None}), registry=registry) == 2


def test_a_file_nobody_holds_is_not_counted_and_is_removed(registry, four_cpus):
    # What a killed run leaves: its file, but no lock (locks die with their process).
    registry.enter()
    left = registry.folder / "12345-deadbeef"
    left.touch()
    assert registry.count() == 1
    assert not left.exists()
    registry.leave()
    assert not any(registry.folder.iterdir())


def test_sweep_jobs_and_the_threads_key(registry, four_cpus):
    assert threads_for(OmegaConf.create({"threads": None}), jobs=2, registry=registry) == 2
    assert threads_for(OmegaConf.create({"threads": 3}), jobs=2, registry=registry) == 3


@pytest.mark.parametrize("variable", ["SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"])
def test_slurm_and_omp_cap_the_cpus(monkeypatch: pytest.MonkeyPatch, variable: str):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.cpu_budget() == len(os.sched_getaffinity(0))
    monkeypatch.setenv(variable, "1")
    assert threads.cpu_budget() == 1


def test_a_pool_worker_shares_the_cpus_with_the_other_workers(
    registry, four_cpus, monkeypatch: pytest.MonkeyPatch
):
    budget = ThreadBudget(OmegaConf.create({"threads": None}), registry=registry)
    assert budget.jobs == 1  # the sweep's own process trains alone (pretrain, a fused pass)
    monkeypatch.setenv(threads.POOL_ENV, "2")
    budget = ThreadBudget(OmegaConf.create({"threads": None}), registry=registry)
    assert budget.jobs == 2 and budget.apply() == 2


@pytest.mark.parametrize(("n_jobs", "counted"), [(4, 4), (-1, 1)])
def test_the_joblib_launchers_n_jobs_counts(registry, four_cpus, n_jobs: int, counted: int):
    # n_jobs=-1 (joblib's default, one per CPU) says nothing of how many jobs really run.
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}"],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    try:
        assert threads.launcher_jobs() == counted
        assert threads_for(OmegaConf.create({"threads": None}), registry=registry) == 4 // counted
    finally:
        HydraConfig.instance().cfg = None


def test_thread_budget_gives_a_core_back_and_takes_it_again(registry, four_cpus, tmp_path):
    budget = ThreadBudget(OmegaConf.create({"threads": None}), registry=registry)
    registry.enter()
    assert budget.apply() == 4 and torch.get_num_threads() == 4
    registry.folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(registry.folder / "other")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    budget.apply(raise_too=False)  # a second run starts: mid-epoch, the budget only lowers
    assert torch.get_num_threads() == 2
    holder.kill()
    holder.wait()
    budget.apply(raise_too=False)  # it ends: the cores come back at the next epoch
    assert torch.get_num_threads() == 2
    budget.apply()
    assert torch.get_num_threads() == 4
    registry.leave()
    assert not any(registry.folder.iterdir())


def test_every_run_trains_under_a_thread_budget(tmp_path, tiny_overrides, monkeypatch):
    # The callback is attached to real runs, sequential and fused, and leaves no file behind.
    monkeypatch.setattr(threads, "REGISTRY_DIR", tmp_path / "registry")
    seen: list[int] = []
    original = ThreadBudget.apply

    def spy(self: ThreadBudget, raise_too: bool = True) -> int:
        seen.append(id(self))
        return original(self, raise_too)

    monkeypatch.setattr(ThreadBudget, "apply", spy)
    from lora_lab.cli import main

    out = tmp_path / "study"
    assert main(["sweep", *tiny_overrides, f"output_dir={out}", "sweep.ranks=[1,2]"]) == 0
    # pretrain, full finetune, the fused LoRA pass, and its member retrained for the certificate
    assert len(set(seen)) == 4
    assert not list((tmp_path / "registry").iterdir())
