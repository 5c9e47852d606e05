"""Finding the files (root, env, Debian, download) and the decode cache, on real-format files."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from lora_lab.data import (
    CIFAR10DataModule,
    DataError,
    FashionMNISTDataModule,
    MNISTDataModule,
    cache,
    clear_memory_cache,
    sources,
)
from lora_lab.data.fakes import write_fake_cifar10, write_fake_mnist
from lora_lab.data.formats import write_idx


def _loaded(datamodule: MNISTDataModule) -> MNISTDataModule:
    datamodule.setup("fit")
    return datamodule


@pytest.mark.parametrize(
    ("folder", "gz"), [(None, True), (None, False), ("MNIST", True), ("MNIST", False)]
)
def test_mnist_layouts(tmp_path: Path, folder: str | None, gz: bool) -> None:
    directory = write_fake_mnist(tmp_path / "r", n_train=120, n_test=30, folder=folder, gz=gz)
    dm = _loaded(MNISTDataModule(root=tmp_path / "r", val_size=20))
    assert dm.source == str(directory)
    assert dm.decoded is not None and dm.decoded.located.kind == "root"
    assert (len(dm.decoded.train_y), len(dm.decoded.test_y)) == (120, 30)


def test_fashion_mnist_torchvision_layout(tmp_path: Path) -> None:
    directory = write_fake_mnist(tmp_path, n_train=50, n_test=10, folder="FashionMNIST")
    assert _loaded(FashionMNISTDataModule(root=tmp_path, val_size=5)).source == str(directory)


@pytest.mark.parametrize("torchvision_layout", [True, False])
def test_cifar_layouts(tmp_path: Path, torchvision_layout: bool) -> None:
    directory = write_fake_cifar10(
        tmp_path, n_per_batch=10, n_test=10, torchvision_layout=torchvision_layout
    )
    dm = _loaded(CIFAR10DataModule(root=tmp_path, val_size=5))
    assert dm.source == str(directory)
    assert dm.decoded is not None and dm.decoded.train_x.shape == (50, 3, 32, 32)


def test_env_var_is_searched_after_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir = write_fake_mnist(tmp_path / "env", n_train=40, n_test=10)
    monkeypatch.setenv("LORA_LAB_DATA", str(env_dir))
    assert _loaded(MNISTDataModule(val_size=5)).source == str(env_dir)
    root_dir = write_fake_mnist(tmp_path / "root", n_train=40, n_test=10, seed=1)
    assert _loaded(MNISTDataModule(root=root_dir, val_size=5)).source == str(root_dir)


def test_debian_folder_is_used_for_fashion_mnist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    debian = write_fake_mnist(tmp_path / "debian", n_train=40, n_test=10)
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", debian)
    dm = _loaded(FashionMNISTDataModule(val_size=5))
    assert dm.source == str(debian)
    assert dm.fingerprint()["source_kind"] == "debian"
    # MNIST never falls back to the Fashion-MNIST files: no silent switch of dataset.
    with pytest.raises(DataError, match="mnist: data files not found"):
        _loaded(MNISTDataModule(val_size=5))


@pytest.mark.parametrize("missing", ["empty", "nonexistent"])
def test_a_given_root_without_files_is_an_error_not_a_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    # The Debian copy is there, but the user named another folder: no silent switch.
    debian = write_fake_mnist(tmp_path / "debian", n_train=40, n_test=10)
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", debian)
    (tmp_path / "empty").mkdir()
    root = tmp_path / missing
    for check in (
        lambda: FashionMNISTDataModule(root=root).check_source(),
        lambda: _loaded(FashionMNISTDataModule(root=root, val_size=5)),
    ):
        with pytest.raises(DataError) as info:
            check()
        message = str(info.value)
        assert "\n" not in message
        assert f"data.root={str(root)!r} holds no fashion_mnist files" in message
        assert str(debian) not in message


@pytest.mark.parametrize(
    "datamodule_class", [FashionMNISTDataModule, MNISTDataModule, CIFAR10DataModule]
)
def test_missing_files_error_names_every_place(
    isolated_data_env: Path, datamodule_class: type[MNISTDataModule]
) -> None:
    with pytest.raises(DataError) as info:
        _loaded(datamodule_class(download=False))
    message = str(info.value)
    assert "\n" not in message
    assert "data files not found" in message
    assert "LORA_LAB_DATA (unset)" in message
    assert str(isolated_data_env / "downloads") in message
    assert "data.root=DIR" in message and "data.download=true" in message
    is_fashion = datamodule_class is FashionMNISTDataModule
    assert ("apt-get install dataset-fashion-mnist" in message) == is_fashion
    assert (str(sources.DEBIAN_FASHION_MNIST) in message) == is_fashion


def test_incomplete_folder_says_which_files_are_missing(tmp_path: Path) -> None:
    directory = write_fake_mnist(tmp_path, n_train=20, n_test=10)
    (directory / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte"):
        _loaded(MNISTDataModule(root=directory, val_size=5))


def test_download_goes_through_torchvision_into_the_cache(
    monkeypatch: pytest.MonkeyPatch, isolated_data_env: Path
) -> None:
    calls: list[Path] = []

    def fake_download(spec: sources.DatasetSpec, directory: Path) -> None:
        # Stands in for torchvision.datasets.MNIST(root, download=True): its raw/ layout.
        calls.append(directory)
        write_fake_mnist(directory, n_train=30, n_test=10, folder=spec.folder)

    monkeypatch.setattr(sources, "_download", fake_download)
    dm = _loaded(MNISTDataModule(download=True, val_size=5))
    assert calls == [isolated_data_env / "downloads"]
    assert dm.source == str(isolated_data_env / "downloads" / "MNIST" / "raw")
    clear_memory_cache()
    # A later run finds the downloaded files without downloading again.
    assert _loaded(MNISTDataModule(download=True, val_size=5)).source == dm.source
    assert len(calls) == 1


def test_cache_round_trip_and_invalidation(mnist_root: Path, isolated_data_env: Path) -> None:
    first = _loaded(MNISTDataModule(root=mnist_root, val_size=50))
    assert first.decoded is not None and first.decoded.origin == "decoded"
    cache_files = list((isolated_data_env / "decoded").glob("mnist-*.pt"))
    assert cache_files == [first.decoded.cache_path]
    clear_memory_cache()
    second = _loaded(MNISTDataModule(root=mnist_root, val_size=50))
    assert second.decoded is not None and second.decoded.origin == "cache hit"
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first.decoded, name), getattr(second.decoded, name))
    assert second.train_dataset is not None and first.train_dataset is not None
    assert torch.equal(second.train_dataset.inputs, first.train_dataset.inputs)

    # Replace one source file: new key, decoded again, new content seen.
    write_idx(mnist_root / "t10k-labels-idx1-ubyte.gz", torch.zeros(100, dtype=torch.uint8))
    clear_memory_cache()
    third = _loaded(MNISTDataModule(root=mnist_root, val_size=50))
    assert third.decoded is not None and third.decoded.origin == "decoded"
    assert third.decoded.key != first.decoded.key
    assert third.decoded.test_y.eq(0).all()


def test_same_files_elsewhere_share_the_cache_entry(mnist_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(mnist_root, copy, copy_function=shutil.copy2)  # copy2 keeps mtimes
    a = _loaded(MNISTDataModule(root=mnist_root, val_size=50))
    clear_memory_cache()
    b = _loaded(MNISTDataModule(root=copy, val_size=50))
    assert a.decoded is not None and b.decoded is not None
    assert b.decoded.origin == "cache hit" and b.source == str(copy)


def test_two_datamodules_share_one_decode(
    mnist_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes: list[str] = []
    real_decode = cache.decode

    def counting_decode(
        spec: sources.DatasetSpec, located: sources.Located
    ) -> dict[str, torch.Tensor]:
        decodes.append(spec.name)
        return real_decode(spec, located)

    monkeypatch.setattr(cache, "decode", counting_decode)
    pretrain = _loaded(MNISTDataModule(root=mnist_root, val_size=50, classes=[0, 1, 2, 3, 4]))
    finetune = _loaded(MNISTDataModule(root=mnist_root, val_size=50, classes=[5, 6, 7, 8, 9]))
    assert decodes == ["mnist"]
    assert finetune.decoded is not None and finetune.decoded.origin == "memory"
    assert pretrain.decoded is not None and finetune.decoded.train_x is pretrain.decoded.train_x


def test_corrupt_cache_file_is_ignored_and_rewritten(mnist_root: Path) -> None:
    first = _loaded(MNISTDataModule(root=mnist_root, val_size=50))
    assert first.decoded is not None
    first.decoded.cache_path.write_bytes(b"garbage")
    clear_memory_cache()
    again = _loaded(MNISTDataModule(root=mnist_root, val_size=50))
    assert again.decoded is not None and again.decoded.origin == "decoded"
    assert torch.equal(again.decoded.train_x, first.decoded.train_x)


def test_cache_write_leaves_no_temp_files(mnist_root: Path, isolated_data_env: Path) -> None:
    _loaded(MNISTDataModule(root=mnist_root, val_size=50))
    assert [p.name.startswith("mnist-") for p in (isolated_data_env / "decoded").iterdir()] == [
        True
    ]


def test_unwritable_cache_dir_is_named(mnist_root: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # even root cannot create folders inside a file
    with pytest.raises(
        DataError, match=rf"cache dir {blocker / 'decoded'} is not writable"
    ) as info:
        _loaded(MNISTDataModule(root=mnist_root, cache_dir=blocker, val_size=50))
    assert "data.cache_dir=DIR" in str(info.value)


def test_corrupt_source_file_is_named(mnist_root: Path) -> None:
    path = mnist_root / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: cannot read"):
        _loaded(MNISTDataModule(root=mnist_root, val_size=50))


def test_labels_images_count_mismatch_is_named(mnist_root: Path) -> None:
    write_idx(mnist_root / "train-labels-idx1-ubyte.gz", torch.zeros(599, dtype=torch.uint8))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: 599 labels for 600 images"):
        _loaded(MNISTDataModule(root=mnist_root, val_size=50))


def test_label_out_of_range_is_named(mnist_root: Path) -> None:
    write_idx(mnist_root / "t10k-labels-idx1-ubyte.gz", torch.full((100,), 12, dtype=torch.uint8))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: labels outside 0\.\.9"):
        _loaded(MNISTDataModule(root=mnist_root, val_size=50))


def test_corrupt_cifar_batch_is_named(cifar_root: Path) -> None:
    (cifar_root / "cifar-10-batches-py" / "data_batch_4").write_bytes(b"\x80\x02}q\x00(")
    with pytest.raises(DataError, match=r"data_batch_4: bad pickle"):
        _loaded(CIFAR10DataModule(root=cifar_root, val_size=5))


def test_fingerprint_describes_the_files(mnist_root: Path) -> None:
    dm = MNISTDataModule(root=mnist_root, val_size=50)
    fingerprint = dm.fingerprint()
    assert fingerprint["source"] == str(mnist_root)
    files = fingerprint["files"]
    assert isinstance(files, list) and len(files) == 4
    assert {Path(str(f["path"])).name for f in files} == {
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    }
    assert all(int(f["size"]) > 0 and len(str(f["sha1_first_mib"])) == 40 for f in files)


def test_load_logs_one_info_line(mnist_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lora_lab.data"):
        _loaded(MNISTDataModule(root=mnist_root, val_size=50))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lora_lab.data")]
    assert len(lines) == 1
    assert lines[0].startswith(f"mnist: loaded from {mnist_root} (decoded, cache written to ")
