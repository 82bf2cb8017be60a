"""One source for a script's options: a frozen dataclass whose fields become its absl flags.

    @dataclasses.dataclass(frozen=True)
    class SFTConfig:
        out_dir: str = options.field(None, "run directory")
        lr: float = options.field(3e-4, "peak learning rate")
        tokens: int = options.field(0, "token budget, e.g. 20M", parse=parse_bytes)

    options.define_flags(SFTConfig)            # at import of the script, before app.run
    cfg = options.from_flags(SFTConfig)        # in main(): flags -> a validated config
    options.save_config(cfg, out_dir)          # out_dir/config.json

A new knob is one field. Types come from the annotations: bool, int, float, str (an enum when
`choices` is given), Optional[...] of those (the string 'none' gives None), and anything else
through `parse` (a str -> value function; the flag is then a string). Besides absl's own
`--flagfile=FILE`, every script takes `--config=RUN/config.json`: the run's saved options as
defaults, which flags given on the command line override, so `--config=RUN/config.json` alone
reproduces RUN.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import typing
from typing import Any, Callable, Optional, Sequence

from absl import flags

CONFIG_FILE = "config.json"
_NONE = ("none", "null")


def need(cond: Any, msg: str) -> None:
    """An option check in a config's __post_init__: a false `cond` is the user's error `msg`
    (a ValueError, printed as one line by common.cli)."""
    if not cond:
        raise ValueError(msg)


def field(default: Any, help: str, *, parse: Optional[Callable[[str], Any]] = None,
          choices: Optional[Sequence[str]] = None, flag: bool = True) -> Any:
    """A dataclass field with its flag's help text; `flag=False` keeps it out of the flags."""
    meta = {"help": help, "parse": parse, "choices": tuple(choices) if choices else None, "flag": flag}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for a sequence default (configs are frozen)")
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp) -> tuple[Any, bool]:
    """(X, optional) for X or Optional[X]."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("flag", True)]


def define_flags(cls, *, flag_values=flags.FLAGS) -> None:
    """Defines one absl flag per field of the dataclass `cls` (skipping names already defined, so
    scripts that import each other agree), plus --config."""
    if "config" not in flag_values:
        flags.DEFINE_string("config", None, "a run's config.json: its options are the defaults; flags given "
                            "on the command line override them", flag_values=flag_values)
    for f, tp in _fields(cls):
        if f.name in flag_values:
            continue
        help_ = f.metadata.get("help") or f.name
        default = None if f.default is dataclasses.MISSING else f.default
        base, optional = _base_type(tp)
        kw = dict(flag_values=flag_values)
        if f.metadata.get("parse") or (base not in (bool, int, float, str)):
            flags.DEFINE_string(f.name, None if default is None else _to_text(default), help_, **kw)
        elif f.metadata.get("choices"):  # absl enums are strings; _convert restores an int's type
            flags.DEFINE_enum(f.name, None if default is None else str(default),
                              [str(c) for c in f.metadata["choices"]], help_, **kw)
        elif optional:
            flags.DEFINE_string(f.name, None if default is None else str(default), help_ + " ('none' = unset)", **kw)
        elif base is bool:
            flags.DEFINE_bool(f.name, default, help_, **kw)
        elif base is int:
            flags.DEFINE_integer(f.name, default, help_, **kw)
        elif base is float:
            flags.DEFINE_float(f.name, default, help_, **kw)
        else:
            flags.DEFINE_string(f.name, default, help_, **kw)


def _to_text(v: Any) -> str:
    """A default as flag text: (('a', 1), ('b', 2)) -> 'a=1,b=2'; other sequences comma-joined."""
    if isinstance(v, (tuple, list)):
        if all(isinstance(x, (tuple, list)) and len(x) == 2 for x in v):
            return ",".join(f"{a}={b}" for a, b in v)
        return ",".join(map(str, v))
    return str(v)


def _convert(name: str, raw: Any, tp, parse) -> Any:
    """A flag's (or config.json's) raw value -> the field's type; ValueError naming the flag."""
    base, optional = _base_type(tp)
    if raw is None:
        return None
    if isinstance(raw, str) and optional and raw.strip().lower() in _NONE:
        return None
    try:
        if parse is not None and isinstance(raw, str):
            return parse(raw)
        if base is bool:
            if isinstance(raw, str):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"expected true/false, got {raw!r}")
                return raw.lower() in ("true", "1")
            return bool(raw)
        if base in (int, float, str):
            return base(raw)
        if isinstance(raw, list):  # from JSON
            return tuple(tuple(x) if isinstance(x, list) else x for x in raw)
        return raw
    except ValueError as e:
        raise ValueError(f"--{name}: {e}") from None


def from_flags(cls, flag_values=flags.FLAGS, **overrides):
    """The dataclass built from the flags (after app.run parsed them).

    Precedence: `overrides` > flags given on the command line > --config's values > defaults.
    Errors (a bad value, a dataclass __post_init__ check) are ValueErrors naming the flag.
    """
    base: dict = {}
    cfg_path = flag_values["config"].value if "config" in flag_values else None
    if cfg_path:
        base = load_config_json(cfg_path)
    values = {}
    for f, tp in _fields(cls):
        if f.name not in flag_values:
            continue
        fv = flag_values[f.name]
        raw = fv.value if (fv.present or f.name not in base) else base[f.name]
        values[f.name] = _convert(f.name, raw, tp, f.metadata.get("parse"))
    values.update(overrides)
    return cls(**values)


def to_json(cfg) -> dict:
    """The config as JSON-able values (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def load_config_json(path) -> dict:
    p = pathlib.Path(path)
    if p.is_dir():
        p = p / CONFIG_FILE
    if not p.is_file():
        raise ValueError(f"--config: {p} not found")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--config: {p} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"--config: {p} must hold a JSON object")
    return d


def save_config(cfg, out_dir, **extra) -> pathlib.Path:
    """Writes out_dir/config.json (atomically): the options that reproduce the run, plus `extra`
    (derived values such as total_steps, for readers; --config ignores unknown keys)."""
    from experiments import common

    path = pathlib.Path(out_dir) / CONFIG_FILE
    common.save_json(path, {**to_json(cfg), **extra})
    return path
