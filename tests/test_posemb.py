"""Fixed 2-D sin-cos position table: analytic values, cropping, and errors."""

import numpy as np
import pytest

from aasp_jax.models import posemb


def test_values_follow_the_formula():
  dim, n_time, n_freq = 16, 10, 4
  table = posemb.sincos_table(dim, n_time, n_freq)
  q = dim // 4
  freqs = 1.0 / 10000 ** (np.arange(q) / q)
  t, f = 7, 3
  expected = np.concatenate(
    [np.sin(t * freqs), np.cos(t * freqs), np.sin(f * freqs), np.cos(f * freqs)]
  )
  np.testing.assert_allclose(table[t, f], expected, atol=1e-6)


def test_crop_is_a_prefix_of_the_long_table_and_time_major():
  long = posemb.grid_posemb(32, (750, 8), 750)
  short = posemb.grid_posemb(32, (64, 8), 750)
  np.testing.assert_array_equal(short, long[: 64 * 8])
  table = posemb.sincos_table(32, 750, 8)
  np.testing.assert_array_equal(short[5 * 8 + 3], table[5, 3])


def test_positions_are_distinct():
  emb = posemb.grid_posemb(64, (64, 8), 750)
  dist = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
  assert dist[~np.eye(len(emb), dtype=bool)].min() > 1e-3


def test_errors():
  with pytest.raises(ValueError, match='divisible by 4'):
    posemb.sincos_table(30, 4, 4)
  with pytest.raises(ValueError, match='max_time_patches'):
    posemb.grid_posemb(32, (751, 8), 750)


def test_mae_table_is_ours_with_the_halves_swapped():
  """Audio-MAE / EAT's get_2d_sincos_pos_embed_flexible (meshgrid(w, h): frequency first)."""
  dim, n_time, n_freq = 16, 10, 4
  ours = posemb.sincos_table(dim, n_time, n_freq)
  mae = posemb.sincos_table(dim, n_time, n_freq, 'sincos_mae')
  # 'sincos_mae' is computed in float32 as MAE's code does, 'sincos' in float64: equal to ~1 ulp.
  np.testing.assert_allclose(
    mae, np.concatenate([ours[..., 8:], ours[..., :8]], axis=-1), rtol=0, atol=1e-6
  )
  q = dim // 4
  freqs = 1.0 / 10000 ** (np.arange(q) / q)
  t, f = 7, 3
  expected = np.concatenate(
    [np.sin(f * freqs), np.cos(f * freqs), np.sin(t * freqs), np.cos(t * freqs)]
  )
  np.testing.assert_allclose(mae[t, f], expected, atol=1e-6)
  np.testing.assert_array_equal(
    posemb.grid_posemb(16, (5, 4), 10, 'sincos_mae'), mae[:5].reshape(20, 16)
  )
  with pytest.raises(ValueError, match='fixed table'):
    posemb.sincos_table(16, 4, 4, 'learned')


def test_mae_table_is_eats_bit_for_bit():
  """EAT's table (models/mae.py:404-451 at 06c1c34, re-stated: float32 throughout, meshgrid(w, h)
  so the frequency code comes first) at EAT's size: 768 time x 8 frequency patches, width 768."""
  dim, n_time, n_freq = 768, 768, 8

  def one_d(d, pos):  # get_1d_sincos_pos_embed_from_grid, mae.py:433-451
    omega = np.arange(d // 2, dtype=np.float32)
    omega /= d / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid_h = np.arange(n_time, dtype=np.float32)
  grid_w = np.arange(n_freq, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, n_time, n_freq])
  eat = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
  ours = posemb.sincos_table(dim, n_time, n_freq, 'sincos_mae').reshape(-1, dim)
  np.testing.assert_array_equal(ours, eat.astype(np.float32))
  # The same table in float64 (AaSP's 'sincos', halves swapped) is not EAT's: far positions differ.
  f64 = posemb.sincos_table(dim, n_time, n_freq).reshape(-1, dim)
  assert np.abs(np.concatenate([f64[:, dim // 2 :], f64[:, : dim // 2]], axis=1) - eat).max() > 1e-6
