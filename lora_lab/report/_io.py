"""Atomic file writes: a reader (or a crash) never sees half a report or half a PNG."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from matplotlib.figure import Figure

from lora_lab._atomic import atomic_path


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through ``write(handle)`` into a temp file beside it, then ``os.replace``.

    Built on :func:`lora_lab._atomic.atomic_path`: the file gets the umask's mode (0644 under
    umask 022), as a plain ``open`` would give it, and a failed write leaves no temp file.

    Args:
        path: Destination file; its folder is created if needed.
        write: Called once with a binary file handle open for writing.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp, open(temp, "wb") as stream:
        write(stream)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically; see :func:`atomic_write`."""
    return atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save a figure as PNG atomically; ``bbox_inches="tight"`` keeps outside legends in frame."""
    return atomic_write(
        path, lambda stream: fig.savefig(stream, format="png", dpi=dpi, bbox_inches="tight")
    )
