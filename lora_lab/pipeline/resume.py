"""What makes a sweep survive: run identities, skip/resume decisions, the study-folder check.

A run's identity is a hash of everything in its resolved config that can change its result
(stage, seed, data, model, module, trainer, LoRA settings, and for finetune runs the identity
of the pretrain run they start from). Re-running a sweep skips a run whose `result.json` says
`ok` under the same identity, resumes one that left a `last.ckpt` under the same identity, and
redoes everything else. A `diverged` result is final too: the same run would diverge again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lora_lab.results import DIVERGED, RESULT_FILE, RESULTS_CSV, SET_ASIDE, read_result

STUDY_FILE = "study.json"
CHECKPOINT_FILE = "last.ckpt"
# Beside it: the identity of the run (or pass) the checkpoint belongs to.
IDENTITY_FILE = "identity.txt"

# Keys that change how a run is shown or where it is written, never what it computes.
_COSMETIC = {
    "trainer": {"enable_progress_bar", "enable_model_summary", "log_every_n_steps"},
    "data": {"cache_dir", "num_workers", "download"},
}
# Study keys that may change between invocations into the same folder: the runs they add or
# drop are identified one by one, so e.g. adding ranks to a finished sweep just runs the new ones.
_STUDY_FREE = {
    "output_dir",
    "run_id",
    "run_dir",
    "stage",
    "pretrain_ckpt",
    "sweep.ranks",
    "sweep.seeds",
    "sweep.restart",
    "sweep.jobs",
    "sweep.fused",  # fused or not, a run's result is the same (see pipeline.fused)
    "sweep.methods",
    "sweep.learning_rates",
    "sweep.lr_extend",
    "stages.full_finetune.learning_rates",
    "threads",
    "report.tolerance",
    "report.max_seeds",
    "sweep.verify",
    "sweep.verify_tolerance",
}
# What marks a folder as lora_lab's (a sweep's study.json, the runs of `lora-lab train`, Hydra's
# record of a run or of a multirun): a non-empty folder with none of them is someone's own, which no study writes into.
STUDY_MARKS = (STUDY_FILE, "runs", ".hydra", "multirun.yaml")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def run_identity(run_cfg: DictConfig, upstream: str | None = None) -> str:
    """A 16-hex-digit hash of what determines the result of the run `run_cfg` describes.

    Args:
        run_cfg: A per-run config from `stage_config`.
        upstream: The identity of the run whose weights this one starts from (pretrain for the
            finetune stages), so a changed pretrain invalidates everything after it.
    """
    parts: dict[str, Any] = {
        "stage": run_cfg.stage,
        "seed": int(run_cfg.seed),
        "upstream": upstream,
    }
    for group in ("data", "model", "module", "trainer"):
        parts[group] = {
            k: v for k, v in _plain(run_cfg[group]).items() if k not in _COSMETIC.get(group, ())
        }
    if run_cfg.stage == "lora":
        parts["lora"] = _plain(run_cfg.lora)
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished(run_dir: Path, identity: str) -> str | None:
    """The status of the final result `run_dir` holds for a run with this identity: `ok` or
    `diverged`; None when there is none (no result, another identity, or a failed run).

    A corrupt `result.json` counts as not finished; callers report it via `describe_previous`.
    """
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = read_result(path)
    except ValueError:
        return None
    status = result.get("status")
    final = status in ("ok", DIVERGED) and result.get("identity") == identity
    return str(status) if final else None


def describe_previous(run_dir: Path) -> str | None:
    """A one-line note on why an existing `result.json` will be redone, or None if absent."""
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = read_result(path)
    except ValueError as error:
        return f"{error}; redoing the run"
    if result.get("status") != "ok":
        return f"previous attempt failed ({result.get('error', '')}); redoing the run"
    return "config changed since the previous result; redoing the run"


def resume_checkpoint(run_dir: Path, identity: str) -> Path | None:
    """The run's `last.ckpt` when it belongs to this identity (else it is stale: removed)."""
    checkpoint = run_dir / CHECKPOINT_FILE
    marker = run_dir / IDENTITY_FILE
    if not checkpoint.is_file():
        return None
    if marker.is_file() and marker.read_text().strip() == identity:
        return checkpoint
    checkpoint.unlink()
    return None


def study_config(cfg: DictConfig) -> dict[str, Any]:
    """The study's resolved config as stored in `study.json` (Hydra's own node left out)."""
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}` (an empty mapping stays a value)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two study configs (free keys ignored)."""
    flat_old, flat_new = flatten(old), flatten(new)
    keys = sorted(set(flat_old) | set(flat_new))
    return [
        key
        for key in keys
        if flat_old.get(key) != flat_new.get(key)
        and not any(key == free or key.startswith(f"{free}.") for free in _STUDY_FREE)
        and not any(
            key == f"{group}.{c}" for group, cosmetic in _COSMETIC.items() for c in cosmetic
        )
    ]


def check_output_dir(out: Path) -> None:
    """Check, without leaving anything behind, that `out` can hold a study.

    Raises:
        ValueError: one line, when `out` cannot be created or written, is a file, or is a
            non-empty folder that is not a lora_lab output folder (its files would be mixed
            with, or replaced by, the study's).
    """
    shown = str(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir={shown!r} is a file, not a folder; choose a folder")
    existing = next(p for p in [out, *out.parents] if p.exists())
    try:  # the one reliable test (root ignores permission bits; /proc refuses anyway)
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".lora-lab-probe-"):
            pass
    except OSError as error:
        raise ValueError(
            f"output_dir={shown!r} cannot be written: {str(existing)!r} does not allow creating "
            f"files ({error.strerror or error}); choose a writable folder"
        ) from None
    if out.is_dir() and not any((out / name).exists() for name in STUDY_MARKS):
        entries = sorted(entry.name for entry in out.iterdir())
        if entries:
            listed = ", ".join(entries[:5]) + (
                f" and {len(entries) - 5} more" if len(entries) > 5 else ""
            )
            raise ValueError(
                f"output_dir={shown!r} is a folder that is not a lora_lab study (it holds "
                f"{listed}); choose a new or empty folder, so nothing in it is overwritten"
            )


def check_study_dir(cfg: DictConfig, study_dir: Path) -> None:
    """Refuse to continue a study folder that holds a study with another config.

    Raises:
        ValueError: naming the keys that differ, unless `sweep.restart=true`.
    """
    path = study_dir / STUDY_FILE
    if cfg.sweep.restart or not path.is_file():
        return
    try:
        previous = json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # a study.json without a config (or unreadable) has nothing to compare with
    differences = config_differences(previous, study_config(cfg))
    if differences:
        shown = ", ".join(differences[:8]) + (
            f" and {len(differences) - 8} more" if len(differences) > 8 else ""
        )
        raise ValueError(
            f"output_dir={str(study_dir)!r} holds a study with a different config ({shown}); "
            "use another output_dir, or sweep.restart=true to redo it (old results are kept aside)"
        )


def set_aside(study_dir: Path) -> Path | None:
    """Move a previous study's files into `replaced/<time>/` so a restart loses nothing."""
    names = [
        "runs",
        "checkpoints",
        "adapters",
        "passes",
        RESULTS_CSV,
        STUDY_FILE,
        "report.md",
        "analysis.csv",
        "verify",
        "verify.json",
    ]
    present = [study_dir / n for n in names if (study_dir / n).exists()]
    present += sorted(study_dir.glob("*.png"))
    if not present:
        return None
    target = study_dir / SET_ASIDE / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    target.mkdir(parents=True)
    for item in present:
        shutil.move(str(item), target / item.name)
    return target
