"""Class lists the user writes (``base_classes=[A1..A10]``, ``base=A1..A10``), resolved against a dataset's."""

from __future__ import annotations

from visiontrain.config import ConfigError


def parse_class_list(spec: list | str, known: list[str], key: str = "classes") -> list[str]:
    """``[A1, A2]`` or ``A1..A10`` (a range over the known names, in their order) → the list of names.

    Every name must be among ``known``; the error names the setting ``key`` and the known classes."""
    items = spec if isinstance(spec, list) else [spec]
    out: list[str] = []
    for item in (str(i) for i in items):
        if ".." in item:
            a, b = item.split("..", 1)
            if a not in known or b not in known:
                raise ConfigError(f"{key}: class range {item!r}: {a!r} or {b!r} is not among {known}")
            out += known[known.index(a): known.index(b) + 1]
        elif item in known:
            out.append(item)
        else:
            raise ConfigError(f"{key}: class {item!r} is not among the dataset's classes {known}")
    return out
