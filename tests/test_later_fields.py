"""The one table of keys added after checkpoints existed (aasp_jax/later_fields.py): every reader
of such a key takes its default from it, and the defaults are what AaSP's configs run today."""

import json
import os

from aasp_jax import configuration, later_fields
from aasp_jax.export.hf import aasp_torch
from aasp_jax.models import build
from aasp_jax.train import objective

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flat(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _config(*overrides):
  return configuration.load_config(os.path.join(REPO, 'configs', 'pretrain.py'), list(overrides))


# Later keys whose value AaSP changed when they were added (the old value is the default).
CHANGED = {'model.aape.spectrum_floor': 1e-2}


def test_each_later_key_exists_and_its_default_is_what_aasp_runs_today():
  flat = _flat(json.loads(_config().to_json()))
  for key, default in later_fields.FIELDS.items():
    assert key in flat, f'{key} is not a config key'
    if default is not later_fields.ANY:
      assert flat[key] == CHANGED.get(key, default), key


def test_torch_only_reader_keeps_the_same_encoder_defaults():
  # aasp_torch.py travels alone into export folders, so it holds its own copy.
  assert aasp_torch._MODEL_DEFAULTS == later_fields.MODEL_FIELDS


def test_a_config_saved_without_the_later_keys_builds_what_it_ran():
  """Every later key deleted from a non-default config: each reader falls back to the table, so
  the model, objective and optimizer equal those of AaSP's defaults, not of the config's values."""
  changed = _config(
    'model.posemb=sincos_mae', 'model.block_norm=post', 'model.norm_eps=1e-5', 'model.init=eat',
    'model.predictor.kind=cnn', 'model.predictor.cnn_input_proj=false',
    'model.predictor.cnn_norm_affine=false', 'model.predictor.cnn_norm_eps=1e-5',
    'model.predictor.cnn_mask_fill=noise', 'model.predictor.cnn_mask_noise_std=0.5',
    'objective.eat_clips_per_worker=3', 'objective.mask_centres=eat', 'optimizer.adam=fairseq',
    'optimizer.decay_params=all', 'model.stem=aape', 'model.aape.spectrum_floor=0.5',
  )
  reference = _config('model.predictor.kind=cnn', 'model.stem=aape', 'model.aape.spectrum_floor=0')
  for key, default in later_fields.FIELDS.items():
    if default is later_fields.ANY:
      continue
    *parents, leaf = key.split('.')
    node = changed
    for part in parents:
      node = node[part]
    with node.unlocked():
      del node[leaf]
  assert build.build_encoder(changed.model) == build.build_encoder(reference.model)
  assert build.build_predictor(changed.model) == build.build_predictor(reference.model)
  assert objective.AaSPObjective.from_config(changed) == objective.AaSPObjective.from_config(
    reference
  )
  assert later_fields.get(changed.optimizer, 'optimizer.adam') == 'optax'
  assert later_fields.get(changed.optimizer, 'optimizer.decay_params') == 'kernels'
