"""The console script's quick exit (`lora_lab.cli.run`) keeps what a normal exit gives, and
the commands that need no model answer without importing torch or Lightning."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_run_keeps_exit_code_piped_output_and_atexit_work(tmp_path):
    marker = tmp_path / "atexit.txt"
    done = _run(
        f"""
        import atexit, logging, sys, threading, time
        from pathlib import Path
        import lora_lab.cli as cli

        log_file = Path({str(tmp_path / "log.txt")!r})
        handler = logging.FileHandler(log_file)
        logging.getLogger("probe").addHandler(handler)
        atexit.register(lambda: Path({str(marker)!r}).write_text("ran"))

        def main():
            print("x" * 100_000)  # more than a pipe's buffer: must all arrive
            print("to stderr", file=sys.stderr)
            logging.getLogger("probe").error("logged")
            threading.Thread(target=lambda: (time.sleep(0.5), print("thread done"))).start()
            return 3

        cli.main = main
        cli.run()
        """,
        tmp_path,
    )
    assert done.returncode == 3
    assert done.stdout.startswith("x" * 100_000) and done.stdout.rstrip().endswith("thread done")
    assert "to stderr" in done.stderr
    assert marker.read_text() == "ran"
    assert "logged" in (tmp_path / "log.txt").read_text()


def test_module_entry_point_bad_input_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lora_lab.cli", "report", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("lora-lab: error:")
    assert str(tmp_path / "missing") in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["sweep", "--help"],
        ["sweep", "--cfg", "job"],
        ["sweep", "sweep.ranks=[0]"],
        ["sweep", "trainer.max_epochs=-1"],
        ["sweep", "trainer.max_epochs=abc"],
        ["sweep", "seed=abc"],
        ["sweep", "lora.rank=0"],
        ["sweep", "--cfg", "job", "sweep.seeds=auto"],
        ["sweep", "sweep.seeds=abc"],
        ["sweep", "sweep.lr_extend=-1"],
        ["sweep", "sweep.verify_tolerance=-1e-5"],
        ["sweep", "report.max_seeds=2"],
        ["sweep", "data.split_seed=-1"],
        ["train", "stage=lora", "module.optimizer.lr=-1"],
    ],
    ids=lambda args: " ".join(args),
)
def test_commands_that_need_no_model_answer_without_torch(args: list[str], tmp_path: Path):
    """Help, the composed config and a refused value need neither torch nor Lightning: the
    command line imports them only where training starts."""
    code = (
        "import sys; from lora_lab.cli import main; code = main(sys.argv[1:]); "
        "loaded = sorted({'torch', 'lightning'} & set(sys.modules)); "
        "print('loaded:', loaded, 'exit:', code, file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *args, f"output_dir={tmp_path / 'study'}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    last = done.stderr.strip().splitlines()[-1]
    expected = 0 if any(a.startswith("-") for a in args) else 2
    assert last == f"loaded: [] exit: {expected}", done.stderr[-2000:]
    if expected == 2:  # the refusal is one line
        assert done.stderr.count("\n") == 2 and done.stderr.startswith("lora-lab: error:")
    assert not (tmp_path / "study").exists()
