"""Scaling out: independent runs in a process pool, and a replica check for DDP training.

`sweep.jobs=N` runs the runs that only depend on the pretrain checkpoint (the full finetune
and every LoRA run not fused) N at a time, each in a spawned worker process that calls the
same `sequential.execute` as a serial sweep. The parent process decides what to skip, prints progress,
and rebuilds `results.csv` as runs finish, so the files a sweep writes do not depend on N.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.utils import setup_globals
from hydra.errors import CompactHydraException
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from lora_lab._atomic import atomic_write_text
from lora_lab.pipeline.console import LOG_FILE, log_like_the_cli, say
from lora_lab.pipeline.environment import environment
from lora_lab.pipeline.plan import PlannedRun
from lora_lab.pipeline.progress import Progress
from lora_lab.pipeline.record import failed_result, record
from lora_lab.pipeline.sequential import execute
from lora_lab.pipeline.threads import POOL_ENV
from lora_lab.results import RunResult

#: Written by `ReplicaCheck` (on rank 0) into the run folder.
REPLICAS_FILE = "replicas.json"


class JobFailed(CompactHydraException):
    """A Hydra multirun job that failed in a launcher's process (joblib, submitit, Ray).

    Raised so the launcher marks the job failed and the parent exits non-zero; being a
    compact Hydra exception, it is reported as its one-line message, without a traceback.
    """


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, e.g. a SLURM or cgroup limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """Torch intra-op threads for each of `jobs` concurrent runs: the cores split evenly.

    More threads than cores makes every parallel op wait at a thread-pool barrier while other
    processes hold the cores, which is slower than one thread each.
    """
    return max(1, (cores or available_cores()) // max(1, jobs))


def gpu_slices(gpus: Sequence[str], jobs: int) -> list[str] | None:
    """Each pool worker's CUDA_VISIBLE_DEVICES: the GPUs dealt out round-robin, e.g. GPUs
    0-3 and 2 jobs → "0,2" and "1,3" (so trainer=ddp trainer.devices=2 fits in each); None
    (all visible, shared) when there are fewer GPUs than jobs."""
    if jobs < 2 or len(gpus) < jobs:
        return None
    return [",".join(gpus[worker::jobs]) for worker in range(jobs)]


def visible_gpus() -> list[str]:
    """The CUDA device ids this process may use (none on a CPU-only machine)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [device.strip() for device in visible.split(",") if device.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


def _init_worker(
    workers: int, gpus: list[str] | None, counter: Any, log_file: Path | None = None
) -> None:
    """Set up a fresh pool worker: its thread budget (`workers` share the CPUs), its GPUs (the
    worker number, counted in shared memory, picks a slice of `gpu_slices`), Hydra's config
    resolvers, and logging to the terminal and the study's log file, as the parent has."""
    os.environ[POOL_ENV] = str(workers)  # read by threads.ThreadBudget
    torch.set_num_threads(threads_per_job(workers))
    if log_file is not None:
        log_like_the_cli(log_file)
    with counter.get_lock():
        worker, counter.value = counter.value, counter.value + 1
    if gpus:
        # Before anything touches CUDA in this process, so it sees only its own devices.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[worker % len(gpus)]
    # Run configs may still hold `${now:…}` (output_dir): its cached value travels with the
    # pickled config, but the resolver must be registered to read it.
    setup_globals()


def _execute_in_worker(run: PlannedRun, study_dir: Path, pretrained: Path) -> RunResult:
    """Pool task: one run, as a serial sweep runs it; returns its result."""
    # The worker's own environment, so result.json records the threads this run really had.
    result, _ = execute(run, study_dir, environment(), pretrained=pretrained)
    return result


def run_in_pool(
    runs: Sequence[PlannedRun],
    study_dir: Path,
    *,
    jobs: int,
    pretrained: Path,
    on_start: Callable[[int], None],
    on_crash: Callable[[int, BaseException], RunResult],
) -> Iterator[tuple[int, RunResult]]:
    """Execute independent runs `jobs` at a time in spawned worker processes.

    At most `jobs` runs are handed to the pool at once, so a run starts when it is submitted
    and `on_start` can announce it then. Workers print their own failure messages, as a serial
    sweep does. A worker that dies (killed, out of memory) fails the runs it was holding; the
    pool is rebuilt for the rest.

    Args:
        runs: Runs that need the pretrain checkpoint only, never each other.
        study_dir: The study folder.
        jobs: Runs at a time (≥ 1); each gets `threads_per_job(jobs)` torch threads and,
            with at least `jobs` GPUs, its own share of them (`gpu_slices`).
        pretrained: The pretrain checkpoint the runs start from.
        on_start: Called with a run's position in `runs` just before it is submitted.
        on_crash: Called with a run's position and the error when its worker died; returns
            the result to record for it.

    Yields:
        `(position in runs, result row)` in the order the runs finish.
    """
    workers = max(1, min(jobs, len(runs)))
    # spawn: a fresh interpreter per worker, safe whatever threads or CUDA state the parent
    # has (fork is not), and the same on Linux and macOS.
    context = multiprocessing.get_context("spawn")

    gpus = gpu_slices(visible_gpus(), workers)

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(workers, gpus, context.Value("i", 0), study_dir / LOG_FILE),
        )

    waiting = deque(enumerate(runs))
    running: dict[Future[RunResult], int] = {}
    pool = new_pool()
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                position, run = waiting.popleft()
                on_start(position)
                try:
                    future = pool.submit(_execute_in_worker, run, study_dir, pretrained)
                except BrokenProcessPool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = new_pool()
                    future = pool.submit(_execute_in_worker, run, study_dir, pretrained)
                running[future] = position
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                position = running.pop(future)
                try:
                    result = future.result()
                except Exception as error:  # the worker process died: the run failed
                    result = on_crash(position, error)
                yield position, result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_pooled(
    indices: Sequence[int], progress: Progress, env: dict[str, Any], jobs: int, pretrained: Path
) -> None:
    """The study's step: the planned runs at `indices`, `jobs` at a time (`run_in_pool`).

    Args:
        indices: Positions in the plan (`progress.runs`); the runs need only `pretrained`.
        progress: The study's progress; told as each run starts and ends.
        env: The environment recorded with a run whose worker died.
        jobs: Runs at a time.
        pretrained: The pretrain checkpoint.
    """
    if not indices:
        return
    runs = [progress.runs[i] for i in indices]
    workers = min(jobs, len(runs))
    say(
        f"sweep.jobs={jobs}: {len(runs)} run(s), up to {workers} at a time, "
        f"{threads_per_job(workers)} torch thread(s) each"
    )
    for run in runs:
        # Several progress bars cannot share one terminal line; the run headers remain.
        OmegaConf.update(run.cfg, "trainer.enable_progress_bar", False)

    def crashed(position: int, error: BaseException) -> RunResult:
        run = runs[position]
        result = failed_result(run, error)
        record(run.cfg, progress.study_dir, result, env)
        say(f"FAILED {run.label()}: {result.error}", logging.ERROR)
        return result

    finished = run_in_pool(
        runs,
        progress.study_dir,
        jobs=jobs,
        pretrained=pretrained,
        on_start=lambda position: progress.begin(indices[position]),
        on_crash=crashed,
    )
    for position, result in finished:
        progress.end(indices[position], result)


