"""Typed configs: dataclasses loaded from YAML, dotted ``key=value`` overrides, early validation.

Every error names the offending field by its dotted path (``optim.lr``) and, for files, the
file. Unknown keys are errors, not silently ignored: a typo must not train with a default.
A section class may list keys it no longer has in ``RETIRED_KEYS`` (key -> what to do instead),
so an old config gets that advice rather than "unknown key". A section class may define
``validate(where)``: it runs as soon as the section is built, with
``where`` its dotted path, so every value is checked at load, before anything starts.

Fields typed ``FilePath`` name files or folders: a relative value written in a config file
resolves against that file's folder (so a config works from any working directory), one given
as a command-line override against the working directory; ``~`` expands in both.

A key's one-line meaning (``--list-keys``) is its field's ``metadata["help"]`` or else the
comment on its line (or the comment lines right above it) in the class body.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import os
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional, Sequence, TypeVar

import yaml

from megatron_klear.errors import ConfigError

T = TypeVar("T")


class _PathMarker:
    """``Annotated`` metadata of ``FilePath``."""


PATH = _PathMarker()
# A file or folder; relative values resolve against the config file's folder (see module doc).
FilePath = Annotated[str, PATH]


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type inside ``Annotated``, whether it is a ``FilePath``)."""
    if typing.get_origin(tp) is Annotated:
        base, *meta = typing.get_args(tp)
        return base, any(m is PATH for m in meta)
    return tp, False


