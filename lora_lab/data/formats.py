"""Readers (and small writers) for the on-disk formats of MNIST-like and CIFAR-10 data.

torchvision's ``read_image_file``/``read_label_file`` only open uncompressed files and check
the header with ``assert``; a truncated download would surface as a bare ``AssertionError``.
These readers accept ``.gz`` or raw IDX files and turn every defect into a one-line
:class:`DataError` that names the file. The writers exist so tests and demos can build
small datasets in exactly the formats the readers take.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lora_lab.data.errors import DataError

# IDX magic numbers: two zero bytes, a type byte (0x08 = unsigned byte), a dimension count.
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
CIFAR_IMAGE_SHAPE = (3, 32, 32)


def _read_bytes(path: Path) -> bytes:
    """Return the file's bytes, gunzipped when the name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read, bad gzip or truncated file ({exc})") from exc


def read_idx(path: Path, expected_magic: int) -> Tensor:
    """Read one IDX file of unsigned bytes.

    Args:
        path: An IDX file, gzipped if its name ends in ``.gz``.
        expected_magic: :data:`IDX_IMAGES_MAGIC` or :data:`IDX_LABELS_MAGIC`.

    Returns:
        A uint8 tensor with the dims from the header, e.g. ``[N, 28, 28]`` or ``[N]``.

    Raises:
        DataError: on a wrong magic number or a payload that does not match the header.
    """
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise DataError(
            f"{path}: wrong IDX magic 0x{magic:08x}, expected 0x{expected_magic:08x} "
            "(not an IDX file, or images and labels swapped)"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims)
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: wrong length, header says {list(dims)} = {expected} bytes "
            f"but {len(raw) - header} follow (truncated or corrupt)"
        )
    # bytearray gives torch a writable buffer of its own (frombuffer warns on read-only bytes).
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).view(*dims)


def write_idx(path: Path, array: Tensor) -> None:
    """Write a uint8 tensor as an IDX file (gzipped when the name ends in ``.gz``).

    Args:
        path: Destination file.
        array: uint8 tensor, ``[N, H, W]`` for images or ``[N]`` for labels.
    """
    data = array.to(torch.uint8).contiguous().numpy()
    header = struct.pack(f">I{data.ndim}I", 0x00000800 | data.ndim, *data.shape)
    payload = header + data.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb", compresslevel=1) as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays and builtins but no other objects.

    The CIFAR batches are pickles; refusing arbitrary globals keeps a tampered data file from
    running code while still reading the real files (a dict of bytes keys, an ndarray, a list).
    """

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            # Python 3 writes bytes under pickle protocol 2 as _codecs.encode(str, "latin1").
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """Read one CIFAR-10 python batch (``data_batch_k`` or ``test_batch``).

    Args:
        path: The pickle file; a dict with ``b"data"`` (uint8 ``[N, 3072]``, channel-major)
            and ``b"labels"`` (N ints).

    Returns:
        ``(images, labels)``: uint8 ``[N, 3, 32, 32]`` and int64 ``[N]``.

    Raises:
        DataError: when the file is not such a pickle or its arrays disagree.
    """
    try:
        with path.open("rb") as handle:
            # encoding="bytes" keeps the Python-2 era str keys of the real files as b"data".
            entry = _ArrayOnlyUnpickler(handle, encoding="bytes").load()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    except Exception as exc:  # unpickling raises many types on garbage; all mean "bad file"
        raise DataError(f"{path}: bad pickle, truncated or corrupt ({exc!r})") from exc
    if not isinstance(entry, dict):
        raise DataError(f"{path}: bad pickle, expected a dict, got {type(entry).__name__}")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: bad CIFAR batch, keys {sorted(map(str, entry))} lack data/labels")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != math.prod(CIFAR_IMAGE_SHAPE):
        raise DataError(
            f"{path}: bad CIFAR batch, data is {data.dtype} {list(data.shape)}, "
            "expected uint8 [N, 3072]"
        )
    if len(labels) != len(data):
        raise DataError(f"{path}: bad CIFAR batch, {len(data)} images but {len(labels)} labels")
    images = torch.from_numpy(data.copy()).view(-1, *CIFAR_IMAGE_SHAPE)
    return images, torch.as_tensor(np.asarray(labels), dtype=torch.int64)


def write_cifar_batch(path: Path, images: Tensor, labels: Sequence[int]) -> None:
    """Write a CIFAR-10 python batch the way the official files are laid out.

    Args:
        path: Destination file.
        images: uint8 ``[N, 3, 32, 32]``.
        labels: N class indices.
    """
    entry = {
        b"batch_label": path.name.encode(),
        b"labels": [int(label) for label in labels],
        b"data": images.to(torch.uint8).reshape(len(images), -1).numpy(),
        b"filenames": [f"{i}.png".encode() for i in range(len(images))],
    }
    with path.open("wb") as handle:
        pickle.dump(entry, handle, protocol=2)
