"""LoRA layer cost against HF PEFT and the base model, measured side by side in one run.

1. Train step time (forward + backward + Adam), lora_lab / PEFT, on an MLP
   784→1024→1024→1024→10, batch 256, r=8 on every Linear. Target <= 1.00.
2. Merged forward (`unload_lora`) / base model forward, no grad, same MLP. Target <= 1.02.
3. Peak training memory above the post-import baseline, LoRA / full finetune, on a ~108M
   parameter MLP 784→10000→10000→10 with Adam. Target <= 0.28 and lora_lab <= PEFT.

Timings interleave the two contenders (alternating ABBA order, after a warm-up) and compare
medians, because the 2-core machine is shared and noisy; the median of back-to-back pair
ratios is printed beside each figure as a check. Each memory case runs in its own subprocess (`--case NAME`) and
reports peak RSS (getrusage ru_maxrss) minus the RSS right after its imports and a one-step
warm-up on a tiny model. The script prints PASS/FAIL per line and exits 0 unless a case crashes.

Usage: python bench/lora_layers.py [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from lora_lab.interop import import_peft  # noqa: E402
from lora_lab.lora import LoRAConfig, inject_lora, lora_parameters, unload_lora  # noqa: E402

RANK, ALPHA = 8, 16
SPEED_DIMS = (784, 1024, 1024, 1024, 10)
MEMORY_DIMS = (784, 10000, 10000, 10)
MEMORY_CASES = ("full", "lora", "peft")


def mlp(dims: tuple[int, ...], seed: int = 0) -> nn.Sequential:
    """Linear layers with ReLU between; the Linear modules are named "0", "2", "4", ..."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
        if index:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def with_lora_lab(model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    inject_lora(model, LoRAConfig(rank=RANK, alpha=ALPHA, target_modules="all-linear"))
    return model, lora_parameters(model)


def with_peft(model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    peft = import_peft()

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=linear_names(model))
    wrapped = peft.get_peft_model(model, config)
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad]


def train_step(
    model: nn.Module, params: list[nn.Parameter], batch: int, in_features: int
) -> Callable[[], None]:
    """A closure doing one forward + backward + Adam step on a fixed random batch."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, in_features, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    optimizer = torch.optim.Adam(params, lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()

    return step


def interleaved(
    first: Callable[[], object], second: Callable[[], object], repeats: int, warmup: int = 5
) -> tuple[float, float, float]:
    """Time two callables alternately (ABBA...) after a warm-up.

    Returns:
        (median seconds of `first`, median seconds of `second`, median of the per-pair ratios
        first/second). The ratio of the medians is the reported figure; the pair-ratio median
        (runs made back to back) is printed beside it as a check against swings in load.
    """
    for _ in range(warmup):
        first()
        second()
    times: tuple[list[float], list[float]] = ([], [])
    gc.disable()  # a collection landing in one contender's timing is pure noise
    try:
        for index in range(repeats):
            order = (0, 1) if index % 2 == 0 else (1, 0)
            for which in order:
                function = first if which == 0 else second
                start = time.perf_counter()
                function()
                times[which].append(time.perf_counter() - start)
    finally:
        gc.enable()
    ratios = [a / b for a, b in zip(*times, strict=True)]
    return statistics.median(times[0]), statistics.median(times[1]), statistics.median(ratios)


def verdict(label: str, value: float, target: float, detail: str) -> str:
    status = "PASS" if value <= target else "FAIL"
    return f"{label}: {value:.3f}  (target <= {target:.2f})  {status}  [{detail}]"


def bench_step_time(repeats: int) -> str:
    base = mlp(SPEED_DIMS)
    ours = train_step(*with_lora_lab(copy.deepcopy(base)), batch=256, in_features=SPEED_DIMS[0])
    theirs = train_step(*with_peft(copy.deepcopy(base)), batch=256, in_features=SPEED_DIMS[0])
    ours_s, theirs_s, pair_ratio = interleaved(ours, theirs, repeats)
    detail = (
        f"medians of {repeats}: lora_lab {ours_s * 1e3:.2f} ms, PEFT {theirs_s * 1e3:.2f} ms; "
        f"median pair ratio {pair_ratio:.3f}"
    )
    return verdict("train step time, lora_lab / PEFT", ours_s / theirs_s, 1.00, detail)


def bench_merged_forward(repeats: int) -> str:
    base = mlp(SPEED_DIMS)
    adapted, params = with_lora_lab(copy.deepcopy(base))
    with torch.no_grad():  # a trained adapter: merging must really change the weights
        for param in params:
            param.normal_(0, 0.02)
    merged = unload_lora(adapted).eval()
    base.eval().requires_grad_(False)  # both as served: eval mode, frozen (merged is frozen)
    inputs = torch.randn(256, SPEED_DIMS[0], generator=torch.Generator().manual_seed(1))

    def forward(model: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return model(inputs)

        return run

    merged_s, base_s, pair_ratio = interleaved(forward(merged), forward(base), repeats * 3)
    detail = (
        f"medians of {repeats * 3}: merged {merged_s * 1e3:.2f} ms, base {base_s * 1e3:.2f} ms; "
        f"median pair ratio {pair_ratio:.3f}"
    )
    return verdict("merged forward / base forward", merged_s / base_s, 1.02, detail)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def prepare(case: str, model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    if case == "full":
        return model, list(model.parameters())
    return with_lora_lab(model) if case == "lora" else with_peft(model)


def run_memory_case(case: str) -> None:
    """Child process: train a few Adam steps and print peak RSS growth over the import baseline."""
    import_peft()  # every case imports the same libraries before the baseline

    # One step on a tiny model first, so lazily paged-in library code and allocator set-up land
    # in the baseline of every case alike instead of being counted as training memory.
    train_step(*prepare(case, mlp((MEMORY_DIMS[0], 16, 10))), batch=4, in_features=MEMORY_DIMS[0])()
    gc.collect()
    baseline = current_rss_bytes()
    step = train_step(*prepare(case, mlp(MEMORY_DIMS)), batch=64, in_features=MEMORY_DIMS[0])
    for _ in range(3):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"case": case, "bytes": peak - baseline}))


def memory_case(case: str) -> int:
    result = subprocess.run(
        [sys.executable, __file__, "--case", case], check=True, capture_output=True, text=True
    )
    return int(json.loads(result.stdout.strip().splitlines()[-1])["bytes"])


def bench_memory() -> list[str]:
    used = {case: memory_case(case) for case in MEMORY_CASES}
    mib = {case: value / 2**20 for case, value in used.items()}
    ratio = used["lora"] / used["full"]
    lines = [
        verdict(
            "peak training memory, LoRA / full finetune",
            ratio,
            0.28,
            f"lora_lab {mib['lora']:.0f} MiB, full {mib['full']:.0f} MiB, "
            f"PEFT {mib['peft']:.0f} MiB ({used['peft'] / used['full']:.3f} of full)",
        )
    ]
    versus = used["lora"] / used["peft"]
    lines.append(
        verdict("peak training memory, lora_lab / PEFT", versus, 1.00, "must not exceed PEFT")
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40, help="timed steps per contender")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--case", choices=MEMORY_CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        run_memory_case(args.case)
        return
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, r={RANK}, "
        f"load average {load:.1f} on {os.cpu_count()} CPUs"
    )
    if load > 0.5 * (os.cpu_count() or 1):
        print("note: other processes are using the CPU; timing ratios are noisy, rerun when idle")
    started = time.perf_counter()
    print(bench_step_time(args.repeats), flush=True)
    print(bench_merged_forward(args.repeats), flush=True)
    for line in bench_memory():
        print(line, flush=True)
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
