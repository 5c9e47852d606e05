"""The IDX and CIFAR readers on files written in the real formats, good and damaged."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_lab.data import DataError
from lora_lab.data.formats import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    read_cifar_batch,
    read_idx,
    write_cifar_batch,
    write_idx,
)


@pytest.mark.parametrize("name", ["images-idx3-ubyte.gz", "images-idx3-ubyte"])
def test_idx_round_trip_gz_and_raw(tmp_path: Path, name: str) -> None:
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    write_idx(tmp_path / name, images)
    assert torch.equal(read_idx(tmp_path / name, IDX_IMAGES_MAGIC), images)


def test_idx_header_is_the_documented_layout(tmp_path: Path) -> None:
    write_idx(tmp_path / "labels", torch.tensor([1, 2, 3], dtype=torch.uint8))
    raw = (tmp_path / "labels").read_bytes()
    assert struct.unpack(">II", raw[:8]) == (0x00000801, 3)
    assert raw[8:] == bytes([1, 2, 3])


def test_idx_labels_read_as_uint8_vector(tmp_path: Path) -> None:
    labels = torch.arange(10, dtype=torch.uint8)
    write_idx(tmp_path / "l.gz", labels)
    assert torch.equal(read_idx(tmp_path / "l.gz", IDX_LABELS_MAGIC), labels)


def test_idx_wrong_magic_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train-labels-idx1-ubyte"
    write_idx(path, torch.zeros(4, 2, 2, dtype=torch.uint8))  # an images file where labels belong
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: wrong IDX magic 0x00000803"):
        read_idx(path, IDX_LABELS_MAGIC)


def test_idx_truncated_payload(tmp_path: Path) -> None:
    path = tmp_path / "imgs"
    write_idx(path, torch.zeros(5, 28, 28, dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"imgs: wrong length.*\[5, 28, 28\]") as info:
        read_idx(path, IDX_IMAGES_MAGIC)
    assert "\n" not in str(info.value)


def test_idx_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "imgs.gz"
    write_idx(path, torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"imgs\.gz: cannot read"):
        read_idx(path, IDX_IMAGES_MAGIC)


def test_idx_not_gzip_at_all(tmp_path: Path) -> None:
    path = tmp_path / "imgs.gz"
    path.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(DataError, match=r"imgs\.gz: cannot read, bad gzip"):
        read_idx(path, IDX_IMAGES_MAGIC)


def test_cifar_round_trip(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    write_cifar_batch(tmp_path / "data_batch_1", images, [0, 1, 2, 3, 4, 9])
    read_images, labels = read_cifar_batch(tmp_path / "data_batch_1")
    assert torch.equal(read_images, images)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 3, 4, 9]


def test_cifar_channel_major_layout(tmp_path: Path) -> None:
    # The official rows are 1024 red, then 1024 green, then 1024 blue bytes.
    data = np.zeros((1, 3072), dtype=np.uint8)
    data[0, 1024:2048] = 7
    with (tmp_path / "b").open("wb") as handle:
        pickle.dump({b"data": data, b"labels": [3]}, handle, protocol=2)
    images, _ = read_cifar_batch(tmp_path / "b")
    assert images[0, 1].eq(7).all() and images[0, 0].eq(0).all()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x80\x02}q\x00(U\x04data", "bad pickle"),  # cut off mid-stream
        (b"not a pickle", "bad pickle"),
        (pickle.dumps([1, 2, 3]), "expected a dict"),
        (pickle.dumps({b"labels": [1]}), "lack data/labels"),
        (
            pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [1, 2]}),
            r"uint8 \[N, 3072\]",
        ),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}), "2 images but 1"),
    ],
)
def test_cifar_bad_batches_name_the_file(tmp_path: Path, payload: bytes, message: str) -> None:
    path = tmp_path / "data_batch_3"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=rf"data_batch_3: .*{message}"):
        read_cifar_batch(path)


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this must not run",))


def test_cifar_reader_refuses_arbitrary_globals(tmp_path: Path) -> None:
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": _Boom(), b"labels": []}))
    with pytest.raises(DataError, match=r"refusing to load global builtins\.print"):
        read_cifar_batch(path)


def test_gzip_helper_matches_stdlib(tmp_path: Path) -> None:
    write_idx(tmp_path / "x.gz", torch.ones(2, 3, 3, dtype=torch.uint8))
    assert gzip.decompress((tmp_path / "x.gz").read_bytes())[:4] == b"\x00\x00\x08\x03"
