"""Grow a study once its planned runs are done: grid steps past an edge choice
(`sweep.lr_extend`), then, with `sweep.seeds=auto`, seed rounds until the verdict is settled
(what to add is `rounds`' decision, on the results so far).

Each round adds runs and trains them as the plan's runs train (LoRA runs fused): a grid step
trains its configuration at the new learning rate for every seed it has; a seed round trains
the new seed for the full finetune (the baseline of every gap) and for each open rank, at every
learning rate each has, so every learning rate of a configuration keeps the same seeds and the
choice on validation compares like with like.

Grid steps come first, and are looked for again before every seed round: the learning-rate
choice decides which runs the verdict compares, so a seed spent at a choice about to move is
spent on a gap that changes; and a new seed can move a choice to an edge, which the next round
then extends. One seed a round: seeds never share a fused pass (each draws its own batch
order), so k seeds at once would cost k passes anyway, and one at a time stops as soon as the
answer is settled. Decisions read only the results on disk, so an interrupted study, run
again, takes the same rounds and skips every run that finished.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from lora_lab.pipeline.console import say
from lora_lab.pipeline.plan import AUTO, PlannedRun, variant
from lora_lab.pipeline.progress import Progress
from lora_lab.pipeline.rounds import Key, grid_extensions, seed_round
from lora_lab.report.selection import CONFIG_KEYS, chosen_learning_rates, config_keys
from lora_lab.results import DIVERGED, find_results, normalize_results, results_frame

DEFAULT_MAX_SEEDS = 10


def study_frame(study_dir: Path, runs: list[PlannedRun]) -> pd.DataFrame:
    """The results of the study's planned runs (normalised); others in the folder are left out."""
    records, _ = find_results(study_dir)
    wanted = {run.run_id: run.identity for run in runs}
    mine = [r for r in records if wanted.get(r.get("run_id"), "") == r.get("identity")]
    return normalize_results(results_frame(mine)) if mine else pd.DataFrame()


def configurations(frame: pd.DataFrame, runs: list[PlannedRun]) -> dict[Key, list[PlannedRun]]:
    """The planned runs of each configuration (stage, method, rank, alpha) with a result."""
    by_id = {run.run_id: run for run in runs}
    trained = frame[frame["stage"].isin(["full_finetune", "lora"])]
    keys = config_keys(trained)
    groups: dict[Key, list[PlannedRun]] = {}
    for index, run_id in trained["run_id"].items():
        key = tuple(keys.loc[index, c] for c in CONFIG_KEYS)
        groups.setdefault(key, []).append(by_id[run_id])
    return groups


def _who(run: PlannedRun) -> str:
    """`full finetune`, `lora rank=8`, `lora rank=8 dora alpha=16`: a configuration's name."""
    if run.stage != "lora":
        return "full finetune"
    swept = f" {run.method}" if run.method is not None else ""
    return f"lora rank={run.rank}{swept}" + (f" alpha={run.alpha:g}" if run.alpha else "")


def _grid_steps(cfg: DictConfig, frame: pd.DataFrame, runs: list[PlannedRun]) -> list[PlannedRun]:
    """The runs of this round's grid steps (each said in one line)."""
    lr_extend = int(cfg.sweep.get("lr_extend") or 0)
    if not lr_extend:
        return []
    groups = configurations(frame, runs)
    lora_grid = [float(v) for v in cfg.sweep.get("learning_rates") or []]
    full_grid = [float(v) for v in cfg.stages.full_finetune.get("learning_rates") or []]
    configured = {key: full_grid if key[0] == "full_finetune" else lora_grid for key in groups}
    tried = {key: {run.learning_rate for run in group} for key, group in groups.items()}
    added = []
    for step in grid_extensions(chosen_learning_rates(frame), tried, configured, lr_extend):
        group = groups[step.key]
        say(step.line(_who(group[0]), lr_extend))
        for seed in sorted({run.seed for run in group}):
            added.append(variant(cfg, group[0], runs[0], seed, step.learning_rate))
    return added


def _seed_round(cfg: DictConfig, frame: pd.DataFrame, runs: list[PlannedRun]) -> list[PlannedRun]:
    """The runs of the next seed, if `sweep.seeds=auto` asks for one (said in one line)."""
    seeds = sorted({run.seed for run in runs if run.stage == "full_finetune"})
    max_seeds = int(cfg.report.get("max_seeds", DEFAULT_MAX_SEEDS))
    decision = seed_round(frame, float(cfg.report.tolerance), seeds, max_seeds)
    say(decision.line())
    if decision.next_seed is None:
        return []
    status = dict(zip(frame["run_id"], frame["status"], strict=True))
    added = []
    for key, group in configurations(frame, runs).items():
        template = group[0]
        if key[0] == "lora" and (key[1], template.rank) not in decision.waiting:
            continue
        for learning_rate in dict.fromkeys(run.learning_rate for run in group):
            at_lr = [run for run in group if run.learning_rate == learning_rate]
            if all(status.get(run.run_id) == DIVERGED for run in at_lr):
                continue  # every seed of it diverged: it is never chosen, a new seed is waste
            added.append(variant(cfg, template, runs[0], decision.next_seed, learning_rate))
    return added


def grow(cfg: DictConfig, progress: Progress, train: Callable[[list[int]], None]) -> None:
    """Add rounds of runs to a study whose planned runs are done, until none is asked for.

    Args:
        cfg: The composed study config.
        progress: The study's progress; its `runs` are the plan so far (pretrain first).
        train: Trains the runs at the given positions of `progress.runs` (as the plan's).
    """
    auto = cfg.sweep.seeds == AUTO
    if not auto and not cfg.sweep.get("lr_extend"):
        return
    while True:
        frame = study_frame(progress.study_dir, progress.runs)
        if frame.empty:
            return
        added = _grid_steps(cfg, frame, progress.runs)
        if not added and auto:
            added = _seed_round(cfg, frame, progress.runs)
        if not added:
            return
        train(progress.skip_finished(progress.add(added)))
