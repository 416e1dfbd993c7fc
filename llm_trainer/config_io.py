"""Config serialisation: nested dataclass configs to and from plain dicts, TOML and JSON.

``ConfigMixin`` gives every config ``to_dict`` / ``from_dict`` / ``save`` / ``load``. ``from_dict`` converts
nested tables into the declared dataclass types (a ``Union`` of dataclasses picks the tightest class whose fields
fit the table — that is how ``DsZero3Config`` is told from ``DsZero2Config`` by its fixed ``stage`` field), turns
lists into tuples where a tuple is declared, and rejects an unknown key with the close matches. Callables and
other non-plain objects are left out of ``to_dict`` (``strict=True`` raises instead); ``None`` is omitted from
TOML (TOML has no null: a missing key means "the default").
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

__all__ = ["ConfigMixin", "dict_to_toml", "load_dict", "from_dict", "to_plain"]



class _Skip:
    pass


_SKIP = _Skip()


def _plain(value: Any, where: str, strict: bool) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _to_dict(value, where, strict)
    if isinstance(value, (list, tuple)):
        out = [_plain(v, f"{where}[{i}]", strict) for i, v in enumerate(value)]
        if any(v is _SKIP for v in out):
            return _SKIP
        return out
    if isinstance(value, dict):
        out = {str(k): _plain(v, f"{where}.{k}", strict) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _SKIP}
    if strict:
        raise TypeError(f"{where} holds a {type(value).__name__}, which cannot be serialised to TOML/JSON; "
                        "set it again in code after loading")
    return _SKIP


def _to_dict(cfg: Any, where: str, strict: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):  # non-init fields too: they tell subclasses apart (e.g. ZeRO `stage`)
        v = _plain(getattr(cfg, f.name), f"{where}.{f.name}", strict)
        if v is not _SKIP:
            out[f.name] = v
    return out


def _hints(cls: type) -> dict[str, Any]:
    ns = dict(vars(importlib.import_module(cls.__module__)))
    try:
        return typing.get_type_hints(cls, globalns=ns)
    except Exception:  # unresolvable annotation in a foreign class: fall back to "no conversion"
        return {}


def _union_args(tp: Any) -> tuple:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _convert(tp: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    options = _union_args(tp)
    if isinstance(value, dict):
        declared = [t for t in options if isinstance(t, type) and dataclasses.is_dataclass(t)]
        fitting = [t for t in _candidates(declared) if _matches(t, value)]
        if fitting:
            # a class told apart by a fixed field wins; otherwise the tightest fit (fewest fields)
            best = min(fitting, key=lambda t: (not _has_fixed(t), len(dataclasses.fields(t))))
            return _from_dict(best, value, where)
        if declared:
            return _from_dict(declared[0], value, where)  # raises naming the unknown key
        return value
    if isinstance(value, list):
        for t in options:
            if typing.get_origin(t) is tuple or t is tuple:
                return tuple(value)
    if isinstance(value, int) and not isinstance(value, bool) and float in options and int not in options:
        return float(value)
    return value


# modules defining subclasses of re-exported configs, imported (if present) before choosing a class for a dict
_SUBCLASS_MODULES = ("llm_trainer.model.vlm",)


def _candidates(declared: list[type]) -> list[type]:
    """Declared dataclass types preceded by their dataclass subclasses (deepest first)."""
    for module in _SUBCLASS_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    out: list[type] = []

    def walk(t: type) -> None:
        for sub in t.__subclasses__():
            if dataclasses.is_dataclass(sub):
                walk(sub)
        if t not in out:
            out.append(t)

    for t in declared:
        walk(t)
    return out


def _has_fixed(cls: type) -> bool:
    return any(not f.init and f.default is not dataclasses.MISSING for f in dataclasses.fields(cls))


def _matches(cls: type, data: dict[str, Any]) -> bool:
    """`data` fits `cls`: every key is a field (or alias), and the class's fixed (init=False) fields with a
    default are present in `data` with exactly that value (how e.g. DsZero3Config is told from DsZero2Config)."""
    flds = {f.name: f for f in dataclasses.fields(cls)}
    aliases = getattr(cls, "_ALIASES", {})
    keys = {aliases.get(k, k) for k in data}
    if not keys <= set(flds):
        return False
    for f in flds.values():  # required arguments must be there
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING \
                and f.name not in keys:
            return False
    for f in flds.values():
        if not f.init and f.default is not dataclasses.MISSING:
            if f.name not in data or data[f.name] != f.default:
                return False
    return True


def _from_dict(cls: type, data: dict[str, Any], where: str | None = None) -> Any:
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a table/dict, got {type(data).__name__}")
    flds = {f.name: f for f in dataclasses.fields(cls) if f.init}
    fixed = {f.name for f in dataclasses.fields(cls) if not f.init}
    aliases = getattr(cls, "_ALIASES", {})
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name in fixed:  # derived / fixed by the class; written by to_dict for polymorphic dispatch only
            continue
        if name not in flds:
            close = difflib.get_close_matches(key, list(flds), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            label = where if where == cls.__name__ else f"{where} ({cls.__name__})"
            raise ValueError(f"{label}: unknown field {key!r}{hint} (valid: {', '.join(flds)})")
        kwargs[name] = _convert(hints.get(name, Any), value, f"{where}.{name}")
    return cls(**kwargs)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None)
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() and k.isascii() else json.dumps(k)


def dict_to_toml(data: dict[str, Any]) -> str:
    """Write a nested dict of plain values as TOML (nested dicts become tables; None values are omitted)."""
    lines: list[str] = []

    def emit(d: dict[str, Any], prefix: list[str]) -> None:
        scalars = {k: v for k, v in d.items() if v is not None and not isinstance(v, dict)}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in prefix) + "]")
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in tables.items():
            emit(v, prefix + [k])

    emit(data, [])
    return "\n".join(lines).lstrip("\n") + "\n"


def load_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a `.toml` or `.json` file into a dict."""
    path = Path(path)
    if path.suffix.lower() == ".toml":
        import tomllib

        with open(path, "rb") as f:
            return tomllib.load(f)
    if path.suffix.lower() == ".json":
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    raise ValueError(f"config file {str(path)!r} must end in .toml or .json")


