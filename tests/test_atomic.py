"""lora_lab._atomic: files get the umask's mode (not mkstemp's 0600); failures leave no trace."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from lora_lab._atomic import atomic_path, atomic_write_bytes, atomic_write_text


@contextmanager
def umask(value: int) -> Iterator[None]:
    """Run the block under `value`, then restore the process's umask."""
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- the helper ----------------------------------------------------------------------------


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_mode_follows_umask(tmp_path: Path, mask: int, expected: int) -> None:
    with umask(mask):
        atomic_write_text(tmp_path / "a.txt", "hello\n")
        atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01", fsync=True)
        with atomic_path(tmp_path / "c.csv") as temp:
            pd.DataFrame({"x": [1, 2]}).to_csv(temp, index=False)
        # What a plain open() gives, for comparison.
        (tmp_path / "plain.txt").write_text("plain\n")
    for name in ("a.txt", "b.bin", "c.csv", "plain.txt"):
        assert mode(tmp_path / name) == expected, name
    assert (tmp_path / "a.txt").read_text() == "hello\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert pd.read_csv(tmp_path / "c.csv")["x"].tolist() == [1, 2]
    assert names(tmp_path) == ["a.txt", "b.bin", "c.csv", "plain.txt"]


def test_overwrite_replaces_content_and_mode(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old\n")
    target.chmod(0o600)
    with umask(0o022):
        atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert mode(target) == 0o644


def test_writer_that_replaces_the_temp_file_still_gets_umask_mode(tmp_path: Path) -> None:
    """A writer doing its own mkstemp + rename onto our temp path: the mode is put back."""
    with umask(0o022), atomic_path(tmp_path / "out.bin") as temp:
        fd, own = tempfile.mkstemp(dir=tmp_path)
        os.write(fd, b"data")
        os.close(fd)
        os.replace(own, temp)
    assert mode(tmp_path / "out.bin") == 0o644
    assert (tmp_path / "out.bin").read_bytes() == b"data"
    assert names(tmp_path) == ["out.bin"]


def test_failure_leaves_target_unchanged_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as temp:
        temp.write_text("half a fi")
        raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    assert names(tmp_path) == ["out.txt"]


def test_failure_without_a_target_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "new.txt"):
        raise KeyboardInterrupt
    assert names(tmp_path) == []


def test_failed_replace_removes_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "a_folder"
    target.mkdir()
    (target / "keep").write_text("x")  # os.replace cannot put a file over a non-empty folder
    with pytest.raises(OSError):
        atomic_write_text(target, "text")
    assert names(tmp_path) == ["a_folder"]


def test_temp_names_are_unique_and_hidden_beside_the_target(tmp_path: Path) -> None:
    seen = []
    for _ in range(3):
        with atomic_path(tmp_path / "out.txt") as temp:
            assert temp.parent == tmp_path
            assert temp.name.startswith(".out.txt.") and temp.name.endswith(".tmp")
            assert temp.exists() and temp.stat().st_size == 0
            temp.write_text("x")
            seen.append(temp.name)
    assert len(set(seen)) == 3


def test_long_names_fit(tmp_path: Path) -> None:
    target = tmp_path / ("n" * 250)
    atomic_write_text(target, "ok")
    assert target.read_text() == "ok"


# --- the real writers ----------------------------------------------------------------------


def test_save_adapter_files_are_0644(tmp_path: Path) -> None:
    from lora_lab.lora import LoRAConfig, inject_lora, save_adapter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    inject_lora(model, LoRAConfig(rank=2, alpha=4))
    with umask(0o022):
        folder = save_adapter(model, tmp_path / "adapter")
    assert names(folder) == ["adapter_config.json", "adapter_model.safetensors"]
    for path in folder.iterdir():
        assert mode(path) == 0o644, path.name


def test_network_weights_file_is_0644(tmp_path: Path) -> None:
    from lora_lab.models.weights import read_weights, save_network_weights

    network = nn.Linear(4, 3)
    with umask(0o022):
        path = save_network_weights(network, tmp_path / "checkpoints" / "pretrain.safetensors")
    assert mode(path) == 0o644
    assert torch.equal(read_weights(path)["weight"], network.weight.detach())
    assert names(path.parent) == ["pretrain.safetensors"]


def test_result_json_and_results_csv_are_0644(tmp_path: Path) -> None:
    from lora_lab.pipeline.record import write_results_csv
    from lora_lab.results import RESULTS_CSV, write_result

    with umask(0o022):
        result = write_result(tmp_path / "run0", {"stage": "pretrain", "run_id": "run0"})
        write_results_csv(tmp_path)
    assert mode(result) == 0o644
    assert mode(tmp_path / RESULTS_CSV) == 0o644


def test_report_writers_are_0644(tmp_path: Path) -> None:
    from lora_lab.plotting import save_figure

    figure = Figure(figsize=(2, 2))
    figure.add_subplot().plot([0, 1], [1, 0])
    with umask(0o022):
        report = atomic_write_text(tmp_path / "report.md", "# report\n")
        png = save_figure(figure, tmp_path / "plot.png", dpi=20)
    assert mode(report) == 0o644
    assert mode(png) == 0o644
    assert png.read_bytes().startswith(b"\x89PNG")

    with pytest.raises(ValueError), atomic_path(tmp_path / "report.md") as temp:
        temp.write_text("half a report")
        raise ValueError("no")
    assert report.read_text() == "# report\n"
    assert names(tmp_path) == ["plot.png", "report.md"]


def test_analysis_writers_are_0644(tmp_path: Path) -> None:
    # `lora-lab analyze` writes analysis.csv and its PNGs through lora_lab._atomic and
    # lora_lab.plotting: a two-run study (pretrain and full finetune of one linear layer).
    from safetensors.torch import save_file

    from lora_lab.analysis import analyze_study
    from lora_lab.results import RunResult, write_result

    weight = torch.eye(3)
    for run_id, state in (("pretrain", weight), ("full_finetune", 2 * weight)):
        artefact = f"checkpoints/{run_id}.safetensors"
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
        save_file({"linear.weight": state}, tmp_path / artefact)
        record = RunResult(run_id, run_id, run_dir=f"runs/{run_id}", artefact=artefact)
        write_result(tmp_path / "runs" / run_id, record.to_record())
    with umask(0o022):
        table = analyze_study(tmp_path)
    assert [path.name for path in table.attrs["figures"]] == ["analysis_spectrum.png"]
    assert mode(tmp_path / "analysis.csv") == 0o644
    assert mode(tmp_path / "analysis_spectrum.png") == 0o644
    assert names(tmp_path) == [
        "analysis.csv", "analysis_spectrum.png", "checkpoints", "runs",
    ]  # fmt: skip


def test_data_cache_file_is_0664_under_umask_002(tmp_path: Path) -> None:
    from lora_lab.data.cache import _read_cache, _write_cache

    tensors = {
        "train_x": torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
        "train_y": torch.tensor([0, 1]),
        "test_x": torch.zeros(1, 1, 2, 2, dtype=torch.uint8),
        "test_y": torch.tensor([1]),
    }
    path = tmp_path / "cache" / "key.pt"
    with umask(0o002):
        _write_cache(path, "key", tensors)
    assert mode(path) == 0o664
    loaded = _read_cache(path, "key")
    assert loaded is not None and torch.equal(loaded["train_y"], tensors["train_y"])
    assert names(path.parent) == ["key.pt"]
