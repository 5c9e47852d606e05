"""The exactness certificate (`sweep.verify`): a fused study retrains members alone, states the
differences against their fused twins in report.md, and fails when they are not exact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from lora_lab.cli import main
from lora_lab.lora import lora_layers
from lora_lab.pipeline import certificate, fused
from lora_lab.pipeline.plan import PlannedRun
from lora_lab.results import write_result

RANKS = "sweep.ranks=[1,2,4]"


def last_line(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_fused_study_carries_the_certificate(tmp_path: Path, tiny_overrides, capsys):
    out = tmp_path / "study"
    assert main(["sweep", *tiny_overrides, RANKS, f"output_dir={out}"]) == 0
    cert = json.loads((out / "verify.json").read_text())
    assert cert["verify"] == 1 and cert["tolerance"] == 0.005 and cert["passed"] is True
    (member,) = cert["members"]
    table = pd.read_csv(out / "results.csv")
    twin = table.set_index("run_id").loc[member["run_id"]]
    assert twin["pass"] == member["pass"] and twin["pass"].startswith("fused_")
    assert 0 <= member["weight_diff"] <= 1e-5  # a few steps: within rounding
    assert member["test_acc_diff"] <= 0.005
    assert member["test_acc_diff"] == abs(member["test_acc_fused"] - member["test_acc_alone"])
    # retrained in its own folder; the study's results never see it
    retrained = out / "verify" / "runs" / member["run_id"]
    assert (retrained / "logs" / "metrics.csv").is_file()
    assert not list((out / "verify").rglob("result.json"))
    assert len(table) == 1 + 1 + 3 and table["run_id"].is_unique
    report = (out / "report.md").read_text()
    assert "## Exactness certificate" in report
    assert f"| `{member['run_id']}` | `{member['pass']}` |" in report
    assert "test accuracy (tolerance 0.005)" in report
    # `lora-lab report` redraws it from verify.json
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert "## Exactness certificate" in (out / "report.md").read_text()
    # a rerun of the finished study trains nothing, the retrained member included
    capsys.readouterr()
    assert main(["sweep", *tiny_overrides, RANKS, f"output_dir={out}"]) == 0
    assert "verifying:" not in capsys.readouterr().err
    assert json.loads((out / "verify.json").read_text())["members"] == cert["members"]


def test_a_broken_fused_twin_fails_the_study(
    tmp_path: Path, tiny_overrides, capsys, monkeypatch: pytest.MonkeyPatch
):
    real = fused._finish

    def broken(k: int, member: Any, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():  # a fused adapter 1e-3 off, and its test accuracy 2 points off
            for layer in lora_layers(member.module.network).values():
                layer.lora_B.weight.add_(1e-3)
        tested = args[0].test_metrics.get(k)
        if tested is not None:
            tested["test_acc"] = float(tested["test_acc"]) - 0.02
        return real(k, member, *args, **kwargs)

    monkeypatch.setattr(fused, "_finish", broken)
    out = tmp_path / "study"
    assert main(["sweep", *tiny_overrides, RANKS, f"output_dir={out}"]) == 1
    line = last_line(capsys)
    assert line.startswith("error: exactness certificate FAILED: 1 fused member(s) retrained")
    assert "test accuracy" in line and "(tolerance 0.005)" in line
    cert = json.loads((out / "verify.json").read_text())
    (member,) = cert["members"]
    assert cert["passed"] is False and member["test_acc_diff"] == pytest.approx(0.02, abs=1e-6)
    assert member["weight_diff"] >= 1e-3 * 0.99  # reported beside it
    assert "**FAIL**" in (out / "report.md").read_text()
    # the fused rows themselves are untouched: every run ok, none from the verify folder
    table = pd.read_csv(out / "results.csv")
    assert (table["status"] == "ok").all() and len(table) == 5


def test_verify_0_retrains_nothing(
    tmp_path: Path, tiny_overrides, capsys, monkeypatch: pytest.MonkeyPatch
):
    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("sweep.verify=0 retrained a run")

    monkeypatch.setattr(certificate, "run_stage", no_training)
    out = tmp_path / "study"
    assert main(["sweep", *tiny_overrides, RANKS, "sweep.verify=0", f"output_dir={out}"]) == 0
    assert not (out / "verify").exists()
    assert json.loads((out / "verify.json").read_text())["members"] == []
    report = (out / "report.md").read_text()
    line = "Exactness certificate: off (sweep.verify=0); no fused member was retrained alone."
    assert line in report


def test_members_are_drawn_with_the_study_seed_from_passes_of_two_or_more(tmp_path: Path):
    passes = {"a": "fused_1", "b": "fused_1", "c": "fused_2", "d": "fused_2"}
    passes |= {"e": "e", "f": "fused_3", "g": "fused_1"}  # e trained alone, f in a pass of one
    runs = []
    for run_id, pass_id in passes.items():
        status = "diverged" if run_id == "d" else "ok"  # d still counts in c's pass of two
        record = {"run_id": run_id, "stage": "lora", "pass": pass_id, "status": status}
        write_result(tmp_path / "runs" / run_id, record)
        dropout = 0.1 if run_id == "g" else 0.0  # its masks differ fused: never compared
        cfg = OmegaConf.create({"lora": {"dropout": dropout}, "model": {"dropout": 0.0}})
        runs.append(PlannedRun(stage="lora", rank=1, seed=0, cfg=cfg, run_id=run_id))
    twins = certificate.fused_twins(tmp_path, runs)
    assert [run.run_id for run, _ in twins] == ["a", "b", "c"]
    draws = {seed: certificate.choose(twins, 1, seed) for seed in range(20)}
    assert draws[0] == certificate.choose(twins, 1, 0)  # the same seed, the same member
    assert {run.run_id for seed in draws for run, _ in draws[seed]} == {"a", "b", "c"}
    assert [run.run_id for run, _ in certificate.choose(twins, 5, 0)] == ["a", "b", "c"]
