"""Bad input and crashes, said in one line: `UsageError`, and `guard`, which runs a command
and turns what it raises into a message and an exit code (2 for bad input, 1 for a crash)."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UsageError(ValueError):
    """Bad command-line input."""


def fail(message: str, code: int = 2) -> int:
    print(f"lora-lab: error: {message}", file=sys.stderr)
    return code


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def user_cause(error: BaseException) -> BaseException | None:
    """The bad-input error (a ValueError) an exception was raised from, if any."""
    cause = error.__cause__ or error.__context__
    while cause is not None:
        if isinstance(cause, ValueError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def guard(func: Callable[[], int | None], debug: bool) -> int:
    """Run `func`; bad input → one line + exit 2, a crash → one line + exit 1."""
    from omegaconf.errors import OmegaConfBaseException

    if debug:
        return func() or 0
    try:
        return func() or 0
    except (ValueError, OmegaConfBaseException, FileNotFoundError, PermissionError) as error:
        return fail(one_line(error))
    except Exception as error:
        cause = user_cause(error)
        if cause is not None:  # e.g. Hydra's InstantiationException around a DataError
            return fail(one_line(cause))
        return fail(
            f"{type(error).__name__}: {one_line(error)} (run with --debug for the traceback)", 1
        )
    except KeyboardInterrupt:
        return fail("interrupted", 130)
