"""YAML files fill typed dataclasses; dotted `key=value` overrides go on top; the resolved config is saved.

    cfg = load_config(TrainConfig, "configs/multi30k_align.yaml", ["lr=3e-4", "model_config.d_model=256"])

Unknown keys are errors that name the valid ones (a typo must never be silently ignored).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


def _parse_value(text: str):
    """`key=value` values are YAML scalars or flow collections: 3e-4, true, null, [1, 2], {a: 1}."""
    value = yaml.safe_load(text)
    return text if value is None and text.strip().lower() not in ("null", "~", "none", "") else value


def _set_dotted(target: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = target.get(part)
        if node is None:
            node = target[part] = {}
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a mapping")
        target = node
    target[parts[-1]] = value


def _coerce(value, annotation):
    """YAML reads 3e-4 as a string and 1 as an int; make values match the field's declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except (TypeError, ValueError):
                continue
        return value
    if annotation is str and isinstance(value, bool):
        return "yes" if value else "no"  # YAML 1.1 reads the word `no` (mixed_precision: no) as false
    if annotation is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, str):
        return int(value)
    if annotation is bool and isinstance(value, str):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(value)
    return value


def from_dict(cls, data: dict):
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) for {cls.__name__}: {', '.join(unknown)}. Valid keys: {', '.join(sorted(known))}"
        )
    return cls(**{k: _coerce(v, hints[k]) for k, v in data.items()})


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None, **defaults):
    """Builds `cls` from a YAML file, keyword defaults and `key=value` overrides, in that order of precedence."""
    data: dict = dict(defaults)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys")
        data.update(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        _set_dotted(data, key.strip(), _parse_value(text))
    return from_dict(cls, data)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_from_cli(cls, parser, argv=None):
    """Adds `--config` and `key=value` overrides to `parser`, parses `argv`, and builds `cls`.

    Returns (args, config). A bad config file, key or value exits with status 2 and a one-line message."""
    parser.add_argument("--config", help=f"YAML file of {cls.__name__} fields")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys reach into mappings)")
    args = parser.parse_intermixed_args(argv)
    try:
        return args, load_config(cls, args.config, args.overrides)
    except (ConfigError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
