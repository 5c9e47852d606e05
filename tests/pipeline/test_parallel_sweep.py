"""Parallel local sweeps (`sweep.jobs`): a process pool that splits the cores and the GPUs,
writes what a serial sweep writes, and records a worker that dies."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from lora_lab.cli import main
from lora_lab.pipeline.parallel import _init_worker, gpu_slices, run_in_pool, threads_per_job
from lora_lab.pipeline.plan import PlannedRun
from lora_lab.pipeline.run_config import stage_config
from lora_lab.pipeline.threads import POOL_ENV
from tests.pipeline.study_config import composed


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
        # 1e30 blows up at the first step: two of the four LoRA runs diverge, in the workers.
        "sweep.learning_rates=[1e-3,1e30]",
    ]
    parallel = tmp_path / "parallel"
    # Every run (pretrain here, every run in the serial sweep below, the pool workers') gets
    # the same thread count: CPU kernels sum in a thread-count-dependent order, and the
    # comparison with the serial sweep is meant to be exact.
    overrides.append(f"threads={threads_per_job(2)}")
    threads = torch.get_num_threads()
    try:
        assert main(["sweep", *overrides, f"output_dir={parallel}", "sweep.jobs=2"]) == 0
        err = capfd.readouterr().err
        serial = tmp_path / "serial"
        assert main(["sweep", *overrides, f"output_dir={serial}", "sweep.jobs=1"]) == 0
        capfd.readouterr()
    finally:
        torch.set_num_threads(threads)
    assert "sweep.jobs=2: 5 run(s), up to 2 at a time" in err
    for number in range(1, 7):  # every run announced once, when it starts
        assert len(re.findall(rf"^\[{number}/6\] ", err, flags=re.M)) == 1, err
    assert "DIVERGED lora rank=1 lr=1e+30 seed=0: FloatingPointError" in err
    assert "DIVERGED lora rank=2 lr=1e+30 seed=0: FloatingPointError" in err
    assert "2 run(s) diverged" in err and "failed" not in err

    table = _table(parallel)
    assert len(table) == 6
    diverged = table[table.status == "diverged"].run_id.tolist()
    assert diverged == ["lora_r1_a1_lr1e+30_s0", "lora_r2_a2_lr1e+30_s0"]
    adapters = sorted(p.name for p in (parallel / "adapters").iterdir())
    assert adapters == ["rank_1_seed_0_lr_0.001", "rank_2_seed_0_lr_0.001"]
    assert (parallel / "report.md").is_file() and (parallel / "accuracy_vs_rank.png").is_file()
    result = json.loads((parallel / "runs" / "lora_r1_a1_lr0.001_s0" / "result.json").read_text())
    assert result["environment"]["device"].endswith(f"{threads_per_job(2)} threads)")
    assert not list(parallel.rglob("last.ckpt")), "finished runs keep no resume checkpoint"

    # The same study serially: the same rows, the same numbers.
    pd.testing.assert_frame_equal(_table(parallel), _table(serial), check_exact=True)

    # sweep.jobs does not change a study's identity: a serial rerun of the parallel study
    # skips what finished, the diverged runs too (a final result, not a failure).
    assert main(["sweep", *overrides, f"output_dir={parallel}", "sweep.jobs=1"]) == 0
    err = capfd.readouterr().err
    assert err.count("done earlier, skipped") == 4
    assert err.count("diverged earlier, skipped") == 2
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
    assert results[1].status == "failed" and results[1].run_id == "fails"
    recorded = json.loads((tmp_path / "study" / "runs" / "fails" / "result.json").read_text())
    assert recorded["status"] == "failed"
