"""Loading, overriding and validating configs, so that typos and impossible shapes fail before any
compilation.

Configs are `get_config(arg)` files returning a locked `ml_collections.ConfigDict`. Overrides are
'dotted.key=value' strings, typed by the existing field. Run as a module to inspect a config:

  python -m aasp_jax.configuration configs/pretrain.py:variant=tiny --set model.depth=2
"""

import argparse
import ast
import importlib.util
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict, FieldReference

from aasp_jax import later_fields
from aasp_jax.models import build

CHOICES = {
  'model.stem': build.STEMS,
  'model.predictor.kind': build.PREDICTORS,
  'model.aape.window': ('two_sided', 'one_sided'),
  'model.aape.phase': ('analytic', 'literal'),
  'model.aape.lambda_mode': ('adaptive', 'fixed'),
  'model.aape.fusion': ('gate', 'concat'),
  'model.dtype': tuple(build.DTYPES),
  'model.param_dtype': tuple(build.DTYPES),
  'model.attention_impl': ('xla', 'cudnn'),
}


# Keys added after checkpoints existed, with the value a saved config without them was run with
# (aasp_jax/later_fields.py holds the one table; resume's config check reads it from here).
ANY = later_fields.ANY
LATER_FIELDS = later_fields.FIELDS


class ConfigError(ValueError):
  """A config that cannot run; the message names the key and what to change."""


