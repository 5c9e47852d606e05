"""The exactness certificate (`sweep.verify`): after a study's training, members of its fused
passes are retrained alone and compared with their fused twins.

`sweep.verify` members (default 1) are drawn at random, with the study's `seed`, among the LoRA
runs that finished `ok` in a fused pass of 2 or more runs. Each is retrained by `run_stage`,
as `sweep.fused=false` would train it, into `verify/` (`verify/runs/<run_id>/`,
`verify/adapters/<adapter>/`; no `result.json`, so the study's results and `results.csv`
never see it). The largest absolute difference of its adapter weights and of its test
accuracy against the fused twin go to `verify.json`, which `report.md` draws
(`report.certificate`); a member already retrained for the same twin (same identity and pass)
is not retrained again when the study is resumed.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from safetensors.torch import load_file

from lora_lab._atomic import atomic_write_text
from lora_lab.lora.adapter_io import WEIGHTS_NAME
from lora_lab.pipeline.console import say
from lora_lab.pipeline.plan import PlannedRun
from lora_lab.pipeline.sequential import StageRun, run_stage
from lora_lab.report.certificate import (
    VERIFY_DIR,
    VERIFY_FILE,
    certificate_line,
    certificate_passed,
    member_passed,
    read_certificate,
)
from lora_lab.results import RESULT_FILE, read_result

log = logging.getLogger(__name__)


def with_dropout(run: PlannedRun) -> bool:
    """Whether a run draws dropout masks (`lora.dropout` or `model.dropout` above 0): in a pass
    they come from the pass's random stream, alone from the run's, so the twins differ by
    design and are never compared."""
    cfg = run.cfg
    return any(float(node.get("dropout") or 0) > 0 for node in (cfg.lora, cfg.model))


def fused_twins(study_dir: Path, runs: list[PlannedRun]) -> list[tuple[PlannedRun, dict]]:
    """The planned LoRA runs without dropout that finished `ok` in a fused pass of 2 or more
    runs, with their result records, in run-id order."""
    found: dict[str, tuple[PlannedRun, dict]] = {}
    for run in runs:
        path = study_dir / "runs" / run.run_id / RESULT_FILE
        if run.stage != "lora" or not path.is_file() or with_dropout(run):
            continue
        try:
            found[run.run_id] = (run, read_result(path))
        except ValueError:  # a corrupt result: the table reports it
            continue
    members = Counter(record.get("pass") for _, record in found.values())
    return [
        (run, record)
        for run_id, (run, record) in sorted(found.items())
        if record.get("status") == "ok"
        and record.get("pass") not in (None, "", run_id)
        and members[record.get("pass")] >= 2
    ]


def choose(twins: list[tuple[PlannedRun, dict]], count: int, seed: int) -> list:
    """`count` of `twins` (all where there are fewer) drawn at random with `seed`, in run-id
    order."""
    chosen = random.Random(seed).sample(twins, min(count, len(twins)))
    return sorted(chosen, key=lambda pair: pair[0].run_id)


def largest_difference(fused_adapter: Path, alone_adapter: Path) -> float:
    """The largest absolute difference between two adapters' weights (same keys and shapes).

    Raises:
        ValueError: If their keys or shapes differ.
    """
    together = load_file(fused_adapter / WEIGHTS_NAME)
    alone = load_file(alone_adapter / WEIGHTS_NAME)
    if together.keys() != alone.keys():
        raise ValueError(f"the adapters hold different keys: {sorted(together ^ alone)[:3]}")
    largest = 0.0
    for key, tensor in alone.items():
        if together[key].shape != tensor.shape:
            raise ValueError(f"{key}: shape {tuple(together[key].shape)} ≠ {tuple(tensor.shape)}")
        difference = (together[key].double() - tensor.double()).abs()
        largest = max(largest, float(difference.max()) if difference.numel() else 0.0)
    return largest


def _compare(run: PlannedRun, record: dict, study_dir: Path, alone: StageRun) -> dict[str, Any]:
    """One member's entry: the differences against its twin, or the reason there are none."""
    entry: dict[str, Any] = {"run_id": run.run_id, "pass": record["pass"]}
    entry |= {"identity": record.get("identity"), "retrained": f"{VERIFY_DIR}/runs/{run.run_id}"}
    result, retrained = alone.result, study_dir / VERIFY_DIR / str(alone.result.artefact)
    entry["weight_diff"] = largest_difference(study_dir / record["artefact"], retrained)
    fused_acc, alone_acc = record.get("test_acc"), result.test_acc
    if fused_acc is not None and alone_acc is not None:
        entry["test_acc_fused"], entry["test_acc_alone"] = fused_acc, alone_acc
        entry["test_acc_diff"] = abs(float(fused_acc) - float(alone_acc))
    return entry


