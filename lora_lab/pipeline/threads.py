"""How many torch threads a training process uses: its CPUs shared among the jobs it knows of.

Two processes that each run one torch thread per core on the same cores slow each other down
far more than twofold (measured: 27x for two `lora-lab train` runs on 2 cores), since every
parallel op waits at its thread pool's barrier for a thread the other process holds. So each
process takes `CPUs it may use // jobs at once`, where the jobs at once are the most of:
- `sweep.jobs` (the sweep's own pool) and the joblib launcher's `n_jobs`, which the config says;
- the lora_lab processes training on this machine right now, which register in a shared
  folder while they train (`TrainingRegistry`); this covers independent commands, a second
  user on the node, and launchers that say nothing.

`threads=N` fixes the count. `ThreadBudget` re-checks during training, so a run that started
alone gives a core back when a second one starts, and takes it again when that one ends.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

REGISTRY_DIR = Path(tempfile.gettempdir()) / "lora-lab-training"


def cpu_budget() -> int:
    """The CPUs this process may use: its affinity mask, capped by SLURM's cpus-per-task."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        cpus = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    return max(1, cpus)


def launcher_jobs() -> int:
    """The joblib launcher's `n_jobs` when this is a job of a `-m hydra/launcher=joblib` run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return 1
    launcher = HydraConfig.get().get("launcher") or {}
    if "joblib" not in str(launcher.get("_target_", "")):
        return 1
    n_jobs = launcher.get("n_jobs")
    if not isinstance(n_jobs, int) or n_jobs == 0:
        return 1
    return os.cpu_count() or 1 if n_jobs < 0 else n_jobs


class TrainingRegistry:
    """The lora_lab processes training on this machine: one file per process id in a folder
    every user may write (sticky, like /tmp), present while that process trains.

    Args:
        folder: The registry folder (tests use their own).
    """

    def __init__(self, folder: Path = REGISTRY_DIR) -> None:
        self.folder = folder

    def enter(self) -> None:
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(PermissionError):  # another user made it
                self.folder.chmod(0o1777)
            (self.folder / str(os.getpid())).touch()

    def leave(self) -> None:
        with contextlib.suppress(OSError):
            (self.folder / str(os.getpid())).unlink()

    def count(self) -> int:
        """Live registered processes, this one included; stale entries are removed."""
        live = 0
        try:
            entries = list(self.folder.iterdir())
        except OSError:
            return 1
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                os.kill(int(entry.name), 0)
            except ProcessLookupError:  # ended without leaving (killed)
                with contextlib.suppress(OSError):
                    entry.unlink()
                continue
            except PermissionError:  # another user's live process
                pass
            live += 1
        return max(1, live)


def sweep_jobs_of(cfg: DictConfig) -> int:
    """`sweep.jobs` of a run's config (1 where there is none)."""
    jobs = cfg.get("sweep", {}).get("jobs", 1)
    return jobs if isinstance(jobs, int) and jobs > 0 else 1


def threads_for(
    cfg: DictConfig | None, jobs: int = 1, registry: TrainingRegistry | None = None
) -> int:
    """Torch threads for one training process.

    Args:
        cfg: The run's config: `threads` (null: automatic) is read from it.
        jobs: Runs this sweep trains at once (`sweep.jobs`).
        registry: Where training processes register; None for the machine's.
    """
    fixed = cfg.get("threads") if cfg is not None else None
    if fixed is not None:
        return int(fixed)
    concurrent = max(jobs, launcher_jobs(), (registry or TrainingRegistry()).count())
    return max(1, cpu_budget() // concurrent)


class ThreadBudget(Callback):
    """Registers the process while it trains and keeps torch's thread count at `threads_for`,
    re-checked every `every` training batches (a directory listing: microseconds).

    Args:
        cfg: The run's config (`threads`).
        jobs: `sweep.jobs`.
        registry: The registry (tests pass their own).
        every: Batches between checks.
    """

    def __init__(
        self,
        cfg: DictConfig | None,
        jobs: int = 1,
        registry: TrainingRegistry | None = None,
        every: int = 20,
    ) -> None:
        self.cfg, self.jobs, self.every = cfg, jobs, every
        self.registry = registry or TrainingRegistry()
        self.threads = torch.get_num_threads()

    def apply(self, raise_too: bool = True) -> int:
        """Set torch's threads to the budget; mid-epoch (`raise_too=False`) only lower them,
        so a `ThreadChooser`'s pick of one thread stands until the next epoch."""
        wanted = threads_for(self.cfg, self.jobs, self.registry)
        current = torch.get_num_threads()
        if wanted < current or (raise_too and wanted > current):
            torch.set_num_threads(wanted)
        self.threads = wanted
        return wanted

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cpu":
            self.registry.enter()
            self.apply()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type == "cpu" and batch_idx % self.every == 0:
            self.apply(raise_too=batch_idx == 0)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.registry.leave()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.registry.leave()