def _import_config_module(path: str):
  if not os.path.isfile(path):
    raise ConfigError(f'Config file {path!r} does not exist.')
  # Configs import their siblings as `configs.common`; make the folder above `configs/` importable.
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location(f'_aasp_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'Config file {path!r} has no get_config(arg) function.')
  return module


def _get(cfg: ConfigDict, dotted: str):
  node = cfg
  for part in dotted.split('.'):
    if not isinstance(node, ConfigDict) or part not in node:
      parent = dotted.rpartition('.')[0] or '<root>'
      valid = sorted(node.keys()) if isinstance(node, ConfigDict) else []
      raise ConfigError(f'Unknown config key {dotted!r}; keys under {parent!r} are {valid}.')
    node = node[part]
  return node


def _parse_value(dotted: str, old, text: str):
  field_type = old.get_type() if isinstance(old, FieldReference) else type(old)
  if field_type in (tuple, list):
    raise ConfigError(
      f'Config key {dotted!r} holds a {field_type.__name__}; edit it in the config file.'
    )
  if field_type is bool:
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ConfigError(f'Config key {dotted!r} is a bool; got {text!r} (use true or false).')
    return text.lower() in ('true', '1')
  if field_type is str:
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise ConfigError(
      f'Cannot parse {text!r} for config key {dotted!r} ({field_type.__name__}).'
    ) from e
  if field_type is float and isinstance(value, int):
    value = float(value)
  if field_type in (int, float) and not isinstance(value, field_type):
    raise ConfigError(f'Config key {dotted!r} needs a {field_type.__name__}; got {text!r}.')
  return value


def apply_overrides(cfg: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
  """Applies 'a.b.c=value' overrides to a locked config; unknown keys and bad types raise."""
  for item in overrides:
    dotted, sep, text = item.partition('=')
    if not sep:
      raise ConfigError(f'Override {item!r} is not of the form key=value.')
    dotted = dotted.strip().removeprefix('config.')
    old = _get(cfg, dotted)
    if isinstance(old, ConfigDict):
      raise ConfigError(
        f'Config key {dotted!r} is a section; override one of {sorted(old.keys())}.'
      )
    parent_key, _, leaf = dotted.rpartition('.')
    parent = _get(cfg, parent_key) if parent_key else cfg
    # The reference carries the declared type, also for declared-but-unset fields (value None).
    parent[leaf] = _parse_value(dotted, parent.get_ref(leaf), text)
  return cfg


def validate(cfg: ConfigDict) -> ConfigDict:
  """Checks choices and shape arithmetic that would otherwise fail deep inside compilation."""
  for dotted, choices in CHOICES.items():
    value = _get(cfg, dotted)
    if value not in choices:
      raise ConfigError(f'Config key {dotted!r} is {value!r}; choose one of {list(choices)}.')
  for key in ('global_batch', 'total_steps'):
    if key in cfg and cfg[key] <= 0:
      raise ConfigError(f'{key}={cfg[key]} must be positive; set --config.{key} to a number > 0.')
  m = cfg.model
  # Encoder options for imported weights; configs written before they existed hold the defaults.
  for key, choices in (('posemb', build.POSEMBS), ('block_norm', build.BLOCK_NORMS)):
    if m.get(key, choices[0]) not in choices:
      raise ConfigError(f'Config key model.{key!r} is {m[key]!r}; choose one of {list(choices)}.')
  if not 0.0 < float(later_fields.get(m, 'model.norm_eps')) < 1.0:
    raise ConfigError(f'model.norm_eps={m.norm_eps} must be a small positive number (e.g. 1e-6).')
  if m.width % m.num_heads:
    raise ConfigError(
      f'model.width={m.width} is not divisible by model.num_heads={m.num_heads}; change one of them.'
    )
  if m.width % 4:
    raise ConfigError(f'model.width={m.width} must be a multiple of 4 (2-D sin-cos positions).')
  if m.predictor.width % m.predictor.num_heads:
    raise ConfigError(
      f'model.predictor.width={m.predictor.width} is not divisible by '
      f'model.predictor.num_heads={m.predictor.num_heads}.'
    )
  if m.aape.kernel_size % 2 == 0:
    raise ConfigError(
      f'model.aape.kernel_size={m.aape.kernel_size} must be odd (a centred kernel).'
    )
  if 'frontend' in cfg:
    preset = frontend_preset(cfg)
    t = cfg.frontend.target_length
    if t % m.patch_t:
      raise ConfigError(
        f'frontend.target_length={t} is not a multiple of model.patch_t={m.patch_t}; '
        f'use {t - t % m.patch_t or m.patch_t}.'
      )
    if preset.num_mel_bins % m.patch_f:
      raise ConfigError(
        f'The {cfg.frontend.preset!r} preset has {preset.num_mel_bins} mel bins, not a multiple of '
        f'model.patch_f={m.patch_f}.'
      )
    if t // m.patch_t > m.max_time_patches:
      remedy = (
        f'a learned position table (model.posemb=learned) has exactly that many rows: set '
        f'frontend.target_length <= {m.max_time_patches * m.patch_t}'
        if m.get('posemb') == 'learned'
        else 'raise model.max_time_patches'
      )
      raise ConfigError(
        f'frontend.target_length={t} gives {t // m.patch_t} time patches but '
        f'model.max_time_patches={m.max_time_patches}; {remedy}.'
      )
  return cfg


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """Loads 'path/to/config.py[:arg]', locks it, applies overrides and validates it."""
  path, _, arg = spec.partition(':')
  cfg = _import_config_module(path).get_config(arg or None)
  cfg.lock()
  apply_overrides(cfg, overrides)
  return validate(cfg)


def frontend_preset(cfg: ConfigDict):
  """The front-end preset named by `frontend.preset`, with the config's length and statistics."""
  from aasp_jax.audio import presets

  overrides = {'target_length': cfg.frontend.target_length}
  if cfg.frontend.norm_mean is not None:
    overrides['norm_mean'] = cfg.frontend.norm_mean
  if cfg.frontend.norm_std is not None:
    overrides['norm_std'] = cfg.frontend.norm_std
  return presets.get_preset(cfg.frontend.preset, **overrides)


def input_shape(cfg: ConfigDict, batch: int = 1) -> tuple[int, int, int]:
  """[batch, frames, mel bins] of the log-mel the model sees."""
  preset = frontend_preset(cfg)
  return (batch, preset.target_length, preset.num_mel_bins)


def abstract_params(cfg: ConfigDict):
  """Initialises encoder and predictor abstractly (no FLOPs, no memory) and returns their shapes."""
  encoder = build.build_encoder(cfg.model)
  predictor = build.build_predictor(cfg.model)
  shape = input_shape(cfg)
  n_time, n_freq = shape[1] // cfg.model.patch_t, shape[2] // cfg.model.patch_f
  n_vis = max(1, n_time * n_freq // 5)

  def init(rng):
    x = jnp.zeros(shape, jnp.float32)
    enc_vars = encoder.init(rng, x)
    vis = jnp.zeros((1, n_vis, cfg.model.width), jnp.float32)
    idx = jnp.zeros((1, n_vis), jnp.int32)
    pred_vars = predictor.init(rng, vis, idx, idx, (n_time, n_freq))
    return {'encoder': enc_vars['params'], 'predictor': pred_vars['params']}

  return jax.eval_shape(init, jax.random.key(0))


def count_params(tree) -> int:
  import numpy as np

  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def main(argv=None):
  parser = argparse.ArgumentParser(
    description='Print a resolved aasp-jax config and its model size.'
  )
  parser.add_argument(
    'config', help='path/to/config.py[:arg], e.g. configs/pretrain.py:variant=tiny'
  )
  parser.add_argument('--set', action='append', default=[], help='override, e.g. model.depth=6')
  args = parser.parse_args(argv)
  cfg = load_config(args.config, args.set)
  print(cfg)
  shapes = jax.tree.map(lambda x: getattr(x, 'value', x), abstract_params(cfg))
  for part, tree in shapes.items():
    print(f'{part}: {count_params(tree):,} parameters')


if __name__ == '__main__':
  main()
