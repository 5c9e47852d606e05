"""The single error type of the data layer."""

from __future__ import annotations

import re


class DataError(ValueError):
    """A problem with data files, the cache or data arguments, told in one line.

    Subclasses ``ValueError`` so callers that validate arguments generically still catch it.
    The message is squeezed onto one line because it usually ends up as the last line of a
    CLI run or a log, where a multi-line message gets cut.
    """

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*\n\s*", " ", message.strip()))
