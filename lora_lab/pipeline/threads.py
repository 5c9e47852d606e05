"""How many torch threads a training process uses: its CPUs shared among the jobs it knows of.

Two processes that each run one torch thread per core on the same cores slow each other down
far more than twofold (measured: 27x for two `lora-lab train` runs on 2 cores), since every
parallel op waits at its thread pool's barrier for a thread the other process holds. So each
process takes `CPUs it may use // jobs at once`. Its CPUs are its affinity mask, capped by
SLURM's cpus-per-task and by `OMP_NUM_THREADS` where set (Ray sets it per task). The jobs at once
are the most of:
- the workers of the sweep's own pool (`sweep.jobs`, passed to each worker) and the joblib
  launcher's `n_jobs`, which the config says;
- the lora_lab processes training on this machine right now, which hold a lock on a file in a
  shared folder while they train (`TrainingRegistry`); this covers independent commands, a
  second user on the node, and launchers that say nothing.

`threads=N` fixes the count. `ThreadBudget` re-checks during training, so a run that started
alone gives a core back when a second one starts, and takes it again when that one ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

# /tmp rather than $TMPDIR, which SLURM may set per job: jobs on one node must see each other.
REGISTRY_DIR = (Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())) / (
    "lora-lab-training"
)
# Set in each worker of the sweep's process pool to the number of workers (parallel.py).
POOL_ENV = "LORA_LAB_POOL_JOBS"


def cpu_budget() -> int:
    """The CPUs this process may use: its affinity mask, capped by SLURM's cpus-per-task."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        cpus = os.cpu_count() or 1
    for variable in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 0:
            cpus = min(cpus, int(value))
    return max(1, cpus)


def launcher_jobs() -> int:
    """The joblib launcher's `n_jobs` when this is a job of a `-m hydra/launcher=joblib` run."""
    if not HydraConfig.initialized():
        return 1
    launcher = HydraConfig.get().get("launcher") or {}
    if "joblib" not in str(launcher.get("_target_", "")):
        return 1
    n_jobs = launcher.get("n_jobs")
    # Negative (joblib's default -1: one job per CPU) says nothing about how many jobs the sweep
    # has; the registry counts those that really run.
    return n_jobs if isinstance(n_jobs, int) and n_jobs > 0 else 1


class TrainingRegistry:
    """The lora_lab processes training on this machine: one file per process in a folder every
    user may write (sticky, like /tmp), locked (`flock`) by its process while it trains. A
    lock dies with its process, so a killed run never counts, whatever its pid becomes.

    Args:
        folder: The registry folder (tests use their own).
    """

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or REGISTRY_DIR
        self.handle: int | None = None

    def _usable(self) -> bool:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        if self.folder.is_symlink():  # someone else's trap: never chmod or write through it
            return False
        with contextlib.suppress(OSError):  # another user made it
            self.folder.chmod(0o1777)
        return True

    def enter(self) -> None:
        if self.handle is not None or not self._usable():
            return
        with contextlib.suppress(OSError):
            path = self.folder / f"{os.getpid()}-{os.urandom(4).hex()}"
            handle = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o644)
            fcntl.flock(handle, fcntl.LOCK_EX)
            self.handle, self.path = handle, path

    def leave(self) -> None:
        if self.handle is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.handle)
        self.handle = None

    def count(self) -> int:
        """Processes training now (this one included); the files of dead ones are removed."""
        try:
            entries = [e for e in self.folder.iterdir() if not e.is_symlink()]
        except OSError:
            return 1
        live = 0
        for entry in entries:
            if self.handle is not None and entry == self.path:
                live += 1
                continue
            try:
                handle = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                live += 1  # held: its process is training
            except OSError:
                pass
            else:  # nobody holds it: left by a process that is gone
                with contextlib.suppress(OSError):
                    entry.unlink()
            finally:
                os.close(handle)
        return max(1, live)


def pool_jobs() -> int:
    """The workers of the sweep's process pool this process is one of (1 outside a pool)."""
    value = os.environ.get(POOL_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def threads_for(
    cfg: DictConfig | None, jobs: int = 1, registry: TrainingRegistry | None = None
) -> int:
    """Torch threads for one training process.

    Args:
        cfg: The run's config: `threads` (null: automatic) is read from it.
        jobs: Runs this sweep trains at once (its pool's workers).
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
        jobs: The workers of the sweep's pool this run is in (None: `pool_jobs()`).
        registry: The registry (tests pass their own).
        every: Batches between checks.
    """

    def __init__(
        self,
        cfg: DictConfig | None,
        jobs: int | None = None,
        registry: TrainingRegistry | None = None,
        every: int = 20,
    ) -> None:
        self.cfg, self.jobs, self.every = cfg, jobs or pool_jobs(), every
        self.registry = registry or TrainingRegistry()

    def apply(self, raise_too: bool = True) -> int:
        """Set torch's threads to the budget; mid-epoch (`raise_too=False`) only lower them,
        so a `ThreadChooser`'s pick of one thread stands until the next epoch."""
        wanted = threads_for(self.cfg, self.jobs, self.registry)
        current = torch.get_num_threads()
        if wanted < current or (raise_too and wanted > current):
            torch.set_num_threads(wanted)
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
