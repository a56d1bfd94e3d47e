"""Typed configuration: dataclass schemas, YAML files and ``key=value`` overrides.

A schema is a plain ``@dataclass`` whose fields are declared with :func:`opt` so each key carries
a one-line doc. :func:`load_config` merges, in order, the schema defaults, an optional YAML file and
command-line overrides (``epochs=5``, ``ema.decay=0.999``, ``freeze=[backbone]``), rejects unknown
keys with a did-you-mean, checks types, and returns an instance of the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration the user wrote is wrong; the message says which key and what to do."""


def opt(default: Any, doc: str, **kwargs: Any) -> Any:
    """A dataclass field with a default and a one-line doc (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"doc": doc}, **kwargs)
    if (dataclasses.is_dataclass(default) and isinstance(default, type)) or (
            callable(default) and not isinstance(default, type)):  # a dataclass or a factory
        return dataclasses.field(default_factory=default, metadata={"doc": doc}, **kwargs)
    return dataclasses.field(default=default, metadata={"doc": doc}, **kwargs)


def flat_keys(schema: type | Any, prefix: str = "") -> list[tuple[str, Any, str, str]]:
    """Every leaf key of a schema as ``(dotted_key, default, type_name, doc)``."""
    cls = schema if isinstance(schema, type) else type(schema)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints.get(f.name, f.type)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "???"
        if dataclasses.is_dataclass(default):
            rows += flat_keys(default, key + ".")
            continue
        name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        rows.append((key, default, name, f.metadata.get("doc", "")))
    return rows


def config_help(schema: type, title: str = "") -> str:
    """A table of every key with its type, default and doc, for ``--help``."""
    rows = flat_keys(schema)
    width = max(len(k) for k, *_ in rows)
    twidth = max(len(t) for _, _, t, _ in rows)
    lines = [title] if title else []
    for key, default, tname, doc in rows:
        lines.append(f"  {key:<{width}}  {tname:<{twidth}} = {default!r:<14} {doc}")
    return "\n".join(lines)


def _suggest(bad: str, known: list[str]) -> str:
    close = difflib.get_close_matches(bad, known, n=3, cutoff=0.5)
    if not close:  # try the last component alone (user wrote `decay` for `ema.decay`)
        tail = bad.split(".")[-1]
        close = [k for k in known if k.split(".")[-1] == tail][:3]
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _merge(base: DictConfig, other: Any, source: str, known: list[str]) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except ConfigKeyError as e:
        key = str(getattr(e, "full_key", "") or getattr(e, "key", "") or "")
        raise ConfigError(
            f"{source}: unknown key '{key}'.{_suggest(key, known)} "
            f"Run with --help to list every key."
        ) from None
    except ValidationError as e:
        key = str(getattr(e, "full_key", "") or "")
        raise ConfigError(f"{source}: bad value for '{key}': {e.msg if hasattr(e, 'msg') else e}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(schema: type[T], yaml_path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> T:
    """Build a ``schema`` instance from defaults, ``base`` (e.g. a checkpoint's config), a YAML file
    and ``key=value`` overrides, in that order. Unknown keys and wrong types raise :class:`ConfigError`."""
    cfg = OmegaConf.structured(schema)
    rows = flat_keys(schema)
    known = [k for k, *_ in rows]
    str_keys = {k for k, _, type_name, _ in rows if type_name == "str"}
    if base:
        cfg = _merge(cfg, base, "saved config", known)
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors from several parsers
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        for key in str_keys:
            value = OmegaConf.select(data, key, default=None, throw_on_missing=False)
            if isinstance(value, bool):
                raise ConfigError(f"{path}: '{key}' takes text, but YAML reads the unquoted word as the boolean "
                                  f"{value} (YAML turns on/off/yes/no into booleans): quote it, e.g. {key}: \"off\"")
        cfg = _merge(cfg, data, str(path), known)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key = item.split("=", 1)[0]
        if key not in known and not any(k.startswith(key + ".") for k in known):
            raise ConfigError(f"unknown key '{key}'.{_suggest(key, known)} Run with --help to list every key.")
        if key in str_keys:
            # A string key takes the text as written: YAML would turn amp=off into False, seed-like
            # names such as 0012 into 12 and empty into None.
            value = OmegaConf.create({})
            OmegaConf.update(value, key, item.split("=", 1)[1], force_add=True)
            cfg = _merge(cfg, value, f"override '{item}'", known)
        else:
            cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'", known)
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(str(e)) from None


def to_dict(cfg: Any) -> dict:
    """A config instance as a plain dict of primitives (safe for YAML and ``weights_only`` checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
