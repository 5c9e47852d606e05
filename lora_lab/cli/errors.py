"""Bad input and crashes, said in one line each: `UsageError`, and `guard`, which runs a
command and turns what it raises into a message and an exit code (2 for bad input, 1 for a
crash). A bad config (`ConfigError`) is said here, one line per problem."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any


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


def say_problems(error: ValueError, typed: Mapping[str, Any]) -> int | None:
    """A bad config's problems, one line each, each value as the command line typed it
    (`typed`: key → value); None for another error."""
    problems = getattr(error, "problems", None)  # a ConfigError (pipeline.schema)
    if problems is None:
        return None
    for problem in problems:
        fail(one_line(problem.line(typed.get(problem.key, problem.value))))
    return 2


def guard(
    func: Callable[[], int | None], debug: bool, typed: Mapping[str, Any] | None = None
) -> int:
    """Run `func`; bad input → one line (a line per problem of a bad config) + exit 2, a
    crash → one line + exit 1. `typed`: the values the command line gave, to show as typed."""
    from omegaconf.errors import OmegaConfBaseException

    if debug:
        return func() or 0
    try:
        return func() or 0
    except ValueError as error:
        code = say_problems(error, typed or {})
        return fail(one_line(error)) if code is None else code
    except (OmegaConfBaseException, FileNotFoundError, PermissionError) as error:
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
