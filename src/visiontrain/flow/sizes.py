"""Image sizes, height first: ``"256x320"`` in a config is ``(256, 320)`` and prints as ``256×320``.

Every size the flow task reads from a config or prints (crops, image and flow sizes, export sizes) goes
through these two functions, so the order is always height × width.
"""

from __future__ import annotations

from visiontrain.config import ConfigError


def parse_size(text: str, key: str, multiple: int = 1, minimum: int = 1, why: str = "") -> tuple[int, int]:
    """``"256x320"`` -> ``(256, 320)``. A :class:`ConfigError` naming ``key`` when the text is not ``HxW``
    or a side is below ``minimum`` or not a multiple of ``multiple``; ``why`` (e.g. what needs the multiple)
    is added to that message."""
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        height, width = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{key}={text!r} is not HxW, height first (e.g. {key}=256x320)") from None
    if height < minimum or width < minimum or height % multiple or width % multiple:
        rule = f">= {minimum}" + (f" and multiples of {multiple}" if multiple > 1 else "")
        raise ConfigError(f"{key}={text}: height and width must be {rule}" + (f" ({why})" if why else ""))
    return height, width


def format_size(height: int, width: int) -> str:
    """``(256, 320)`` -> ``"256×320"`` (height × width), the way every flow message prints a size."""
    return f"{height}×{width}"
