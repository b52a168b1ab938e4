"""Config keys added after checkpoints existed: the one table of what a config without them means.

A checkpoint's saved config lacks the keys added after it was written; it was run with the value
the code used before the key existed. Every reader of such a key (the model builder, the objective,
the optimizer, the exporter, resume's config check) takes its default from `FIELDS`, so the
defaults cannot drift apart. The bottom floor: imports nothing from the package.
"""

from __future__ import annotations

# ANY: the key only matters for a setting that such a checkpoint cannot have (e.g. the Audio-MAE
# decoder's sizes, with predictor.kind != 'mae'); resume compares it with the current value.
ANY = object()

FIELDS = {
  'model.posemb': 'sincos',
  'model.block_norm': 'pre',
  'model.norm_eps': 1e-6,
  'model.init': 'aasp',
  'model.aape.spectrum_floor': 0.0,
  'model.predictor.cnn_input_proj': True,
  'model.predictor.cnn_norm_affine': True,
  'model.predictor.cnn_norm_eps': 1e-6,
  'model.predictor.cnn_mask_fill': 'token',
  'model.predictor.cnn_mask_noise_std': 0.01,
  'model.predictor.mae_attention': ANY,
  'model.predictor.mae_width': ANY,
  'model.predictor.mae_depth': ANY,
  'model.predictor.mae_num_heads': ANY,
  'objective.eat_clips_per_worker': 12,
  'objective.mask_centres': 'coverage',
  'optimizer.adam': 'optax',
  'optimizer.decay_params': 'kernels',
}

# The encoder's later fields by their key under `model` (an exported config.json's encoder; the
# torch-only aasp_torch.py keeps its own copy, checked equal in tests/test_later_fields.py).
MODEL_FIELDS = {key: FIELDS[f'model.{key}'] for key in ('posemb', 'block_norm', 'norm_eps')}


def get(node, dotted: str):
  """The value of `dotted`'s last part in `node` (the config section that holds it), or the
  value a config saved before the key existed means."""
  default = FIELDS[dotted]
  if default is ANY:
    raise KeyError(f'{dotted} has no default; read it only where it applies')
  return node.get(dotted.rpartition('.')[2], default)
