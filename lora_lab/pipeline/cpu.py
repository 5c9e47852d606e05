"""Speed on small CPUs for fused passes: the thread count of their steps, and malloc's
habits with their many medium-sized activations. Speed only: neither changes a result."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class ThreadChooser(Callback):
    """Picks intra-op threads for the training steps of a CPU pass: torch's count, or one.

    On a small machine shared with other jobs, a fused step (hundreds of small ops) ran 3-20x
    slower with two threads whenever another process held the second core, since every op
    waits at the thread pool's barrier; on a free machine two threads are ~1.4x faster. So each
    epoch starts by timing a few steps with each, keeps the faster, and drops to one thread if
    a later step takes over twice the timed step. Speed only: MKL gave bit-identical GEMMs.
    """

    TRIAL = 4  # steps per candidate; the first is not timed (warm-up)

    def __init__(self) -> None:
        self.candidates = [torch.get_num_threads(), 1]
        self.step_seconds = [math.inf, math.inf]
        self.start = self.last = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now, elapsed = time.perf_counter(), time.perf_counter() - self.last
        self.last = now
        if batch_idx == 0:  # the budget this epoch starts with (see threads.ThreadBudget)
            self.candidates[0] = torch.get_num_threads()
        if self.candidates[0] == 1 or pl_module.device.type != "cpu":
            return
        phase, offset = divmod(batch_idx, self.TRIAL)
        if phase <= 2 and offset == 0:
            if phase > 0:
                self.step_seconds[phase - 1] = (now - self.start) / (self.TRIAL - 1)
            fastest = self.step_seconds.index(min(self.step_seconds))
            torch.set_num_threads(self.candidates[phase if phase < 2 else fastest])
        elif phase < 2 and offset == 1:
            self.start = now
        elif phase >= 2 and torch.get_num_threads() > 1 and elapsed > 2 * self.step_seconds[0]:
            torch.set_num_threads(1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.set_num_threads(self.candidates[0])


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back at once.

    A fused step on the CPU allocates and frees activations of `[K, B, width]` (~2 MB each)
    dozens of times. With glibc's defaults such blocks are mmapped, or the heap top trimmed, so
    every step faults their pages in again; on the 2-core VM this was 15-45 % of a step. A 32 MB
    mmap threshold and a 256 MB trim threshold keep the memory in the heap. Process-wide and
    lasting; returns False where there is no glibc `mallopt`.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))
