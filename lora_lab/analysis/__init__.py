"""Weight-update spectra and subspace similarity (LoRA paper, Hu et al. 2021, §7).

Built on the core: runs and their identity come from `result.json` (`lora_lab.results`),
adapters are read and ΔW computed by `lora_lab.lora`, networks are built from the recorded
model config. `spectra` holds the maths on tensors, `analyze_study` turns a study folder into
`analysis.csv` and figures.
"""

from lora_lab.analysis.adapters import AdapterRun, LayerUpdate, load_adapter_run
from lora_lab.analysis.runs import StudyRun, StudyRuns, find_runs
from lora_lab.analysis.spectra import (
    amplification_factor,
    effective_rank,
    energy_rank,
    projection_fraction,
    relative_error,
    right_singular_vectors,
    share_in_subspace,
    similarity_grid_from_bases,
    singular_values,
    subspace_similarity,
    subspace_similarity_grid,
)
from lora_lab.analysis.study import ANALYSIS_CSV, analyze_study

__all__ = [
    "ANALYSIS_CSV",
    "AdapterRun",
    "LayerUpdate",
    "StudyRun",
    "StudyRuns",
    "amplification_factor",
    "analyze_study",
    "effective_rank",
    "energy_rank",
    "find_runs",
    "load_adapter_run",
    "projection_fraction",
    "relative_error",
    "right_singular_vectors",
    "share_in_subspace",
    "similarity_grid_from_bases",
    "singular_values",
    "subspace_similarity",
    "subspace_similarity_grid",
]
