"""The bench scripts run as committed, on tiny settings, on the CPU: bench/gpu_check.py (every
check) and bench/studies.py (a whole study fused and sequential)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run one bench script on this checkout's lora_lab, whatever else is installed (a
    relative PYTHONPATH=. would resolve in `cwd`)."""
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(BENCH.parent)},
        timeout=500,
    )


def test_the_gpu_check_runs_every_check_on_tiny_settings(tmp_path: Path):
    done = run_bench("gpu_check.py", "--accelerator", "cpu", "--tiny", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    checks = {
        line.split(".", 1)[0]: line for line in lines if line[:2] in ("1.", "2.", "3.", "4.", "5.")
    }
    assert sorted(checks) == ["1", "2", "3", "4", "5"], done.stdout
    for number in ("1", "2", "4"):  # the checks with a verdict
        assert checks[number].endswith("PASS"), checks[number]
    assert "ratio fused / sequential" in checks["3"] and "ms/step" in checks["5"]
    assert "training on cpu" in checks["4"] and "FAIL" not in done.stdout


def test_the_study_benchmark_runs_fused_and_sequential_on_tiny_settings(tmp_path: Path):
    # one learning rate, no grid steps: the five methods of a seed in one pass
    done = run_bench(
        "studies.py",
        "--tiny",
        "--ranks",
        "1",
        "sweep.learning_rates=null",
        "sweep.lr_extend=0",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fashion_mnist_methods, LoRA stage, 5 runs" in done.stdout, done.stdout
    assert "at most 1 pass per seed" in done.stdout  # five methods, one pass
    assert "ratio fused / sequential = " in done.stdout
    assert "largest |fused - sequential| of the means: 0.00 points" in done.stdout
