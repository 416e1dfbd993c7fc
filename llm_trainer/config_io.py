"""Config serialisation: nested dataclass configs to and from plain dicts, TOML and JSON.

``ConfigMixin`` gives every config ``to_dict`` / ``from_dict`` / ``save`` / ``load``. ``from_dict`` converts
nested tables into the declared dataclass types (a ``Union`` of dataclasses picks the tightest class whose fields
fit the table — that is how ``DsZero3Config`` is told from ``DsZero2Config`` by its fixed ``stage`` field), turns
lists into tuples where a tuple is declared, rejects an unknown key with the close matches, and rejects a value
of the wrong type naming the field and the declared type (``TrainConfig.batch_size: expected int, got 'x' (str)``)
before the config's own ``__post_init__`` checks run. Callables and other non-plain objects are left out of
``to_dict`` (``strict=True`` raises instead); ``None`` is omitted from TOML (TOML has no null: a missing key means
"the default"), except where a field's default is not None: there TOML spells None ``"none"`` (``save_interval =
"none"``, ``ds_config = "none"``), which ``from_dict`` reads back as None for any field that may be None and is not a
string (``to_dict(toml=True)``).

Command-line overrides: :func:`parse_overrides` turns ``["optim_config.max_lr=3e-4", "report_to=[\"wandb\"]"]``
into a nested dict (each value read as a TOML value, else kept as a string) that :func:`deep_merge` lays over a
config file's dict.
"""
from __future__ import annotations

import collections.abc
import copy
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

__all__ = ["ConfigMixin", "dict_to_toml", "load_dict", "from_dict", "to_plain", "parse_overrides", "deep_merge"]


class _Skip:
    pass


_SKIP = _Skip()


NONE = "none"
"""How TOML (which has no null) spells None for a field that may be None but is not a string."""


def _plain(value: Any, where: str, strict: bool, toml: bool = False) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _to_dict(value, where, strict, toml)
    if isinstance(value, (list, tuple)):
        out = [_plain(v, f"{where}[{i}]", strict, toml) for i, v in enumerate(value)]
        if any(v is _SKIP for v in out):
            return _SKIP
        return out
    if isinstance(value, dict):
        out = {str(k): _plain(v, f"{where}.{k}", strict, toml) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _SKIP}
    if strict:
        raise TypeError(f"{where} holds a {type(value).__name__}, which cannot be serialised to TOML/JSON; "
                        "set it again in code after loading")
    return _SKIP


def _default_is_none(f: dataclasses.Field) -> bool:
    return f.default is None or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)


def _to_dict(cfg: Any, where: str, strict: bool, toml: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    hints = _hints(type(cfg)) if toml else {}
    for f in dataclasses.fields(cfg):  # non-init fields too: they tell subclasses apart (e.g. ZeRO `stage`)
        v = _plain(getattr(cfg, f.name), f"{where}.{f.name}", strict, toml)
        if v is None and toml and not _default_is_none(f) and _none_spellable(hints.get(f.name, Any)):
            v = NONE              # omitted, the key would mean the (non-None) default
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


def _none_spellable(tp: Any) -> bool:
    """A field typed ``tp`` may be None and cannot hold the string ``"none"`` itself."""
    options = _union_args(tp)
    return type(None) in options and not any(_type_ok(t, NONE) for t in options if t is not type(None))


def _convert(tp: Any, value: Any, where: str) -> Any:
    if value is None or (isinstance(value, str) and value == NONE and _none_spellable(tp)):
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


def _type_ok(tp: Any, value: Any) -> bool:
    """``value`` fits the declared type ``tp``. Lenient where the configs' own checks coerce: an int is a float, a
    path object a str, one item a ``list[X]`` (e.g. ``report_to = "wandb"``); unknown annotations accept anything."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or isinstance(tp, typing.TypeVar):
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(t, value) for t in args)
    if origin is typing.Literal:
        return value in args
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, (str, os.PathLike))
    if origin in (list, tuple, collections.abc.Sequence):
        items = [t for t in args if t is not Ellipsis]
        if not isinstance(value, (list, tuple)):
            return origin is list and bool(items) and _type_ok(items[0], value)
        return not items or all(any(_type_ok(t, v) for t in items) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if origin is collections.abc.Callable or tp is collections.abc.Callable:
        return callable(value)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(t) for t in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return repr(tp).replace("typing.", "").replace("collections.abc.", "")


def _check_type(tp: Any, value: Any, where: str) -> None:
    if not _type_ok(tp, value):
        raise TypeError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


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
        hint = hints.get(name, Any)
        kwargs[name] = _convert(hint, value, f"{where}.{name}")
        _check_type(hint, kwargs[name], f"{where}.{name}")
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
    """Read a `.toml`, `.json` or (with the optional ``pyyaml``) `.yaml`/`.yml` file into a dict."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        with open(path, "rb") as f:
            return tomllib.load(f)
    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML needs pyyaml (pip install 'llm_trainer[yaml]'), or write the "
                             f"config as TOML") from None
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        return data
    raise ValueError(f"config file {str(path)!r} must end in .toml, .json, .yaml or .yml")


def _override_value(text: str) -> Any:
    """A command-line value read as TOML (``3e-4``, ``true``, ``[1, 2]``, ``"quoted"``), else the raw string."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` → ``{"a": {"b": 1}, "c": "x"}``: dotted keys become nested tables; each value is read
    as a TOML value when it parses as one (quote a string that looks like a number: ``run_name='"2024"'``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise ValueError(f"override {item!r}: expected key=value or a.dotted.key=value")
        table = out
        for i, part in enumerate(parts[:-1]):
            table = table.setdefault(part.strip(), {})
            if not isinstance(table, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parts[:i + 1])} is set to a value, not a table")
        if isinstance(table.get(parts[-1].strip()), dict):
            raise ValueError(f"override {item!r}: {key.strip()} is a table (set its fields with {key.strip()}.name=)")
        table[parts[-1].strip()] = _override_value(text.strip())
    return out


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``override`` laid over it, table by table (nested dicts merge, other values replace)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


class ConfigMixin:
    """`to_dict` / `from_dict` / `save` / `load` for the config dataclasses."""

    def to_dict(self, strict: bool = False, toml: bool = False) -> dict[str, Any]:
        """Nested plain dict. Callables/objects are left out (or raise TypeError with ``strict=True``).
        ``toml=True``: None in a field whose default is not None becomes ``"none"`` (TOML has no null)."""
        return _to_dict(self, type(self).__name__, strict, toml)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a (nested) dict; unknown keys raise ValueError naming the key and close matches."""
        return _from_dict(cls, data)

    def save(self, path: str | os.PathLike, strict: bool = False) -> None:
        path = Path(path)
        data = self.to_dict(strict=strict, toml=path.suffix.lower() == ".toml")
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
