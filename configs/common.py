"""configs.common: the `:arg` parser and the ModelConfig <-> ConfigDict bridge shared by every config file."""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from bitnet_jax.model import ModelConfig


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `"name,key=value,flag"` into a ConfigDict typed by `defaults` (big_vision's convention).

  The first bare word sets the first default's key (the variant); a bare `key` sets a boolean to True. Unknown
  keys raise ValueError listing the valid ones.
  """
  out = ml_collections.ConfigDict(defaults)
  first = next(iter(defaults))
  for i, token in enumerate(t for t in (arg or "").split(",") if t):
    key, sep, value = token.partition("=")
    if not sep:
      if i == 0 and not isinstance(defaults[first], bool) and key not in defaults:
        key, value = first, token
      elif isinstance(defaults.get(key), bool):
        value = "true"
      else:
        raise ValueError(f"config arg {token!r}: expected key=value (valid keys: {', '.join(defaults)})")
    if key not in defaults:
      raise ValueError(f"config arg has unknown key {key!r}; valid keys: {', '.join(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config arg {key}={value!r}: expected a boolean")
      out[key] = value.lower() in ("true", "1")
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        article = "an" if kind.__name__[0] in "aeiou" else "a"
        raise ValueError(f"config arg {key}={value!r}: expected {article} {kind.__name__}") from None
  return out


_PLACEHOLDER_TYPES = {"n_kv_heads": int, "act_bits": int, "linear_norm": str, "block_norm": str, "dtype": str}


def model_config_dict(cfg: ModelConfig) -> ml_collections.ConfigDict:
  """A resolved ModelConfig as a ConfigDict; None fields become typed placeholders so the CLI can set them."""
  out = ml_collections.ConfigDict()
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    if value is None:
      value = config_dict.placeholder(_PLACEHOLDER_TYPES.get(field.name, str))
    out[field.name] = value
  return out

