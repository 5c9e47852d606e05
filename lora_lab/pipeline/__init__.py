"""The study pipeline: plan (runs, identities, input checks) → runners (sequential, fused,
pool) → record (the one place that writes a result); `sweep` is the study's outline."""

from lora_lab.pipeline.plan import StudyError, plan
from lora_lab.pipeline.record import write_results_csv
from lora_lab.pipeline.resume import check_output_dir, check_study_dir, run_identity
from lora_lab.pipeline.run_config import STAGES, stage_config
from lora_lab.pipeline.sequential import StageRun, run_stage
from lora_lab.pipeline.sweep import run_sweep
from lora_lab.pipeline.train import train, train_preflight

__all__ = [
    "STAGES",
    "StageRun",
    "StudyError",
    "check_output_dir",
    "check_study_dir",
    "plan",
    "run_identity",
    "run_stage",
    "run_sweep",
    "stage_config",
    "train",
    "train_preflight",
    "write_results_csv",
]
