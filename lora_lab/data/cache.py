"""Decode a dataset once, then reuse it: from memory within a process, from disk across runs.

The disk cache is one ``torch.save`` file per dataset and set of source files, named by a key
built from the files' names, sizes, mtimes and first-MiB hashes, so replacing a source file
gives a new key and the stale entry is simply never read again. Files are written to a temp
name and ``os.replace``-d, so a concurrent reader sees the old file or the new one, never half.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from lora_lab._atomic import atomic_path
from lora_lab.data.errors import DataError
from lora_lab.data.sources import DatasetSpec, Located, decode, file_fingerprint, locate

log = logging.getLogger(__name__)

CACHE_ENV = "LORA_LAB_CACHE"
# Bump when the decoded layout changes so old cache files are ignored.
_CACHE_FORMAT = 1
_TENSOR_KEYS = ("train_x", "train_y", "test_x", "test_y")
# Decoded datasets of this process, by cache key: pipeline stages and per-stage DataModules of
# one dataset share the same (read-only) tensors instead of each loading ~50-180 MB again.
_MEMORY: dict[str, DecodedDataset] = {}


@dataclass(frozen=True)
class DecodedDataset:
    """Both official splits of a dataset as tensors, plus where they came from.

    Attributes:
        name: Dataset name.
        train_x: uint8 ``[N_train, C, H, W]``.
        train_y: int64 ``[N_train]``.
        test_x: uint8 ``[N_test, C, H, W]``.
        test_y: int64 ``[N_test]``.
        located: The source files.
        files: One fingerprint per source file (path, size, mtime_ns, sha1_first_mib).
        key: Cache key derived from the fingerprints.
        cache_path: The disk cache file.
        origin: How this call got the tensors: ``"memory"``, ``"cache hit"`` or ``"decoded"``.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    located: Located
    files: tuple[dict[str, object], ...]
    key: str
    cache_path: Path
    origin: str


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """``cache_dir`` if given, else ``$LORA_LAB_CACHE``, else ``~/.cache/lora_lab``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lora_lab").expanduser()


def clear_memory_cache() -> None:
    """Forget the decoded datasets held by this process (the disk cache stays)."""
    _MEMORY.clear()


def _cache_key(spec: DatasetSpec, files: tuple[dict[str, object], ...]) -> str:
    # File names, not folders: the same files reached through another path share one entry.
    parts = [
        (Path(str(f["path"])).name, f["size"], f["mtime_ns"], f["sha1_first_mib"]) for f in files
    ]
    blob = json.dumps([spec.name, _CACHE_FORMAT, parts]).encode()
    return hashlib.sha1(blob).hexdigest()


def _read_cache(path: Path, key: str) -> dict[str, Tensor] | None:
    """Load a cache file, or ``None`` when it is absent, stale or damaged."""
    if not path.is_file():
        return None
    try:
        # mmap: pages are shared by DDP ranks on one node and only read when touched.
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a damaged cache is only a cache: decode again
        log.warning("ignoring unreadable cache file %s (%r)", path, exc)
        return None
    if not isinstance(payload, dict) or payload.get("key") != key:
        log.warning("ignoring cache file %s: written for other source files", path)
        return None
    return {name: payload[name] for name in _TENSOR_KEYS}


def _write_cache(path: Path, key: str, tensors: dict[str, Tensor]) -> None:
    """Write the cache file atomically; an unwritable folder is a :class:`DataError`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, fsync=True) as temp, open(temp, "wb") as handle:
            torch.save({"key": key, **tensors}, handle)
    except OSError as exc:
        raise DataError(
            f"cache dir {path.parent} is not writable ({exc.strerror or exc}); "
            f"set data.cache_dir=DIR or {CACHE_ENV}=DIR to a writable folder"
        ) from exc


def load_dataset(
    spec: DatasetSpec, root: str | Path | None, download: bool, cache_dir: str | Path | None
) -> DecodedDataset:
    """Locate, then take the decoded tensors from memory, the disk cache, or the files.

    Args:
        spec: The dataset.
        root: Explicit data folder, or ``None`` to search the default places.
        download: Whether torchvision may download when no folder has the files.
        cache_dir: Cache folder, or ``None`` for the default (see :func:`resolve_cache_dir`).

    Returns:
        The decoded dataset; its tensors are shared with other callers and must not be
        modified in place.

    Raises:
        DataError: when the files are missing or corrupt, or the cache dir is unwritable.
    """
    cache_root = resolve_cache_dir(cache_dir)
    located = locate(spec, root, cache_root, download)
    files = tuple(file_fingerprint(path) for path in located.files)
    key = _cache_key(spec, files)
    cache_path = cache_root / "decoded" / f"{spec.name}-{key[:16]}.pt"
    if key in _MEMORY:
        return replace(_MEMORY[key], located=located, files=files, origin="memory")
    tensors = _read_cache(cache_path, key)
    origin = "cache hit"
    if tensors is None:
        tensors = decode(spec, located)
        _write_cache(cache_path, key, tensors)
        origin = "decoded"
    decoded = DecodedDataset(
        spec.name,
        **tensors,
        located=located,
        files=files,
        key=key,
        cache_path=cache_path,
        origin=origin,
    )
    _MEMORY[key] = decoded
    return decoded
