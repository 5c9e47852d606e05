"""The report's provenance sections: the command, the environment, the resolved config, and
the analysis (`lora-lab analyze`) figures and table, each read from the study folder."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from lora_lab.report.tables import markdown_table

ANALYSIS_ROWS = 30


def _fenced(text: str, language: str = "") -> str:
    """A code block whose fence is longer than any backtick run inside ``text``."""
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{language}\n{text.rstrip()}\n{fence}\n"


def read_study_json(study: Path) -> tuple[dict, list[str]]:
    """``study.json`` as a dict (``{}`` if absent) and notes about problems reading it."""
    path = study / "study.json"
    if not path.is_file():
        return {}, []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        return {}, [f"`study.json` could not be read: {error}"]
    if not isinstance(data, dict):
        return {}, ["`study.json` is not a JSON object; ignored."]
    return data, []


def _environment_rows(environment: dict) -> pd.DataFrame:
    """Flatten the environment record: ``packages`` become one row per package."""

    def text(value: object) -> str:
        if value is None:
            return "n/a"  # e.g. a package that is not installed, or no git checkout
        return value if isinstance(value, str) else json.dumps(value)

    rows: list[tuple[str, str]] = []
    for key, value in environment.items():
        if isinstance(value, dict):
            rows += [(f"{key}: {name}", text(version)) for name, version in value.items()]
        else:
            rows.append((str(key), text(value)))
    return pd.DataFrame(rows, columns=["item", "value"])


def _format_generic(frame: pd.DataFrame) -> pd.DataFrame:
    """Floats to four significant digits; everything else as text."""
    return frame.apply(
        lambda column: (
            column.map(lambda v: "" if pd.isna(v) else format(v, ".4g"))
            if pd.api.types.is_float_dtype(column)
            else column.map(lambda v: "" if pd.isna(v) else str(v))
        )
    )


ANALYSIS_GLOSSARY = [
    "How to read the columns (LoRA paper §7; ΔW is a weight update, W the pretrained weight):",
    "",
    "- **spectrum** rows, one per layer of the full-finetune update ΔW = W_full − W: "
    "`fro_norm` ‖ΔW‖, `relative_update` ‖ΔW‖/‖W‖, `sigma1`, `sigma2` its largest singular "
    "values, `sigma1_over_sigma2` how much one direction dominates, `effective_rank` "
    "exp(entropy of the normalised singular values): 1 for a rank-1 update, the full rank for "
    "a flat spectrum; `rank90`/`rank99` the singular values that hold 90%/99% of ‖ΔW‖².",
    "- **lora_vs_full** rows, one per adapter and layer: `proj_top1` / `proj_top_r` the share "
    "of the full update's energy in the adapter's top-1 / top-r directions (`k_top_r` = r); "
    "1 means LoRA found the full update's subspace. `relative_error` ‖ΔW_lora − ΔW_full‖ / "
    "‖ΔW_full‖, `norm_ratio` ‖ΔW_lora‖/‖ΔW_full‖. `amplification` (§7.3) "
    "‖ΔW_lora‖ / ‖U_rᵀ W V_r‖: how strongly the adapter amplifies directions that W itself "
    "barely uses (large: features W under-emphasises; ~1: directions W already has).",
    "- **subspace** rows, one per pair of adapters and layer: φ(i, j) (§7.2) is the "
    "normalised overlap, in [0, 1], of the top-i right singular directions of one adapter's A "
    "with the top-j of the other's: `phi_top1` φ(1,1), `phi_full` φ(m,m) for the whole smaller "
    "subspace (m = `grid_size`), `phi_mean` the grid's mean. 1: the same subspace; near 0: "
    "unrelated directions.",
]


def analysis_section(study: Path) -> list[str]:
    """Figures and table written by ``lora_lab.analysis``, when present."""
    images = sorted(study.glob("analysis_*.png"))
    table_path = study / "analysis.csv"
    if not images and not table_path.is_file():
        return []
    lines = ["## Analysis", ""]
    for image in images:
        title = image.stem.removeprefix("analysis_").replace("_", " ")
        lines += [f"### {title}", "", f"![{title}]({image.name})", ""]
    if table_path.is_file():
        try:
            table = pd.read_csv(table_path)
        except (OSError, ValueError) as error:
            return [*lines, f"_`analysis.csv` could not be read: {error}_", ""]
        lines += ["### analysis.csv", "", *ANALYSIS_GLOSSARY, ""]
        if "kind" in table.columns:
            # One sub-table per kind, each with only the columns that kind fills in.
            for kind, group in table.groupby("kind", sort=False):
                group = group.drop(columns="kind").dropna(axis=1, how="all")
                lines += [f"#### {kind}", "", markdown_table(_format_generic(group), ANALYSIS_ROWS)]
        else:
            lines.append(markdown_table(_format_generic(table), ANALYSIS_ROWS))
    return lines


def config_section(study: Path) -> list[str]:
    """The resolved Hydra config, verbatim, folded away."""
    path = study / ".hydra" / "config.yaml"
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    return [
        "## Resolved config",
        "",
        "<details><summary><code>.hydra/config.yaml</code></summary>",
        "",
        _fenced(text, "yaml"),
        "</details>",
        "",
    ]


def command_and_environment(info: dict) -> list[str]:
    """The command that ran the study and its environment, from `study.json`."""
    lines: list[str] = []
    command = info.get("command")
    if command:
        text = " ".join(map(str, command)) if isinstance(command, list) else str(command)
        lines += ["## Command", "", _fenced(text, "bash")]
    if isinstance(info.get("environment"), dict) and info["environment"]:
        lines += ["## Environment", "", markdown_table(_environment_rows(info["environment"]))]
    return lines
