"""Pooling, the classification head and the contrastive projection head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aasp_jax.models import heads


def encoded(b=3, n=5, d=8):
  k1, k2 = jax.random.split(jax.random.key(0))
  return {'cls': jax.random.normal(k1, (b, d)), 'tokens': jax.random.normal(k2, (b, n, d))}


def test_pooling_matches_numpy_and_ignores_padding():
  enc = encoded()
  valid = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
  tokens = np.asarray(enc['tokens'])
  ref = np.stack([tokens[i][valid[i]].mean(0) for i in range(3)])
  np.testing.assert_allclose(heads.pool(enc, 'mean', jnp.asarray(valid)), ref, atol=1e-6)
  np.testing.assert_allclose(heads.pool(enc, 'cls'), enc['cls'])
  both = heads.pool(enc, 'cls_mean')
  np.testing.assert_allclose(both, np.concatenate([enc['cls'], tokens.mean(1)], -1), atol=1e-6)
  with pytest.raises(ValueError, match='pooling'):
    heads.pool(enc, 'max')


def test_classification_head_starts_at_zero_and_learns_shape():
  enc = encoded()
  head = heads.ClassificationHead(num_classes=4, pooling='mean')
  params = head.init(jax.random.key(0), enc)
  logits = head.apply(params, enc)
  assert logits.shape == (3, 4) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, 0.0)


def test_projection_head_is_unit_norm():
  head = heads.ProjectionHead(hidden_dim=16, out_dim=6)
  x = jax.random.normal(jax.random.key(0), (4, 8))
  z = head.apply(head.init(jax.random.key(1), x), x)
  np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-5)
