"""Reporting layer: seaborn plots and a Markdown report drawn from a study's results files.

It imports only the result type (``lora_lab.results``), the shared figure style
(``lora_lab.plotting``) and the atomic writer, and no torch, Lightning or Hydra (import-linter
checks both): it reads ``results.csv`` and friends, so it can report on any finished (or partly
failed) study.
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
