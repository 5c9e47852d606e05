"""Whole-study wall time: lora_lab's `lora-lab sweep`, sequential and fused, against the
straightforward reference.

All run the seed-shaped budget on the real Fashion-MNIST: 784-64-64-10 MLP, Adam lr 2e-4,
batch 1024, 5 pretrain epochs, 5 full-finetune epochs, LoRA ranks 1–64 × 5 epochs. Each runs
in its own subprocess of this one, one after the other, timed by wall clock (imports included).
Prints the accuracy tables and the ratios: sequential (`sweep.fused=false`) / reference, the
default path (fused) / reference (target ≤ 0.10, moonshot ≤ 0.05), and the LoRA stage alone,
fused / sequential (target ≤ 0.35, timed from the full-finetune result to the last LoRA
result). Then both sweeps run the other seeds (untimed) and the per-rank mean accuracies over
all seeds are compared (within 0.5 points).

Usage: python bench/study.py [--epochs N] [--ranks 1,2,4,...] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from _compare import print_mean_gap  # bench/ is the script's folder

HERE = Path(__file__).resolve().parent
FASHION = Path("/usr/share/datasets/fashion-mnist")


STARTED: dict[str, float] = {}  # output folder -> wall-clock start of its command


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    out = next((a.removeprefix("output_dir=") for a in cmd if a.startswith("output_dir=")), "")
    STARTED[out] = time.time()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    STARTED[out + ":end"] = time.time()
    return time.perf_counter() - start


def phases(study: Path) -> str:
    """Where a study's wall time went, from its files' times: start-up (imports, config,
    planning), pretrain, full finetune, the LoRA stage, the report, and the exit."""
    marks = [
        ("start-up", study / "study.json"),
        ("pretrain", study / "runs" / "pretrain" / "result.json"),
        ("full finetune", study / "runs" / "full_finetune" / "result.json"),
        ("LoRA", max((study / "runs").glob("lora_*/result.json"), key=lambda p: p.stat().st_mtime)),
        ("report", study / "report.md"),
    ]
    last, parts = STARTED[str(study)], []
    for name, path in marks:
        now = path.stat().st_mtime
        parts.append(f"{name} {now - last:.1f} s")
        last = now
    parts.append(f"exit {STARTED[str(study) + ':end'] - last:.1f} s")
    return ", ".join(parts)


def lora_stage_seconds(study: Path) -> float:
    """From the full-finetune result to the last LoRA result written (file times)."""
    start = (study / "runs" / "full_finetune" / "result.json").stat().st_mtime
    ends = [p.stat().st_mtime for p in (study / "runs").glob("lora_*/result.json")]
    return max(ends) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--ranks", default="1,2,4,8,16,32,64")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the accuracy comparison")
    args = parser.parse_args()
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"bench/study.py needs Fashion-MNIST in {FASHION} (make data)")
    seeds = args.seeds.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        raw = tmp_path / "tv" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for name in os.listdir(FASHION):  # torchvision reads the uncompressed IDX files
            with (
                gzip.open(FASHION / name) as src,
                open(raw / name.removesuffix(".gz"), "wb") as dst,
            ):
                shutil.copyfileobj(src, dst)
        study_args = [
            "experiment=mnist_seed",
            "data=fashion_mnist",
            f"sweep.ranks=[{args.ranks}]",
            "trainer.enable_progress_bar=false",
            *(
                f"stages.{s}.max_epochs={args.epochs}"
                for s in ("pretrain", "full_finetune", "lora")
            ),
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
        fused_cmd = [sys.executable, "-m", "lora_lab.cli", "sweep", *study_args]  # the default
        cli = [*fused_cmd, "sweep.fused=false"]

        def run(cmd: list[str], out: Path, run_seeds: list[str]) -> float:
            return timed([*cmd, f"output_dir={out}", f"sweep.seeds=[{','.join(run_seeds)}]"])

        # Warm the decoded-data cache once, as any later study would find it (not timed).
        warm = [a for a in cli if not a.startswith(("sweep.ranks=", "stages."))]
        subprocess.run(
            [*warm, "sweep.ranks=[1]", "trainer=debug", f"output_dir={tmp_path / 'warm'}"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        seconds = {
            "sequential": run(cli, tmp_path / "sequential", seeds[:1]),
            "fused": run(fused_cmd, tmp_path / "fused", seeds[:1]),
        }
        stage = {name: lora_stage_seconds(tmp_path / name) for name in seconds}
        ref_json = tmp_path / "reference.json"
        seconds["reference"] = timed(
            [
                sys.executable,
                str(HERE / "_reference_study.py"),
                str(tmp_path / "tv"),
                str(ref_json),
                str(args.epochs),
                args.ranks,
            ]
        )
        columns = ["stage", "rank", "seed", "test_acc"]
        tables = {
            name: pd.read_csv(tmp_path / name / "results.csv")[columns]
            for name in ("sequential", "fused")
        }
        reference = pd.DataFrame(json.loads(ref_json.read_text())["rows"])
        lora = {name: table[table.stage == "lora"] for name, table in tables.items()}
        if seeds[1:]:  # the other seeds, for the accuracy comparison only
            for name, cmd in (("sequential", cli), ("fused", fused_cmd)):
                run(cmd, tmp_path / f"{name}_more", seeds[1:])
                more = pd.read_csv(tmp_path / f"{name}_more" / "results.csv")[columns]
                lora[name] = pd.concat([lora[name], more[more.stage == "lora"]])
        for name in ("sequential", "fused"):
            print(f"{name}: {phases(tmp_path / name)}")
    report(tables, lora, reference, seconds, stage, seeds)


def report(
    tables: dict[str, pd.DataFrame],
    lora: dict[str, pd.DataFrame],
    reference: pd.DataFrame,
    seconds: dict[str, float],
    stage: dict[str, float],
    seeds: list[str],
) -> None:
    """Print the accuracy tables, the wall times and the ratios against their targets."""
    # rank is empty for pretrain/full_finetune: key rows by stage and a filled-in rank
    keyed = {
        name: t.assign(rank=t["rank"].fillna(0).astype(int)).set_index(["stage", "rank"]).test_acc
        for name, t in {**tables, "reference": reference}.items()
    }
    table = pd.DataFrame({f"test_acc_{name}": column for name, column in keyed.items()})
    table = table.reset_index().astype({"rank": str}).replace({"rank": {"0": ""}})
    print(f"test accuracy, seed {seeds[0]}:")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    worse = (table.test_acc_sequential < table.test_acc_reference - 0.005).sum()

    def verdict(ratio: float, target: float) -> str:
        return f"{ratio:.3f}  (target ≤ {target:.2f})  {'PASS' if ratio <= target else 'FAIL'}"

    print(
        f"\nwall time: sequential {seconds['sequential']:.1f} s, fused {seconds['fused']:.1f} s, "
        f"reference {seconds['reference']:.1f} s"
    )
    print(f"ratio sequential / reference = {seconds['sequential'] / seconds['reference']:.3f}")
    print(
        f"ratio default (fused) / reference = {verdict(seconds['fused'] / seconds['reference'], 0.10)}"
        "  (moonshot ≤ 0.05)"
    )
    print(
        f"LoRA stage: sequential {stage['sequential']:.1f} s, fused {stage['fused']:.1f} s; "
        f"ratio fused / sequential = {verdict(stage['fused'] / stage['sequential'], 0.35)}"
    )
    print(
        f"mean test_acc: sequential {table.test_acc_sequential.mean():.4f}, "
        f"reference {table.test_acc_reference.mean():.4f}; "
        f"sequential rows more than 0.5 points worse than the reference: {worse}"
    )
    means = pd.DataFrame(
        {
            f"{statistic}_{name}": t.groupby(t["rank"].astype(int)).test_acc.agg(statistic)
            for name, t in lora.items()
            for statistic in ("mean", "count")
        }
    )
    print_mean_gap(means, "mean_fused", "mean_sequential", ",".join(seeds))


if __name__ == "__main__":
    main()
