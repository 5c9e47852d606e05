"""Where the files of a dataset come from, what they are, and how they decode.

An explicit ``root`` (``data.root``) is the only place looked at: a root without the files is
an error, never a hint (with ``download=True`` torchvision downloads into it). With no root, the
standard places are searched in a fixed order: ``$LORA_LAB_DATA``, the Debian package folder
(Fashion-MNIST only), then ``<cache_dir>/downloads`` (filled by torchvision's own downloader when
``download=True``). The first folder holding a complete set of files wins.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lora_lab.data.errors import DataError
from lora_lab.data.formats import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_cifar_batch, read_idx
from lora_lab.data.specs import CIFAR10, FASHION_MNIST, MNIST, DatasetSpec

__all__ = [
    "CIFAR10",
    "DATA_ENV",
    "DEBIAN_FASHION_MNIST",
    "FASHION_MNIST",
    "MNIST",
    "DatasetSpec",
    "Located",
    "decode",
    "file_fingerprint",
    "locate",
]

log = logging.getLogger(__name__)

DATA_ENV = "LORA_LAB_DATA"
# Module-level so tests can point it at an empty folder; Debian's dataset-fashion-mnist.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FINGERPRINT_BYTES = 1 << 20


@dataclass(frozen=True)
class Located:
    """A complete set of files for one dataset.

    Attributes:
        kind: Which source matched: ``"root"``, ``"env"``, ``"debian"`` or ``"download"``.
        directory: The folder the files are in.
        files: The files, in decoding order (train images/labels, test images/labels for IDX;
            five train batches then the test batch for CIFAR).
    """

    kind: str
    directory: Path
    files: tuple[Path, ...]


def _debian_dir(spec: DatasetSpec) -> Path | None:
    """The Debian package folder, if Debian ships this dataset (only Fashion-MNIST)."""
    return DEBIAN_FASHION_MNIST if spec.name == "fashion_mnist" else None


def _complete_files(spec: DatasetSpec, directory: Path) -> tuple[tuple[Path, ...] | None, str]:
    """Return the dataset's files in ``directory`` or ``None`` plus why they are not there."""
    if not directory.is_dir():
        return None, "no such folder"
    names = spec.file_names
    found: list[Path] = []
    missing: list[str] = []
    for name in names:
        # Raw before .gz: torchvision's downloads leave both and the raw file skips gunzip.
        options = (
            [directory / name, directory / f"{name}.gz"]
            if spec.file_format == "idx"
            else [directory / name]
        )
        hit = next((path for path in options if path.is_file()), None)
        if hit is None:
            missing.append(name)
        else:
            found.append(hit)
    if missing:
        return None, "no files" if not found else f"missing {', '.join(missing)}"
    return tuple(found), "ok"


def _places(
    spec: DatasetSpec, root: str | Path | None, cache_dir: Path
) -> list[tuple[str, str, Path | None]]:
    """The sources in search order as ``(kind, label, base folder or None if unset)``.

    The last place is where a download goes: the root when one is given, else the cache.
    """
    if root is not None:
        base = Path(root).expanduser()
        return [("root", f"data.root={base}", base)]
    env = os.environ.get(DATA_ENV)
    debian = _debian_dir(spec)
    places: list[tuple[str, str, Path | None]] = [
        ("env", DATA_ENV, Path(env).expanduser() if env else None),
    ]
    if debian is not None:
        places.append(("debian", "Debian dataset-fashion-mnist", debian))
    places.append(("download", "download cache", cache_dir / "downloads"))
    return places


