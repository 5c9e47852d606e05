"""Reporting layer: seaborn plots and a Markdown report drawn from a study's results files.

Depends on nothing else in ``lora_lab`` (no torch, Lightning or Hydra): it reads
``results.csv`` and friends, so it can report on any finished (or partly failed) study.
"""

from lora_lab.report.markdown import summary_table, write_report
from lora_lab.report.plots import (
    plot_accuracy_vs_params,
    plot_accuracy_vs_rank,
    plot_curves,
    plot_per_class,
)

__all__ = [
    "plot_accuracy_vs_params",
    "plot_accuracy_vs_rank",
    "plot_curves",
    "plot_per_class",
    "summary_table",
    "write_report",
]