def retrain(run: PlannedRun, record: dict, study_dir: Path, pretrained: Path) -> dict[str, Any]:
    """Retrain one fused member alone into `verify/` and compare it with its twin; an error is
    the entry's `error` (the certificate then fails), never the study's end."""
    folder = study_dir / VERIFY_DIR
    shutil.rmtree(folder / "runs" / run.run_id, ignore_errors=True)  # a fresh log
    say(f"    verifying: {run.label()} retrained alone, against its fused pass {record['pass']}")
    try:
        alone = run_stage(
            copy.deepcopy(run.cfg),
            folder,
            pretrained=pretrained,
            run_id=run.run_id,
            adapter_name=run.adapter or None,
        )
        return _compare(run, record, study_dir, alone)
    except Exception as error:  # a certificate that cannot be made fails, with its reason
        log.debug("verifying %s failed", run.run_id, exc_info=True)
        text = str(error).strip().splitlines()
        return {
            "run_id": run.run_id,
            "pass": record["pass"],
            "identity": record.get("identity"),
            "error": f"{type(error).__name__}: {text[0] if text else ''}",
        }


def _reusable(kept: dict[str, Any] | None, record: dict) -> bool:
    """Whether an earlier entry was made for this very twin (same run identity and pass)."""
    return (
        kept is not None
        and not kept.get("error")
        and bool(record.get("identity"))
        and kept.get("identity") == record.get("identity")
        and kept.get("pass") == record.get("pass")
    )


def certify(
    cfg: DictConfig, runs: list[PlannedRun], study_dir: Path, pretrained: Path
) -> dict[str, Any]:
    """Make the study's certificate: retrain `sweep.verify` fused members alone, write
    `verify.json`, say it in one line.

    Args:
        cfg: The study config (`sweep.verify`, `sweep.verify_tolerance`, `seed`).
        runs: The study's plan.
        study_dir: The study folder.
        pretrained: The pretrain checkpoint the LoRA runs start from.

    Returns:
        The certificate as written; its `passed` is None when no member was retrained.
    """
    count, tolerance = int(cfg.sweep.get("verify", 1)), float(cfg.sweep.get("verify_tolerance"))
    certificate: dict[str, Any] = {"verify": count, "tolerance": tolerance, "seed": int(cfg.seed)}
    certificate["members"] = []
    if count > 0:
        twins = fused_twins(study_dir, runs)
        if not twins:
            certificate["note"] = (
                "no run without dropout finished in a fused pass of 2 or more runs"
            )
        chosen = choose(twins, count, int(cfg.seed))
        earlier = (read_certificate(study_dir) or {}).get("members") or []
        kept = {entry.get("run_id"): entry for entry in earlier if isinstance(entry, dict)}
        for run, record in chosen:
            entry = kept[run.run_id] if _reusable(kept.get(run.run_id), record) else None
            entry = entry or retrain(run, record, study_dir, pretrained)
            entry["passed"] = member_passed(entry, tolerance)
            certificate["members"].append(entry)
    certificate["passed"] = certificate_passed(certificate)
    text = json.dumps(certificate, indent=2) + "\n"
    atomic_write_text(study_dir / VERIFY_FILE, text, fsync=True)
    failed = certificate["passed"] is False
    say(certificate_line(certificate), logging.ERROR if failed else logging.INFO)
    return certificate