def parameter_digest(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of tensors' names, shapes, dtypes and values, in name order (64 hex digits)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def trainable_digest(module: torch.nn.Module) -> str:
    """`parameter_digest` of the parameters that train (for a LoRA module: the adapters).

    Names are taken relative to the network when the module has one, so the digest of a
    trained LightningModule equals that of a network with the saved adapter loaded.
    """
    network = getattr(module, "network", module)
    return parameter_digest((n, p) for n, p in network.named_parameters() if p.requires_grad)


class ReplicaCheck(Callback):
    """At the end of training, check every DDP process holds the same trainable weights.

    Each rank hashes its trainable parameters; the hashes are gathered on all ranks (so all
    raise together on a mismatch, instead of one rank hanging in a later collective), and
    rank 0 writes them to `replicas.json` in the run folder (`default_root_dir`). DDP keeps
    replicas identical by averaging gradients, so a mismatch means a bug such as a
    rank-dependent update.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        digest = trainable_digest(pl_module)
        digests = [digest]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            digests = [""] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(digests, digest)
        if trainer.is_global_zero:
            replicas = {"world_size": len(digests), "digests": digests}
            path = Path(trainer.default_root_dir) / REPLICAS_FILE
            atomic_write_text(path, json.dumps(replicas, indent=2) + "\n", fsync=True)
        if len(set(digests)) > 1:
            raise RuntimeError(
                f"DDP replicas differ after training: trainable-weight hashes {digests}"
            )
