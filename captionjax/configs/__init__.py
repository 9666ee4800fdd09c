"""Experiment configs: `get_config()` in a Python file, by name or path.

`load_config("default")` reads `captionjax/configs/default.py`; any other
value is a path to a config file. Overrides are `--config.FIELD=VALUE`
strings (nested with dots); VALUE is a Python literal or a bare string, and
must match the field's type. An unknown field is an error naming it.
"""

import ast
import importlib.util
import os

import ml_collections

CONFIG_DIR = os.path.dirname(__file__)


class ConfigError(ValueError):
  """A bad --config or --config.FIELD; str(e) names it."""


def config_path(name_or_file: str) -> str:
  if os.path.exists(name_or_file):
    return name_or_file
  path = os.path.join(CONFIG_DIR, f"{name_or_file}.py")
  if os.path.exists(path):
    return path
  names = sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                 if f.endswith(".py") and not f.startswith("_"))
  raise ConfigError(f"--config={name_or_file}: no such file or config name "
                    f"(names: {', '.join(names)})")


def load_config(name_or_file: str = "default", overrides=()) -> ml_collections.ConfigDict:
  path = config_path(name_or_file)
  spec = importlib.util.spec_from_file_location("_captionjax_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path}: has no get_config()")
  config = module.get_config()
  for item in overrides:
    apply_override(config, item)
  return config


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  """Applies one 'FIELD=VALUE' (FIELD may be dotted) to `config` in place."""
  if "=" not in item:
    raise ConfigError(f"--config.{item}: expected --config.FIELD=VALUE")
  key, text = item.split("=", 1)
  *parents, leaf = key.split(".")
  node = config
  for i, p in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      raise ConfigError(f"--config.{key}: unknown config field {'.'.join(parents[:i + 1])!r}")
    node = node[p]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ConfigError(f"--config.{key}: unknown config field {key!r}")
  old = node[leaf]
  value = _parse_value(text)
  if isinstance(old, bool):
    if not isinstance(value, bool):
      if str(value).lower() in ("true", "1", "yes"):
        value = True
      elif str(value).lower() in ("false", "0", "no"):
        value = False
      else:
        raise ConfigError(f"--config.{key}: expected true or false, got {text!r}")
  elif isinstance(old, float) and isinstance(value, int):
    value = float(value)
  elif isinstance(old, str) and not isinstance(value, str):
    value = text
  elif isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  if old is not None and not isinstance(value, type(old)):
    raise ConfigError(f"--config.{key}: expected {type(old).__name__}, got {text!r}")
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"--config.{key}: {e}") from None
