"""Atomic file writes for every layer: a reader (or a crash) sees the old file or the new one.

Plain standard library, so any layer (``lora`` included) can use it without pulling in
Lightning or Hydra.

Each write goes to a temp file in the target's folder (``os.replace`` is atomic only within
one filesystem), which is then renamed over the target. The temp file is created with
``os.open(..., 0o666)``, exactly as a plain ``open(path, "w")`` creates a file, so the kernel
applies the umask (and any default ACL of the folder): the result is 0644 under umask 022 and
0664 under 002, not the 0600 of ``tempfile.mkstemp``. On failure the temp file is removed and
the target is left as it was.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]

# Room for ".{name}.{pid}.{hex}.tmp" within the usual 255-byte name limit.
_MAX_NAME = 200
_ATTEMPTS = 16


def _create_temp(path: Path) -> tuple[Path, int]:
    """An empty new file beside ``path`` with a unique name, and the mode it was created with."""
    stem = path.name[:_MAX_NAME]
    for _ in range(_ATTEMPTS):
        temp = path.with_name(f".{stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        return temp, mode
    raise FileExistsError(f"no free temp file name beside {path} after {_ATTEMPTS} tries")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path``, on failure it goes.

    The temp file already exists (empty) when yielded. Write it by path — e.g.
    ``save_file(tensors, tmp)``, ``fig.savefig(tmp)``, ``df.to_csv(tmp)``, ``open(tmp, "wb")``
    — all of which keep its mode. A writer that replaces the file instead gets the mode put
    back before the rename, so the target always has the mode a plain ``open`` would give it.
    The target's folder is made if it is missing.

    Args:
        path: Destination file.
        fsync: Flush the temp file to disk before the rename (durability across a power cut).

    Yields:
        The temp file's path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp, mode = _create_temp(path)
    try:
        yield temp
        if stat.S_IMODE(os.stat(temp).st_mode) != mode:
            os.chmod(temp, mode)
        if fsync:
            _fsync(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    path = Path(path)
    with atomic_path(path, fsync=fsync) as temp, open(temp, "wb") as handle:
        handle.write(data)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)