def locate(spec: DatasetSpec, root: str | Path | None, cache_dir: Path, download: bool) -> Located:
    """Find a complete set of files, downloading with torchvision as the last resort.

    Args:
        spec: The dataset.
        root: Explicit folder (``data.root``), the only place looked at when given; ``None``
            searches the standard places.
        cache_dir: The cache folder; downloads go to ``<cache_dir>/downloads`` (or the root).
        download: Whether torchvision may download when no folder has the files.

    Returns:
        The first complete set of files in search order.

    Raises:
        DataError: naming every place searched and how to supply the files.
    """
    looked: list[str] = []
    places = _places(spec, root, cache_dir)
    for kind, label, base in places:
        if base is None:
            looked.append(f"{label} (unset)")
            continue
        for directory in spec.candidate_dirs(base):
            files, why = _complete_files(spec, directory)
            if files is not None:
                return Located(kind, directory, files)
            looked.append(
                f"{label} {directory} ({why})" if kind != "root" else f"{directory} ({why})"
            )
    download_dir = places[-1][2]
    assert download_dir is not None
    if download:
        _download(spec, download_dir)
        for directory in spec.candidate_dirs(download_dir):
            files, _ = _complete_files(spec, directory)
            if files is not None:
                return Located(places[-1][0], directory, files)
        raise DataError(
            f"{spec.name}: torchvision download into {download_dir} left no usable files"
        )
    if root is not None:
        raise DataError(
            f"{spec.name}: data.root={str(places[0][2])!r} holds no {spec.name} files "
            f"(looked in: {'; '.join(looked)}); point data.root at the folder with "
            f"{', '.join(spec.file_names[:2])}…, or leave it unset to search the standard places"
        )
    hint = "set data.root=DIR or LORA_LAB_DATA=DIR (the files, or torchvision's layout under it)"
    if _debian_dir(spec) is not None:
        hint += ", apt-get install dataset-fashion-mnist"
    raise DataError(
        f"{spec.name}: data files not found; looked in: {'; '.join(looked)}. "
        f"To supply them: {hint}, or data.download=true when online"
    )


def _download(spec: DatasetSpec, directory: Path) -> None:
    """Download both splits with torchvision's own dataset class into ``directory``."""
    import torchvision.datasets  # deferred: only the online path needs it

    dataset_class = getattr(torchvision.datasets, spec.torchvision_class)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{spec.name}: cannot create download folder {directory} ({exc})") from exc
    log.info(
        "%s: downloading with torchvision.datasets.%s into %s",
        spec.name,
        spec.torchvision_class,
        directory,
    )
    try:
        for train in (True, False):
            dataset_class(root=str(directory), train=train, download=True)
    except Exception as exc:  # urllib, tarfile and torchvision's RuntimeError alike
        raise DataError(
            f"{spec.name}: download into {directory} failed ({exc!r}); "
            "offline? set data.root=DIR to files on disk instead"
        ) from exc


def file_fingerprint(path: Path) -> dict[str, object]:
    """Describe one file cheaply: path, size, mtime and the sha1 of its first MiB."""
    stat = path.stat()
    with path.open("rb") as handle:
        head = hashlib.sha1(handle.read(_FINGERPRINT_BYTES)).hexdigest()
    return {
        "path": str(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha1_first_mib": head,
    }


def decode(spec: DatasetSpec, located: Located) -> dict[str, Tensor]:
    """Decode the files into tensors.

    Returns:
        ``train_x``/``test_x``: uint8 ``[N, C, H, W]``; ``train_y``/``test_y``: int64 ``[N]``.

    Raises:
        DataError: on a corrupt file or images and labels that disagree.
    """
    if spec.file_format == "idx":
        parts = [
            (
                read_idx(images, IDX_IMAGES_MAGIC).unsqueeze(1),
                read_idx(labels, IDX_LABELS_MAGIC).long(),
                images,
                labels,
            )
            for images, labels in (located.files[0:2], located.files[2:4])
        ]
    else:
        train = [read_cifar_batch(path) for path in located.files[:5]]
        test_x, test_y = read_cifar_batch(located.files[5])
        parts = [
            (
                torch.cat([x for x, _ in train]),
                torch.cat([y for _, y in train]),
                located.files[0],
                located.files[4],
            ),
            (test_x, test_y, located.files[5], located.files[5]),
        ]
    tensors: dict[str, Tensor] = {}
    for split, (images, labels, images_path, labels_path) in zip(
        ("train", "test"), parts, strict=True
    ):
        if tuple(images.shape[1:]) != spec.input_shape:
            raise DataError(
                f"{images_path}: images are {list(images.shape[1:])}, "
                f"expected {list(spec.input_shape)} for {spec.name}"
            )
        if len(images) != len(labels):
            raise DataError(
                f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}"
            )
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(spec.class_names):
            raise DataError(f"{labels_path}: labels outside 0..{len(spec.class_names) - 1}")
        tensors[f"{split}_x"], tensors[f"{split}_y"] = images.contiguous(), labels
    return tensors
