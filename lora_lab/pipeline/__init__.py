"""The study pipeline: stages, the sweep that chains them, and results files."""

from lora_lab.pipeline.results import COLUMNS, find_results, results_frame, write_results_csv
from lora_lab.pipeline.stages import STAGES, StageRun, run_stage, stage_config
from lora_lab.pipeline.sweep import StudyError, plan, run_sweep
from lora_lab.pipeline.train import train

__all__ = [
    "COLUMNS",
    "STAGES",
    "StageRun",
    "StudyError",
    "find_results",
    "plan",
    "results_frame",
    "run_stage",
    "run_sweep",
    "stage_config",
    "train",
    "write_results_csv",
]
