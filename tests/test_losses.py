"""Teacher targets, frame/utterance losses, multi-positive InfoNCE and collapse metrics, each checked
against an independent numpy implementation (loops where they make the definition plain)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aasp_jax import losses

# Jitted once at import: eager dispatch of every primitive is slow on CPU.
infonce = jax.jit(losses.multi_positive_infonce)


def np_instance_norm_tokens(x_bnd, eps=1e-5):
  out = np.empty_like(x_bnd)
  for b in range(x_bnd.shape[0]):
    for c in range(x_bnd.shape[2]):
      col = x_bnd[b, :, c]
      out[b, :, c] = (col - col.mean()) / np.sqrt(col.var() + eps)
  return out


def np_teacher_targets(layers_lbnd, top_k, eps=1e-5):
  layers = layers_lbnd.astype(np.float64)
  avg = np.mean([np_instance_norm_tokens(layers[-j], eps) for j in range(1, top_k + 1)], axis=0)
  mean = avg.mean(-1, keepdims=True)
  return (avg - mean) / np.sqrt(avg.var(-1, keepdims=True) + eps)


def np_infonce(z, ids, temperature):
  r = z.shape[0]
  total, anchors = 0.0, 0
  for i in range(r):
    others = [a for a in range(r) if a != i]
    logits = {a: float(z[i] @ z[a]) / temperature for a in others}
    top = max(logits.values())
    lse = top + np.log(sum(np.exp(v - top) for v in logits.values()))
    positives = [p for p in others if ids[p] == ids[i]]
    if not positives:
      continue
    total += -np.mean([logits[p] - lse for p in positives])
    anchors += 1
  return total / anchors


def unit_rows(seed, r, d):
  z = np.random.default_rng(seed).normal(size=(r, d))
  return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_teacher_targets_match_numpy_and_are_layer_normalised():
  # Uneven per-layer scales and offsets, so skipping the instance norm or the wrong layers shows.
  layers = np.random.default_rng(0).normal(size=(5, 2, 7, 6))
  layers = layers * np.arange(1, 6)[:, None, None, None] + np.arange(6)[None, None, None, :]
  targets_fn = jax.jit(losses.teacher_targets, static_argnums=1)
  out = targets_fn(jnp.asarray(layers), 3)
  assert out.shape == (2, 7, 6) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, np_teacher_targets(layers, 3), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out).mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out).var(-1), 1.0, atol=1e-3)
  # top_k selects the *last* blocks: the first layer alone gives a different answer.
  assert not np.allclose(
    losses.teacher_targets(jnp.asarray(layers), 1), np_teacher_targets(layers[:1], 1), atol=1e-3
  )
  bf16 = targets_fn(jnp.asarray(layers, jnp.bfloat16), 3)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, out, atol=0.1)  # bf16 inputs, float32 statistics.
  with pytest.raises(ValueError, match='top_k'):
    losses.teacher_targets(jnp.asarray(layers), 6)


def make_frame_case(b=2, m=3, n=9, k=4, d=5):
  rng = np.random.default_rng(1)
  targets = rng.normal(size=(b, n, d)) * np.array([1.0, 3.0])[:, None, None]
  idx = np.stack([rng.permutation(n)[:k] for _ in range(b * m)]).astype(np.int32)
  pred = rng.normal(size=(b * m, k, d)) + np.arange(b * m)[:, None, None]
  cls = rng.normal(size=(b * m, d)) * np.arange(1, b * m + 1)[:, None]
  return targets, idx, pred, cls


def test_frame_loss_matches_clone_loop():
  b, m = 2, 3
  targets, idx, pred, _ = make_frame_case(b, m)
  errs = []
  for r in range(b * m):
    clip = r // m  # Clones of clip b are rows b*M .. b*M+M-1.
    for j in range(idx.shape[1]):
      errs.append(np.mean((pred[r, j] - targets[clip, idx[r, j]]) ** 2))
  fn = jax.jit(losses.frame_loss, static_argnums=3)
  got = fn(jnp.asarray(pred), jnp.asarray(targets), jnp.asarray(idx), m)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(got, np.mean(errs), rtol=1e-5)
  exact = np.stack([targets[r // m][idx[r]] for r in range(b * m)])
  assert float(fn(jnp.asarray(exact), jnp.asarray(targets), jnp.asarray(idx), m)) == 0.0
  with pytest.raises(ValueError, match='multiple'):
    losses.frame_loss(jnp.asarray(pred), jnp.asarray(targets), jnp.asarray(idx), 4)


def test_utterance_loss_matches_clone_loop():
  b, m = 2, 3
  targets, _, _, cls = make_frame_case(b, m)
  ref = np.mean([np.mean((cls[r] - targets[r // m].mean(0)) ** 2) for r in range(b * m)])
  fn = jax.jit(losses.utterance_loss, static_argnums=2)
  np.testing.assert_allclose(fn(jnp.asarray(cls), jnp.asarray(targets), m), ref, rtol=1e-5)
  exact = np.repeat(targets.mean(1), m, axis=0)
  np.testing.assert_allclose(fn(jnp.asarray(exact), jnp.asarray(targets), m), 0.0, atol=1e-12)


@pytest.mark.parametrize('m', [2, 3, 4])
@pytest.mark.parametrize('temperature', [0.05, 0.1, 1.0])
def test_infonce_matches_numpy_loop(m, temperature):
  b = 3
  z = unit_rows(10 * m, b * m, 8)
  ids = losses.clip_ids(b, m)
  got = infonce(jnp.asarray(z, jnp.float32), ids, temperature)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_infonce(z, np.asarray(ids), temperature), rtol=1e-4)


def test_clip_ids_layout_and_single_clone_rejected():
  np.testing.assert_array_equal(losses.clip_ids(2, 3), [0, 0, 0, 1, 1, 1])
  with pytest.raises(ValueError, match='num_clones'):
    losses.clip_ids(4, 1)
  with pytest.raises(ValueError, match='temperature'):
    losses.multi_positive_infonce(jnp.ones((4, 2)), losses.clip_ids(2, 2), 0.0)


def test_infonce_permutation_invariant():
  b, m = 4, 3
  z = jnp.asarray(unit_rows(1, b * m, 6), jnp.float32)
  ids = losses.clip_ids(b, m)
  perm = np.random.default_rng(0).permutation(b * m)
  base = infonce(z, ids, 0.1)
  np.testing.assert_allclose(infonce(z[perm], ids[perm], 0.1), base, rtol=1e-6)
  # Permuting rows without their ids changes the positives, so the loss must move.
  assert abs(float(infonce(z[perm], ids, 0.1)) - float(base)) > 1e-3


def test_infonce_decreases_when_clones_pulled_together():
  b, m, d = 4, 3, 16
  z = unit_rows(2, b * m, d)
  centres = z.reshape(b, m, d).mean(1)
  ids = losses.clip_ids(b, m)
  values = []
  for alpha in (0.0, 0.5, 0.9):
    pulled = (1 - alpha) * z + alpha * np.repeat(centres, m, axis=0)
    pulled /= np.linalg.norm(pulled, axis=1, keepdims=True)
    values.append(float(infonce(jnp.asarray(pulled), ids, 0.1)))
  assert values[0] > values[1] > values[2], values


def test_infonce_bf16_is_finite_float32_and_close():
  z = unit_rows(3, 12, 32)
  ids = losses.clip_ids(3, 4)
  ref = infonce(jnp.asarray(z, jnp.float32), ids, 0.1)
  got = infonce(jnp.asarray(z, jnp.bfloat16), ids, 0.1)
  assert got.dtype == jnp.float32 and np.isfinite(got)
  np.testing.assert_allclose(got, ref, rtol=2e-2)


def test_effective_rank_isotropic_rank_one_and_random():
  n, d = 40, 8
  rng = np.random.default_rng(4)
  a = rng.normal(size=(n, d))
  q, _ = np.linalg.qr(a - a.mean(0))  # Columns are orthonormal and mean-free: all sigma equal.
  rank = jax.jit(losses.effective_rank)
  np.testing.assert_allclose(rank(jnp.asarray(3.0 * q + 5.0, jnp.float32)), d, atol=1e-4)
  rank_one = np.outer(rng.normal(size=n), rng.normal(size=d)) + rng.normal(size=d)
  np.testing.assert_allclose(rank(jnp.asarray(rank_one, jnp.float32)), 1.0, atol=1e-4)
  x = rng.normal(size=(n, d)) * np.linspace(0.1, 3.0, d)
  s = np.linalg.svd(x - x.mean(0), compute_uv=False)
  p = s / s.sum()
  np.testing.assert_allclose(
    rank(jnp.asarray(x, jnp.float32)), np.exp(-np.sum(p * np.log(p))), rtol=1e-5
  )


def test_variance_is_mean_channel_std():
  x = np.random.default_rng(5).normal(size=(3, 4, 6)) * np.arange(1, 7)
  ref = np.mean([np.sqrt(x[..., c].var() + 1e-6) for c in range(6)])
  np.testing.assert_allclose(jax.jit(losses.variance)(jnp.asarray(x, jnp.float32)), ref, rtol=1e-5)
  np.testing.assert_allclose(losses.variance(jnp.ones((5, 3))), 1e-3, rtol=1e-4)


def test_gradients_are_finite():
  targets, idx, pred, cls = make_frame_case()
  layers = np.random.default_rng(6).normal(size=(4, 2, 9, 5))
  # A constant channel makes the instance-norm variance zero: eps must keep it finite.
  layers[:, :, :, 0] = 1.0
  ids = losses.clip_ids(3, 2)
  inputs = {
    'layers': layers,
    'pred': pred,
    'targets': targets,
    'cls': cls,
    'same_z': np.tile([[0.6, 0.8, 0.0]], (6, 1)),  # Identical embeddings: every logit ties.
    'z': unit_rows(7, 6, 3),
    'emb': np.random.default_rng(8).normal(size=(10, 4)),
    'flat': np.ones((5, 3)),  # Zero variance: the sqrt floor must keep the gradient finite.
  }
  inputs = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
  terms = {
    # Cubed, because the sum of a layer-normalised output has a zero gradient by construction.
    'teacher': lambda x: jnp.sum(losses.teacher_targets(x['layers'], 2) ** 3),
    'frame': lambda x: losses.frame_loss(x['pred'], x['targets'], jnp.asarray(idx), 3),
    'utterance': lambda x: losses.utterance_loss(x['cls'], x['targets'], 3),
    'infonce_same': lambda x: losses.multi_positive_infonce(x['same_z'], ids, 0.1),
    'infonce': lambda x: losses.multi_positive_infonce(x['z'], ids, 0.05),
    'rank': lambda x: losses.effective_rank(x['emb']),
    'variance': lambda x: losses.variance(x['flat']),
  }
  # One jit for every gradient: a compile per loss (or eager grad) dominates the test's runtime.
  grads = jax.jit(lambda x: {name: jax.grad(fn)(x) for name, fn in terms.items()})(inputs)
  for name, tree in grads.items():
    leaves = jax.tree.leaves(tree)
    assert all(np.all(np.isfinite(g)) for g in leaves), name
    # A constant input is a stationary point of the std; every other term must pass a signal.
    assert name == 'variance' or any(np.any(g != 0) for g in leaves), name
