"""Experiment-config helpers: variant args, loading, validation.

Experiment files (`experiments/*.py`) define `get_config(arg)` returning an
`ml_collections.ConfigDict` and import nothing from k15 but this module, so
they stay data. `--config experiments/tiny.py:runlocal,variant=control`
passes `"runlocal,variant=control"` as `arg`; `parse_arg` turns it into a
ConfigDict of flags and values.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ConfigError(ValueError, TypeError):
  """A config that cannot run (unknown field, bad type or combination).

  Both a ValueError and a TypeError, so callers catching either (e.g. an
  ill-typed field) still do."""


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """"a=1,b=x,runlocal" -> {a: 1, b: 'x', runlocal: True} (typed by default).

  Keys in `defaults` get the default's type; bare words become True. With
  `defaults`, every key must be one of them: a typo (`runlocl`) or a value
  of the wrong type (`seed=x`, `runlocal=ture`) raises naming the key,
  instead of being silently ignored or read as False.
  """
  out = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, eq, value = part.partition("=")
    key = key.strip()
    if defaults and key not in defaults:
      raise ValueError(f"config arg {key!r} is unknown (known: "
                       f"{', '.join(sorted(defaults))})")
    default = defaults.get(key)
    if not eq:
      if defaults and not isinstance(default, bool):
        raise ValueError(f"config arg {key!r} needs a value: {key}=...")
      out[key] = True
      continue
    try:
      if isinstance(default, bool):
        if value.strip().lower() not in _TRUE + _FALSE:
          raise ValueError(value)
        out[key] = value.strip().lower() in _TRUE
      elif isinstance(default, int):
        out[key] = int(value)
      elif isinstance(default, float):
        out[key] = float(value)
      else:
        out[key] = value
    except ValueError:
      raise ValueError(f"config arg {key}={value!r} should be "
                       f"{type(default).__name__}") from None
  return ml_collections.ConfigDict(out)


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Loads `get_config(arg)` from an experiment file (for notebooks/tests).

  `path` may carry the arg after a colon: "experiments/tiny.py:runlocal".
  """
  if arg is None and ":" in os.path.basename(path):
    path, _, arg = path.rpartition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location("_k15_experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def load_base(path: str, **arg: Any) -> ml_collections.ConfigDict:
  """Another experiment's config, for files that change only a few fields.

  Ablations build on `load_base("experiments/tiny.py", runlocal=True)` and
  so follow the base's tuned values as they change. `path` is taken from
  the repository root (the directory above `k15/`) when it exists there,
  else as given; `arg` becomes the base's variant string (True -> a bare
  word, False -> left out, others -> key=value).
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.isabs(path) and os.path.exists(os.path.join(root, path)):
    path = os.path.join(root, path)
  parts = [k if v is True else f"{k}={v}" for k, v in arg.items()
           if v is not False]
  return load(path, ",".join(parts))


def override(cfg: ml_collections.ConfigDict, **flat: Any
             ) -> ml_collections.ConfigDict:
  """override(cfg, **{"rl.tau": 0.1}) with the same checks as the CLI."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  for dotted, value in flat.items():
    *parents, leaf = dotted.split(".")
    node = cfg
    for name in parents:
      if name not in node:
        raise KeyError(f"config: unknown section {dotted!r}")
      node = node[name]
    if leaf not in node:
      raise KeyError(f"config: unknown field {dotted!r}")
    node[leaf] = value
  return cfg


def _check_type(name: str, value: Any, hint: Any) -> Any:
  """Checks (and mildly coerces: int -> float, list -> tuple, a mapping ->
  a nested config dataclass, e.g. `model.vision`) one field."""
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(hint)
    if value is None and type(None) in args:
      return None
    inner = [a for a in args if a is not type(None)]
    if len(inner) == 1:
      return _check_type(name, value, inner[0])
    return value
  if dataclasses.is_dataclass(hint) and isinstance(hint, type):
    if isinstance(value, hint):
      return value
    if isinstance(value, Mapping):
      return to_dataclass(hint, value, name)
    raise TypeError(f"config field {name}={value!r} should be a section "
                    f"(a dict of {hint.__name__} fields)")
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint in (int, float, str, bool):
    if not isinstance(value, hint) or (hint is int and isinstance(value,
                                                                   bool)):
      raise TypeError(f"config field {name}={value!r} should be "
                      f"{hint.__name__}, got {type(value).__name__}")
    return value
  if origin is tuple:
    if not isinstance(value, (tuple, list)):
      raise TypeError(f"config field {name}={value!r} should be a tuple")
    args = typing.get_args(hint)
    if args and args[-1] is Ellipsis:
      return tuple(_check_type(f"{name}[{i}]", v, args[0])
                   for i, v in enumerate(value))
    return tuple(value)
  return value


def to_dataclass(cls: type, section: Mapping[str, Any] | None, name: str):
  """Builds a frozen dataclass from a config section, naming bad fields.

  Unknown keys and ill-typed values raise with the dotted field name
  (e.g. `model.d_modl`), before any work starts.
  """
  section = dict(section or {})
  if isinstance(section, ml_collections.ConfigDict):
    section = section.to_dict()
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(section) - fields)
  if unknown:
    raise ValueError(f"config: unknown field {name}.{unknown[0]} "
                     f"(known: {', '.join(sorted(fields))})")
  kwargs = {k: _check_type(f"{name}.{k}", v, hints[k])
            for k, v in section.items()}
  try:
    return cls(**kwargs)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config section {name}: {e}") from e


def check_keys(section: Mapping[str, Any], allowed: set[str], name: str
               ) -> None:
  unknown = sorted(set(section) - allowed)
  if unknown:
    raise ValueError(f"config: unknown field {name}.{unknown[0]} "
                     f"(known: {', '.join(sorted(allowed))})")
