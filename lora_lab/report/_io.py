"""Atomic file writes: a reader (or a crash) never sees half a report or half a PNG."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from matplotlib.figure import Figure


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through ``write(handle)`` into a temp file beside it, then ``os.replace``.

    The temp file lives in the target's folder because ``os.replace`` is only atomic within
    one filesystem.

    Args:
        path: Destination file; its folder is created if needed.
        write: Called once with a binary file handle open for writing.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically; see :func:`atomic_write`."""
    return atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save a figure as PNG atomically; ``bbox_inches="tight"`` keeps outside legends in frame."""
    return atomic_write(
        path, lambda stream: fig.savefig(stream, format="png", dpi=dpi, bbox_inches="tight")
    )