def _convert(value: Any, tp: Any, where: str) -> Any:
    tp, _ = _unwrap(tp)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (list, Sequence, typing.Sequence) or tp is list:
        if value is None:  # `key=null` for a list: none (data.valid=null: no validation set)
            return []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _shallow_fields(obj: Any) -> dict:
    """A dataclass instance's fields as a mapping (nested sections as mappings too)."""
    return {
        f.name: _shallow_fields(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else v
        for f in dataclasses.fields(obj)
    }


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, converting and checking every field."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    retired = getattr(cls, "RETIRED_KEYS", {})
    for name in sorted(set(data) & set(retired)):
        raise ConfigError(f"config key {where + '.' if where else ''}{name} was removed: {retired[name]}")
    unknown = sorted(set(data) - names)
    if unknown:
        path = f"{where}." if where else ""
        raise ConfigError(f"unknown config key {path}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            value = data[f.name]
            if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
                # A section given in the file starts from the field's own default (RL's optim has
                # other defaults than OptimConfig's), not from the class defaults.
                default = f.default_factory()
                if dataclasses.is_dataclass(default):
                    value = {**_shallow_fields(default), **value}
            kwargs[f.name] = _convert(value, hints[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {key}")
    obj = cls(**kwargs)
    if where and hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``a.b.c=value`` items -> ``(["a", "b", "c"], value)`` with the value parsed as YAML."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        out.append((key.strip().split("."), yaml.safe_load(raw)))
    return out


def _set(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {p} is not a section")
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested mapping."""
    for parts, value in parse_overrides(overrides):
        _set(data, parts, value)
    return data


def _resolve(value: Any, tp: Any, base: Path) -> Any:
    """``value`` of type ``tp`` with every ``FilePath`` in it made absolute against ``base``."""
    tp, is_path = _unwrap(tp)
    if is_path:
        if not isinstance(value, str) or not value:
            return value
        value = os.path.expanduser(value)
        return value if os.path.isabs(value) else os.path.normpath(base / value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _resolve(value, inner[0], base) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = _hints(tp)
        return {k: _resolve(v, hints[k], base) if k in hints else v for k, v in value.items()}
    if (origin in (list, Sequence, typing.Sequence) or tp is list) and isinstance(value, list) and args:
        return [_resolve(v, args[0], base) for v in value]
    return value


def _type_at(cls: type, parts: Sequence[str]) -> Any:
    """The type of the dotted key ``parts`` under dataclass ``cls`` (None when unknown)."""
    tp: Any = cls
    for p in parts:
        tp, _ = _unwrap(tp)
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), None)
        if not (dataclasses.is_dataclass(tp) and p in _hints(tp)):
            return None
        tp = _hints(tp)[p]
    return tp


def read_yaml(path: str | Path) -> dict:
    """The top-level mapping of a YAML config file; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from a YAML file plus overrides, then run its ``validate()`` if any.

    Relative paths resolve against the file's folder, those of overrides against the working
    directory.
    """
    data: dict = {}
    if path is not None:
        data = _resolve(read_yaml(path), cls, Path(os.path.abspath(path)).parent)
    for parts, value in parse_overrides(overrides):
        tp = _type_at(cls, parts)
        _set(data, parts, value if tp is None else _resolve(value, tp, Path.cwd()))
    try:
        cfg = from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict:
    """The config as plain mappings and lists (what ``--print-config`` and ``config.json`` hold)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, every key included, in declaration order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


# --- key reference (--list-keys) ---------------------------------------------------------------


def _comments(klass: type) -> dict[str, str]:
    """Field name -> the comment on its line, or the comment lines right above it, in ``klass``."""
    try:
        src = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    trailing: dict[int, str] = {}
    full_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (full_line if tok.line.strip().startswith("#") else trailing)[tok.start[0]] = text
    out = {}
    body = ast.parse(src).body[0]
    for node in getattr(body, "body", []):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = node.end_lineno or node.lineno
            text = trailing.get(line) or trailing.get(node.lineno)
            if not text:
                above, n = [], node.lineno - 1
                while n in full_line:
                    above.insert(0, full_line[n])
                    n -= 1
                text = " ".join(above)
            if text:
                out[node.target.id] = text
    return out


def field_help(cls: type) -> dict[str, str]:
    """Every field of dataclass ``cls`` (inherited ones too) -> its one-line meaning."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_comments(klass))
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            out[f.name] = f.metadata["help"]
    return out


def type_name(tp: Any) -> str:
    """A short readable name of a field type: ``int``, ``path | null``, ``list[path]``."""
    tp, is_path = _unwrap(tp)
    if is_path:
        return "path"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin in (list, Sequence, typing.Sequence):
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _section_class(tp: Any) -> Optional[type]:
    tp, _ = _unwrap(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), None)
    return tp if dataclasses.is_dataclass(tp) else None


def iter_keys(cls: type, prefix: str = "", defaults: Any = None) -> Iterator[tuple[str, str, Any, str]]:
    """``(dotted key, type, default, meaning)`` of every key under ``cls``, sections first-class.

    Defaults come from ``defaults`` (the enclosing default instance) when given, so a section
    whose parent overrides its defaults (RL's ``checkpoint.save_interval``) shows those.
    """
    hints, helps = _hints(cls), field_help(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        section = _section_class(hints[f.name])
        meaning = helps.get(f.name) or (_summary(section) if section else "")
        if section is not None:
            yield key, type_name(hints[f.name]), None if dataclasses.is_dataclass(default) else default, meaning
            inner = default if dataclasses.is_dataclass(default) else None
            yield from iter_keys(section, key + ".", inner)
        else:
            yield key, type_name(hints[f.name]), default, meaning


def _summary(cls: type) -> str:
    """The first paragraph of a class's own docstring (not the signature dataclass invents)."""
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def list_keys(cls: type) -> str:
    """The key reference of config class ``cls``: one line per key, type, default and meaning."""
    rows = []
    for key, tp, default, meaning in iter_keys(cls):
        if default is dataclasses.MISSING:
            shown = "(required)"
        elif tp == "section":
            shown = ""
        else:
            shown = yaml.safe_dump(default, default_flow_style=True, width=1 << 30).strip().removesuffix("\n...")
        rows.append((key, tp, shown, meaning))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = min(max(len(r[2]) for r in rows), 24)
    return "\n".join(f"{k:<{w0}}  {t:<{w1}}  {d:<{w2}}  {m}".rstrip() for k, t, d, m in rows)
