"""Experiment configs: `get_config()` in a Python file, by name or path.

`load_config("default")` reads `captionjax/configs/default.py`; any other
value is a path to a config file. Overrides are `--config.FIELD=VALUE`
strings (nested with dots); VALUE is a Python literal or a bare string, and
must match the field's type. An unknown field is an error naming it.
"""

import ast
import importlib.util
import math
import os

import ml_collections

CONFIG_DIR = os.path.dirname(__file__)


class ConfigError(ValueError):
  """A bad --config or --config.FIELD; str(e) names it."""


def names() -> list:
  """The config names: the files of captionjax/configs."""
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                if f.endswith(".py") and not f.startswith("_"))


def config_path(name_or_file: str) -> str:
  """A config name's file, else the given path (a file, not a folder)."""
  path = os.path.join(CONFIG_DIR, f"{name_or_file}.py")
  is_name = name_or_file in names()
  if is_name and not (os.sep in name_or_file or name_or_file.endswith(".py")):
    return path
  if os.path.isfile(name_or_file):
    return name_or_file
  if os.path.isdir(name_or_file):
    raise ConfigError(f"--config={name_or_file}: a directory, not a config file "
                      f"(names: {', '.join(names())})")
  raise ConfigError(f"--config={name_or_file}: no such file or config name "
                    f"(names: {', '.join(names())})")


def load_config(name_or_file: str = "default", overrides=()) -> ml_collections.ConfigDict:
  """The config `get_config()` returns, with `overrides` applied and its values checked."""
  path = config_path(name_or_file)
  spec = importlib.util.spec_from_file_location("_captionjax_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"{path}:{e.lineno}: syntax error in the config file ({e.msg})") from None
  except Exception as e:  # pylint: disable=broad-except  (anything a config file raises)
    raise ConfigError(f"{path}: the config file failed to load "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path}: has no get_config()")
  config = module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() returned a {type(config).__name__}, "
                      "not an ml_collections.ConfigDict")
  for item in overrides:
    apply_override(config, item)
  validate(config)
  return config


# Fields that must be at least this (a missing field is not checked).
_MINIMUM = {
    "batch_size": 1, "seq_per_img": 1, "eval_batch_size": 1, "beam_size": 1,
    "num_train_steps": 0, "cnn_pretrain_steps": 0, "keep_checkpoints": 1,
    "log_every_steps": 1, "checkpoint_every_steps": 1, "eval_every_steps": 1,
    "eval_num_images": 1, "crop_size": 0, "learning_rate_decay_every": 1,
    "model.rnn_size": 1, "model.input_encoding_size": 1, "model.num_layers": 1,
    "shapes.image_size": 16, "shapes.num_train": 1, "shapes.num_val": 0,
    "shapes.num_test": 0, "shapes.num_novel": 0, "min_length": 0, "num_groups": 1, "top_k": 0,
    "scst_steps": 0, "scst_samples": 1,
}
_UNIT_INTERVAL = ("model.drop_prob_lm",)  # in [0, 1)
_CHOICES = {"dtype": ("float32", "bfloat16"), "scst_baseline": ("greedy", "mean")}  # one of these
_FINITE_NONNEGATIVE = ("learning_rate", "cnn_learning_rate", "cnn_pretrain_learning_rate",
                       "grad_clip", "length_penalty", "cnn_weight_decay", "epsilon",
                       "temperature", "diversity_lambda", "top_p", "scst_learning_rate",
                       "scst_hallucination_penalty", "scst_exact_bonus", "scst_xe_weight")


def _get(config, key):
  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return None
    node = node[part]
  return node


def validate(config) -> None:
  """ConfigError naming the first field whose value cannot work."""
  for key, low in _MINIMUM.items():
    v = _get(config, key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
      raise ConfigError(f"config.{key}={v!r}: must be an integer >= {low}")
  for key in _UNIT_INTERVAL:
    v = _get(config, key)
    if v is not None and not (isinstance(v, (int, float)) and 0 <= v < 1):
      raise ConfigError(f"config.{key}={v!r}: must be in [0, 1)")
  for key in _FINITE_NONNEGATIVE:
    v = _get(config, key)
    if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
      raise ConfigError(f"config.{key}={v!r}: must be a finite number >= 0")
  for key, allowed in _CHOICES.items():
    v = _get(config, key)
    if v is not None and v not in allowed:
      raise ConfigError(f"config.{key}={v!r}: must be one of {', '.join(allowed)}")
  if _get(config, "model.kind") == "ranking" and _get(config, "scst_steps"):
    raise ConfigError(f"config.scst_steps={config.scst_steps}: self-critical training needs a "
                      "captioner, not model.kind='ranking'")
  _validate_decoding(config)


def _validate_decoding(config) -> None:
  """The final test's decoding fields together (decode.DecodeOptions' rules:
  num_groups divides beam_size, top_p in (0, 1], ...)."""
  from captionjax import decode  # pylint: disable=g-import-not-at-top
  try:
    decode.DecodeOptions.from_config(config)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.{e}") from None


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
  if isinstance(value, bool) and not isinstance(old, bool):  # True is an int to Python
    raise ConfigError(f"--config.{key}: expected {type(old).__name__}, got {text!r}")
  if old is not None and not isinstance(value, type(old)):
    raise ConfigError(f"--config.{key}: expected {type(old).__name__}, got {text!r}")
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"--config.{key}: {e}") from None
