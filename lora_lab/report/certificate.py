"""The exactness certificate, as `report.md` and the terminal state it: drawn from the study's
`verify.json` (written by `pipeline.certificate` after training).

For each member of a fused pass retrained alone (`sweep.verify` of them), the file holds the
largest absolute difference of its adapter weights and of its test accuracy against its fused
twin. A member passes when its test accuracy is within `sweep.verify_tolerance` of its twin's
(a task without accuracy: its adapter weights within it); the certificate passes when every
member does.

Why accuracy, not weights: a fused step computes each member's step within float rounding of
the step alone (tests/pipeline/test_fused_exact.py: 1e-5 over the first steps), but the grouped
kernels round differently from the layer alone, and Adam amplifies a rounding-level difference
over hundreds of steps. Measured on the default study (585 steps): adapter weights 0.01-0.54
apart at the end, test accuracy 0.04-0.22 points. The weights are reported; the verdict asks
that the fused twin's result is the run's result within the tolerance.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

VERIFY_FILE = "verify.json"
#: The folder (in the study folder) where the members are retrained: `runs/`, `adapters/`.
VERIFY_DIR = "verify"
# Accuracies are float32 fractions: a difference at the tolerance must pass.
_ROUNDING = 1e-7


def member_passed(member: Mapping[str, Any], tolerance: float) -> bool:
    """Whether one retrained member matches its fused twin: no error, and its test accuracy
    within `tolerance` (a task without accuracy: its adapter weights within `tolerance`)."""
    if member.get("error") or member.get("weight_diff") is None:
        return False
    accuracy = member.get("test_acc_diff")
    if accuracy is None:
        return float(member["weight_diff"]) <= tolerance
    return float(accuracy) <= tolerance + _ROUNDING


def certificate_passed(certificate: Mapping[str, Any]) -> bool | None:
    """True or False when members were retrained; None when none was (off, or nothing fused)."""
    members: Sequence[Mapping[str, Any]] = certificate.get("members") or []
    if not members:
        return None
    tolerance = float(certificate["tolerance"])
    return all(member_passed(member, tolerance) for member in members)


def read_certificate(study: Path) -> dict[str, Any] | None:
    """The study's `verify.json`, or None where there is none (or it cannot be read)."""
    try:
        certificate = json.loads((study / VERIFY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return certificate if isinstance(certificate, dict) else None


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def certificate_line(certificate: Mapping[str, Any]) -> str:
    """The certificate in one line: off, nothing to certify, passed or FAILED, with the largest
    differences and the tolerances."""
    count = int(certificate.get("verify", 0))
    if count == 0:
        return "exactness certificate: off (sweep.verify=0); no fused member was retrained alone"
    members = certificate.get("members") or []
    if not members:
        why = certificate.get("note") or "no run trained in a fused pass of 2 or more runs"
        return f"exactness certificate: nothing to certify ({why})"
    weights = [m["weight_diff"] for m in members if m.get("weight_diff") is not None]
    accuracy = [m["test_acc_diff"] for m in members if m.get("test_acc_diff") is not None]
    largest = (
        f"test accuracy {_number(max(accuracy, default=None))} (tolerance "
        f"{float(certificate['tolerance']):g}), adapter weights "
        f"{_number(max(weights, default=None))}"
    )
    verdict = "passed" if certificate_passed(certificate) else "FAILED"
    failed = [m["run_id"] for m in members if not member_passed(m, float(certificate["tolerance"]))]
    which = f"; failed: {', '.join(failed)}" if failed else ""
    return (
        f"exactness certificate {verdict}: {len(members)} fused member(s) retrained alone, "
        f"largest differences: {largest}{which}"
    )


def _row(member: Mapping[str, Any], tolerance: float) -> str:
    accuracy = _number(member.get("test_acc_diff"))
    verdict = "pass" if member_passed(member, tolerance) else "**FAIL**"
    if member.get("error"):
        verdict += f": {member['error']}"
    cells = [f"`{member['run_id']}`", f"`{member.get('pass', '')}`"]
    cells += [accuracy, _number(member.get("weight_diff")), verdict]
    return "| " + " | ".join(cells) + " |"


def certificate_section(study: Path) -> list[str]:
    """The report's section (empty where the study has no `verify.json`)."""
    certificate = read_certificate(study)
    if certificate is None:
        return []
    line = certificate_line(certificate)
    lines = ["## Exactness certificate", "", f"{line[0].upper()}{line[1:]}.", ""]
    members = certificate.get("members") or []
    if not members:
        return lines
    tolerance = float(certificate["tolerance"])
    lines += [
        f"Members of fused passes retrained alone into `{VERIFY_DIR}/` (sweep.verify="
        f"{certificate['verify']}, chosen at random with seed {certificate.get('seed', 0)}); the "
        "largest absolute difference against each one's fused twin:",
        "",
        f"| run | fused pass | test accuracy (tolerance {tolerance:g}) "
        "| adapter weights | verdict |",
        "|---|---|---|---|---|",
        *[_row(member, tolerance) for member in members],
        "",
        "Each fused step equals the member's step alone within float rounding (1e-5 over the "
        "first steps, tests/pipeline/test_fused_exact.py), but the grouped kernels round "
        "differently from a layer alone and Adam amplifies that over a run, so end weights are "
        "not bit-identical; the verdict is on test accuracy (`sweep.verify_tolerance`).",
        "",
    ]
    return lines
