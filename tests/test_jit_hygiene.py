"""Every model module built from the config jits, does not retrace, and runs in float32 and bfloat16."""

import chex
import jax
import jax.numpy as jnp
import pytest

from aasp_jax import configuration
from aasp_jax.models import build, heads

B, T, F = 2, 64, 32


def small_model_cfg(stem, predictor, dtype):
  cfg = configuration.load_config(
    f'configs/pretrain.py:variant=tiny,stem={stem},predictor={predictor},target_length=64',
    [
      f'model.dtype={dtype}',
      'model.depth=1',
      'model.width=32',
      'model.num_heads=2',
      'model.mlp_dim=64',
      'model.aape.num_modes=2',
      'model.predictor.width=16',
      'model.predictor.cnn_groups=4',
      'model.predictor.cnn_layers=2',
    ],
  )
  return cfg.model


def run_twice_without_retrace(fn, *args):
  # The wrapper's trace counter is keyed by its code location, shared by every call of this helper.
  chex.clear_trace_counter()
  traced = jax.jit(chex.assert_max_traces(lambda *a: fn(*a), n=1))
  first = traced(*args)
  second = traced(
    *jax.tree.map(lambda a: a + 1 if jnp.issubdtype(a.dtype, jnp.floating) else a, args)
  )
  for out in jax.tree.leaves((first, second)):
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
  return first


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('stem', ['conv', 'aape'])
@pytest.mark.parametrize('predictor', ['cross_attention', 'cnn'])
def test_modules_jit_once_in_both_dtypes(dtype, stem, predictor):
  m = small_model_cfg(stem, predictor, dtype)
  want = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
  x = jax.random.normal(jax.random.key(0), (B, T, F))
  key = jax.random.key(1, impl='rbg')

  stem_module = build.build_stem(m)
  stem_vars = stem_module.init(key, x)
  out = run_twice_without_retrace(stem_module.apply, stem_vars, x)
  assert out.dtype == want and out.shape == (B, T // 16, F // 16, 32)

  encoder = build.build_encoder(m)
  enc_vars = encoder.init(key, x)
  visible = jnp.tile(jnp.arange(0, 8, 2), (B, 1))
  encoded = run_twice_without_retrace(
    lambda v, x, i: encoder.apply(v, x, visible_idx=i, return_layers=True), enc_vars, x, visible
  )
  assert encoded['tokens'].dtype == want and encoded['layers'].shape == (1, B, 4, 32)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(enc_vars))

  predictor_module = build.build_predictor(m)
  masked = jnp.tile(jnp.arange(1, 8, 2), (B, 1))
  grid = (T // 16, F // 16)
  pred_vars = predictor_module.init(key, encoded['tokens'], visible, masked, grid)
  pred = run_twice_without_retrace(
    lambda v, t, i, j: predictor_module.apply(v, t, i, j, grid),
    pred_vars,
    encoded['tokens'],
    visible,
    masked,
  )
  assert pred.shape == (B, 4, 32) and pred.dtype == want

  for head in (
    heads.ClassificationHead(5, 'cls_mean', dtype=want),
    heads.ProjectionHead(16, 8, want),
  ):
    inp = encoded if isinstance(head, heads.ClassificationHead) else encoded['cls']
    head_vars = head.init(key, inp)
    out = run_twice_without_retrace(head.apply, head_vars, inp)
    assert out.dtype == jnp.float32  # logits and embeddings are reduced in float32
