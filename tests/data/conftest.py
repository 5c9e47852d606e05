"""Fixtures for the data tests: an isolated environment and small datasets on disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_lab.data import cache, sources
from lora_lab.data.fakes import write_fake_cifar10, write_fake_mnist

# Kept before the autouse fixture hides it, for the tests that read the real files.
_REAL_DEBIAN_FASHION_MNIST = sources.DEBIAN_FASHION_MNIST


@pytest.fixture(autouse=True)
def isolated_data_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No LORA_LAB_DATA, a private cache dir, no Debian folder, nothing in memory.

    Yields:
        The cache dir.
    """
    monkeypatch.delenv(sources.DATA_ENV, raising=False)
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(cache_dir))
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-here")

    def no_download(spec: sources.DatasetSpec, directory: Path) -> None:
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(sources, "_download", no_download)
    cache.clear_memory_cache()
    yield cache_dir
    cache.clear_memory_cache()


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    """600 train / 100 test fake MNIST-like images as gzipped IDX files directly in a folder."""
    root = tmp_path / "mnist-files"
    write_fake_mnist(root, n_train=600, n_test=100)
    return root


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    """5 × 60 train / 50 test fake CIFAR-10 images in torchvision's layout under a root."""
    root = tmp_path / "cifar-root"
    write_fake_cifar10(root, n_per_batch=60, n_test=50)
    return root


@pytest.fixture
def real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Debian's real Fashion-MNIST folder, searched again; skips when not installed."""
    if not (_REAL_DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", _REAL_DEBIAN_FASHION_MNIST)
    return _REAL_DEBIAN_FASHION_MNIST
