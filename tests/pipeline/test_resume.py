"""Sweeps that survive: skip, resume after SIGKILL, refusal on a changed config, restart,
corrupt results, failed runs, determinism and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import save_file

from lora_lab.cli import main
from lora_lab.models import LinearMap, save_network_weights
from tests.pipeline.study_config import tiny_study_overrides


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below `folder` with a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def metrics(study: Path) -> pd.DataFrame:
    table = pd.read_csv(study / "results.csv")
    return (
        table[["run_id", "status", "test_acc", "test_loss", "trainable_params"]]
        .sort_values("run_id")
        .reset_index(drop=True)
    )


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("resume")
    args = [*tiny_study_overrides(folder), f"output_dir={folder / 'study'}", "sweep.ranks=[1,2]"]
    assert main(["sweep", *args]) == 0
    return folder / "study", args


def test_rerun_skips_every_finished_run(finished_study, capsys):
    study, args = finished_study
    before = {
        p: (study / p).stat().st_mtime_ns
        for p in ("runs/pretrain/result.json", "runs/lora_r1_a1_s0/result.json")
    }
    table = metrics(study)
    capsys.readouterr()
    assert main(["sweep", *args]) == 0
    err = capsys.readouterr().err
    assert err.count("done earlier, skipped") == 4
    assert {p: (study / p).stat().st_mtime_ns for p in before} == before
    pd.testing.assert_frame_equal(metrics(study), table)


def test_same_config_twice_gives_identical_results(finished_study, tmp_path):
    study, args = finished_study
    again = tmp_path / "again"
    assert (
        main(
            ["sweep", *[a for a in args if not a.startswith("output_dir=")], f"output_dir={again}"]
        )
        == 0
    )
    pd.testing.assert_frame_equal(metrics(again), metrics(study))


def test_changed_config_is_refused_and_nothing_is_touched(finished_study, capsys):
    study, args = finished_study
    before = snapshot(study)
    capsys.readouterr()
    assert main(["sweep", *args, "lora.dropout=0.1", "stages.lora.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lora.dropout" in err and "stages.lora.lr" in err
    assert snapshot(study) == before


def test_adding_a_rank_runs_only_the_new_run(finished_study, capsys, tmp_path):
    study, args = finished_study
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(study, copy)
    args = [a for a in args if not a.startswith(("output_dir=", "sweep.ranks="))]
    capsys.readouterr()
    assert main(["sweep", *args, f"output_dir={copy}", "sweep.ranks=[1,2,4]"]) == 0
    err = capsys.readouterr().err
    assert err.count("done earlier, skipped") == 4 and "lora rank=4 seed=0 … eta" in err
    assert sorted(pd.read_csv(copy / "results.csv")["rank"].dropna().astype(int)) == [1, 2, 4]


def test_restart_redoes_everything_and_keeps_the_old_results(finished_study, tmp_path):
    study, args = finished_study
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(study, copy)
    args = [a for a in args if not a.startswith("output_dir=")]
    assert (
        main(["sweep", *args, f"output_dir={copy}", "lora.dropout=0.1", "sweep.restart=true"]) == 0
    )
    (moved,) = (copy / "replaced").iterdir()
    assert (moved / "results.csv").read_bytes() == (study / "results.csv").read_bytes()
    assert len(pd.read_csv(copy / "results.csv")) == 4


def test_corrupt_result_is_reported_and_redone(finished_study, tmp_path, capsys):
    study, args = finished_study
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(study, copy)
    (copy / "runs/lora_r2_a2_s0/result.json").write_text('{"stage": "lora", "test_ac')
    args = [a for a in args if not a.startswith("output_dir=")]
    capsys.readouterr()
    assert main(["sweep", *args, f"output_dir={copy}"]) == 0
    err = capsys.readouterr().err
    assert "corrupt result file" in err and "lora_r2_a2_s0" in err
    assert err.count("done earlier, skipped") == 3
    pd.testing.assert_frame_equal(metrics(copy), metrics(study))


def test_diverged_runs_are_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    args = [
        *tiny_study_overrides(tmp_path),
        f"output_dir={tmp_path / 'study'}",
        "sweep.ranks=[1,2]",
    ]
    # A huge learning rate on rank 1 only is not expressible; blow up every LoRA run instead
    # and check the sweep still reaches the end, records both as diverged (a result, not a
    # crash: exit 0), and on a second call skips them as final.
    assert main(["sweep", *args, "stages.lora.lr=1e30"]) == 0
    err = capsys.readouterr().err
    assert "DIVERGED lora rank=1 seed=0: FloatingPointError" in err
    table = pd.read_csv(tmp_path / "study" / "results.csv").set_index("run_id")
    assert table.loc["full_finetune", "status"] == "ok"
    assert (table.loc[["lora_r1_a1_s0", "lora_r2_a2_s0"], "status"] == "diverged").all()
    assert table.loc["lora_r1_a1_s0", "error"].startswith("FloatingPointError: training loss is")
    assert "2 run(s) diverged" in err and "failed" not in err
    assert "Failed runs" in (tmp_path / "study" / "report.md").read_text()
    assert main(["sweep", *args, "stages.lora.lr=1e30"]) == 0
    err = capsys.readouterr().err
    assert err.count("diverged earlier, skipped") == 2 and "FloatingPointError" not in err


def test_result_json_records_provenance(finished_study):
    study, _ = finished_study
    result = json.loads((study / "runs/lora_r1_a1_s0/result.json").read_text())
    assert result["config"]["lora"]["rank"] == 1
    assert result["environment"]["packages"]["torch"]
    assert "git_commit" in result["environment"]
    assert result["data_fingerprint"]["files"]
    assert len(result["identity"]) == 16


# -- bad input: one line, exit 2, nothing on disk changed ----------------------------------

BAD_SWEEP = {
    "lora.rank=0": "rank",
    "lora.rank=-3": "rank",
    "lora.rank=abc": "'abc'",
    "lora.alpha=0": "alpha",
    "lora.dropout=1.5": "dropout",
    "lora.target_modules=[nosuch]": "hidden.0, hidden.1, head",
    "data=nosuch": "fashion_mnist",
    "data.classes=[nosuch]": "Ankle boot",
    "sweep.ranks=[]": "sweep.ranks",
}


@pytest.mark.parametrize("bad", list(BAD_SWEEP))
def test_bad_sweep_input(bad: str, finished_study, capsys):
    study, args = finished_study
    before = snapshot(study)
    capsys.readouterr()
    assert main(["sweep", *args, bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-lab: error:") and "\n" not in err, err
    assert BAD_SWEEP[bad] in err
    assert snapshot(study) == before


def test_unwritable_output_dir(tmp_path, tiny_overrides, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["sweep", *tiny_overrides, f"output_dir={blocker / 'study'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot be written" in err and "\n" not in err
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("case", ["missing", "corrupt", "architecture"])
def test_bad_pretrain_ckpt(case: str, tmp_path, tiny_overrides, capsys):
    ckpt = tmp_path / "pre.safetensors"
    if case == "corrupt":
        ckpt.write_bytes(b"\x00garbage")
    elif case == "architecture":
        save_network_weights(LinearMap(7, 3), ckpt)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert (
        main(["train", "stage=lora", f"pretrain_ckpt={ckpt}", f"output_dir={out}", *tiny_overrides])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    expected = {
        "missing": "does not exist",
        "corrupt": "corrupt",
        "architecture": "missing keys ['head.bias'",
    }
    assert expected[case] in err
    assert snapshot(out) == {"keep.txt": hashlib.sha1(b"mine").hexdigest()}


def test_debug_shows_the_traceback(tmp_path, tiny_overrides):
    with pytest.raises(ValueError, match="rank"):
        main(["sweep", "--debug", *tiny_overrides, f"output_dir={tmp_path}", "lora.rank=0"])


# -- SIGKILL partway through a LoRA run, then the same command again -----------------------


def _sweep_cmd(folder: Path, out: Path, fused: bool) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lora_lab.cli",
        "sweep",
        "sweep.ranks=[1,2]",
        f"sweep.fused={str(fused).lower()}",
        f"output_dir={out}",
        *[
            a
            for a in tiny_study_overrides(folder)
            if not a.startswith(("stages.", "trainer.limit_train"))
        ],
        "stages.pretrain.max_epochs=1",
        "stages.full_finetune.max_epochs=1",
        "stages.lora.max_epochs=30",
        # What is compared here is resumed against uninterrupted; a fused member retrained alone
        # for 150 steps drifts 1.2e-5 from its twin (rounding), which the certificate (tested
        # in test_certificate) would report.
        "sweep.verify=0",
    ]


@pytest.mark.parametrize("fused", [False, True], ids=["sequential", "fused"])
def test_sigkill_then_rerun_completes_with_the_uninterrupted_results(tmp_path, fused):
    out = tmp_path / "killed"
    cmd = _sweep_cmd(tmp_path, out, fused)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    pattern = "passes/fused_*/last.ckpt" if fused else "runs/lora_r1_a1_s0/last.ckpt"
    deadline = time.monotonic() + 120
    while not list(out.glob(pattern)) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    (checkpoint,) = out.glob(pattern)
    assert not (out / "runs" / "lora_r1_a1_s0" / "result.json").exists()

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = checkpoint.parent.name if fused else "lora_r1_a1_s0"
    assert f"resuming {resumed} after epoch" in rerun.stderr
    assert rerun.stderr.count("done earlier, skipped") == 2  # pretrain and full finetune

    reference = tmp_path / "uninterrupted"
    straight = subprocess.run(
        _sweep_cmd(tmp_path, reference, fused), capture_output=True, text=True, env=env
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    resumed_table = metrics(out)
    assert resumed_table.run_id.is_unique and len(resumed_table) == 4
    pd.testing.assert_frame_equal(resumed_table, metrics(reference))
    passes = pd.read_csv(out / "results.csv").set_index("run_id")["pass"]
    assert (passes["lora_r1_a1_s0"] == passes["lora_r2_a2_s0"]) == fused
    assert not checkpoint.exists(), "a finished run keeps no resume checkpoint"
    for run in ("lora_r1_a1_s0", "lora_r2_a2_s0"):
        log = pd.read_csv(out / "runs" / run / "logs" / "metrics.csv")
        train_epochs = log.dropna(subset=["train_loss"]).epoch.tolist()
        assert train_epochs == list(range(30)), "epochs before the kill stay in the log, once each"


def test_every_resume_checkpoint_finds_its_epochs_rows_already_on_disk(tmp_path, monkeypatch):
    """A kill just after a checkpoint is saved must not lose that epoch's row from the log:
    the resumed run only logs the epochs after the checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lora_lab.pipeline import checkpointing

    seen: list[tuple[int, list[int]]] = []

    class Recording(ModelCheckpoint):
        def _save_checkpoint(self, trainer, filepath):
            super()._save_checkpoint(trainer, filepath)
            path = Path(trainer.default_root_dir) / "logs" / "metrics.csv"
            log = pd.read_csv(path) if path.is_file() else pd.DataFrame()
            trained = log.dropna(subset=["train_loss"]) if "train_loss" in log else log
            logged = sorted(trained.epoch.astype(int).tolist()) if len(trained) else []
            seen.append((trainer.current_epoch, logged))

    monkeypatch.setattr(checkpointing, "ModelCheckpoint", Recording)
    args = [*tiny_study_overrides(tmp_path), f"output_dir={tmp_path / 'study'}"]
    assert main(["sweep", *args, "sweep.ranks=[1]", "stages.lora.max_epochs=3"]) == 0
    lora_saves = seen[2:]  # after pretrain's and full finetune's single epoch
    assert [epoch for epoch, _ in lora_saves] == [0, 1, 2]
    for epoch, logged in lora_saves:
        assert logged == list(range(epoch + 1)), f"checkpoint of epoch {epoch} saw rows {logged}"


def test_resume_ignores_a_checkpoint_from_another_config(tmp_path):
    from lora_lab.pipeline.resume import resume_checkpoint

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_file({}, run_dir / "last.ckpt")
    (run_dir / "identity.txt").write_text("aaaa\n")
    assert resume_checkpoint(run_dir, "aaaa") == run_dir / "last.ckpt"
    assert resume_checkpoint(run_dir, "bbbb") is None
    assert not (run_dir / "last.ckpt").exists()
