"""Class selections: names and/or indices → the sorted original labels to keep."""

from __future__ import annotations

import re
from collections.abc import Sequence

from lora_lab.data.errors import DataError

ClassSelection = Sequence[int | str] | int | str | None


def _normalise_name(name: str) -> str:
    # "T-shirt/top", "t_shirt top" and "tshirttop" all name the same class.
    return re.sub(r"[^0-9a-z]", "", name.lower())


def resolve_classes(
    dataset: str, class_names: Sequence[str], classes: ClassSelection
) -> tuple[int, ...]:
    """Turn a class selection (names and/or indices, mixed) into sorted label indices.

    Args:
        dataset: Dataset name, for messages.
        class_names: All class names, indexed by label.
        classes: ``None`` for all classes; else names or indices, e.g. ``["cat", 2, "dog"]``.

    Returns:
        The selected original label indices, ascending.

    Raises:
        DataError: on an empty selection, an unknown name, an out-of-range or repeated class.
    """
    count = len(class_names)
    if classes is None:
        return tuple(range(count))
    items = [classes] if isinstance(classes, (str, int)) else list(classes)
    if not items:
        raise DataError(
            f"{dataset}: classes=[] selects no class; give names or indices 0..{count - 1}, "
            "or classes=null for all"
        )
    by_name = {_normalise_name(name): index for index, name in enumerate(class_names)}
    chosen: list[int] = []
    for item in items:
        if isinstance(item, str) and _normalise_name(item) in by_name:
            index = by_name[_normalise_name(item)]
        elif isinstance(item, str) and not item.strip().isdigit():
            raise DataError(
                f"{dataset}: classes={items} names unknown class {item!r}; valid names: {', '.join(class_names)}"
            )
        elif isinstance(item, bool) or not isinstance(item, (int, str)):
            raise DataError(
                f"{dataset}: classes={items} holds {item!r}, neither a class name nor an index"
            )
        else:
            index = int(item)
        if not 0 <= index < count:
            raise DataError(
                f"{dataset}: classes={items} holds index {index}, out of range 0..{count - 1}"
            )
        if index in chosen:
            raise DataError(
                f"{dataset}: class {item!r} ({class_names[index]}, index {index}) "
                f"selected twice in classes={items}"
            )
        chosen.append(index)
    return tuple(sorted(chosen))
