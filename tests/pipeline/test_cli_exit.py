"""The console script's quick exit (`lora_lab.cli.run`) keeps what a normal exit gives."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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