class ConfigMixin:
    """`to_dict` / `from_dict` / `save` / `load` for the config dataclasses."""

    def to_dict(self, strict: bool = False) -> dict[str, Any]:
        """Nested plain dict. Callables/objects are left out (or raise TypeError with ``strict=True``)."""
        return _to_dict(self, type(self).__name__, strict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a (nested) dict; unknown keys raise ValueError naming the key and close matches."""
        return _from_dict(cls, data)

    def save(self, path: str | os.PathLike, strict: bool = False) -> None:
        path = Path(path)
        data = self.to_dict(strict=strict)
        if path.suffix.lower() == ".toml":
            text = dict_to_toml(data)
        elif path.suffix.lower() == ".json":
            text = json.dumps(data, indent=2) + "\n"
        else:
            raise ValueError(f"config file {str(path)!r} must end in .toml or .json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike):
        return cls.from_dict(load_dict(path))


def from_dict(cls: type, data: dict[str, Any], where: str | None = None) -> Any:
    """Build config class ``cls`` from a nested dict (see the module docstring)."""
    return _from_dict(cls, data, where)


def coerce_field(obj: Any, name: str, cls: type) -> None:
    """Accept a plain dict for a nested config field (e.g. ``TrainConfig(optim_config={...})``)."""
    value = getattr(obj, name)
    if isinstance(value, dict):
        setattr(obj, name, _convert(cls, value, f"{type(obj).__name__}.{name}"))  # may pick a subclass


def to_plain(value: Any, where: str = "config", strict: bool = False) -> Any:
    """``value`` as plain JSON/TOML data (dataclasses become dicts); non-plain objects are left out."""
    out = _plain(value, where, strict)
    return None if out is _SKIP else out
