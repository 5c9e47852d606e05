"""Weight-update spectra and subspace similarity (LoRA paper, Hu et al. 2021, §7).

Plain torch + pandas + seaborn; no Lightning or Hydra. `spectra` holds the maths on tensors,
`analyze_study` turns a study folder into `analysis.csv` and figures.
"""

from lora_lab.analysis.readers import Adapter, LoraFactors, load_adapter, load_adapters
from lora_lab.analysis.spectra import (
    amplification_factor,
    effective_rank,
    energy_rank,
    lora_delta,
    lora_svd,
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
    "Adapter",
    "LoraFactors",
    "amplification_factor",
    "analyze_study",
    "effective_rank",
    "energy_rank",
    "load_adapter",
    "load_adapters",
    "lora_delta",
    "lora_svd",
    "projection_fraction",
    "relative_error",
    "right_singular_vectors",
    "share_in_subspace",
    "similarity_grid_from_bases",
    "singular_values",
    "subspace_similarity",
    "subspace_similarity_grid",
]
