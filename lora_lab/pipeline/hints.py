"""Type hints in words, and whether a plain config value fits one: what the config checks
(`config_check`) say of a key and test its value with, where Hydra does not type it (the
arguments of `_target_` nodes, and the fields of ours Hydra cannot type)."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union


def describe(hint: Any) -> str:
    """A type hint in words: `int | None` → "an integer or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType) and all(
        typing.get_origin(a) is Literal for a in args if a is not type(None)
    ):
        values = [v for a in args if a is not type(None) for v in typing.get_args(a)]
        words = "one of " + ", ".join(dict.fromkeys(str(v) for v in values))
        return words + (" or null" if type(None) in args else "")
    if origin in (Union, types.UnionType):
        # Classes a YAML value cannot be (torch.Tensor, Callback, …) are left unsaid.
        shown = [a for a in args if a is not type(None) and _is_plain_words(describe(a))]
        words = [describe(a) for a in shown or [a for a in args if a is not type(None)]]
        return " or ".join(dict.fromkeys(words)) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        inner = describe(args[0]) if args else "a value"
        if inner in _WORDS.values() and inner != "true or false":
            return f"a list of {inner.removeprefix('an ').removeprefix('a ')}s"
        return f"a list, each {inner}"
    if origin in (dict, Mapping) or hint is dict:
        return "a mapping"
    return _WORDS.get(hint, getattr(hint, "__name__", str(hint)))


_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_WORDS |= {Path: "a path", type(None): "null"}


def _is_plain_words(words: str) -> bool:
    """Whether `describe` gave a type a YAML value can have (not a class name)."""
    return words in _WORDS.values() or words.startswith(("a list", "one of", "a mapping"))


def conforms(value: Any, hint: Any) -> bool:
    """Whether a plain config value (from YAML or the command line) fits a type hint.

    Lists stand for tuples and sequences (YAML has no tuples), an int is a float, a string is
    a path; a bool is never a number. Hints a config value cannot take (classes such as
    `torch.Tensor`, callables) do not reject: instantiation checks those.
    """
    if hint is Any or isinstance(hint, (str, typing.TypeVar)):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is type(None) or value is None:
        return hint is type(None) and value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path or (isinstance(hint, type) and issubclass(hint, Path)):
        return isinstance(value, (str, Path))
    sequence_types = (list, tuple, Sequence, typing.Iterable)
    if origin in sequence_types or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(conforms, value, args))
        return not args or all(conforms(item, args[0]) for item in value)
    if origin in (dict, Mapping) or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type) and isinstance(value, hint):
        return True
    # Another class: a mapping or list may still build one (a nested config); a plain
    # string or number never does.
    return not isinstance(value, (str, int, float, bool))
