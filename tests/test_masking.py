"""Inverse block masks: exact counts, an exact partition, block shape, per-clone variety, jit hygiene.

Every statistical test uses one batched draw of 1,000 masks on the 64x8 grid of the design.
"""

import functools

import chex
import jax
import numpy as np
import pytest
from scipy import ndimage

from aasp_jax import masking

GRID = (64, 8)
N = GRID[0] * GRID[1]
DRAWS = 1000
# M = 16 clones per clip, as in the design; small-batch tests share this size so they share one compile.
CLONES = 16


@functools.cache
def _draw(mask_ratio, block_size=5, seed=0):
  masks = masking.inverse_block_mask(jax.random.key(seed), DRAWS, GRID, mask_ratio, block_size)
  return jax.tree.map(np.asarray, masks)


def _mean_component_size(mask_bn):
  """Mean 4-connected component size of the True cells of each [64, 8] grid, over all draws."""
  sizes = []
  for row in mask_bn:
    labels, count = ndimage.label(row.reshape(GRID))
    sizes.append(np.bincount(labels.ravel())[1:])
    assert len(sizes[-1]) == count
  return float(np.concatenate(sizes).mean())


def test_num_visible():
  assert masking.num_visible(512, 0.8) == 102
  assert masking.num_visible(512, 0.5) == 256
  # EAT truncates (utils/data_utils.py:347): 25 of a 16 x 8 grid at 0.8, not round()'s 26.
  assert masking.num_visible(128, 0.8) == int(128 * (1 - 0.8)) == 25
  assert masking.num_visible(10, 0.99) == 1  # Never zero visible tokens.
  assert masking.num_visible(10, 0.01) == 9  # Never zero masked tokens.


def test_centre_count_covers_the_visible_fraction():
  for ratio in (0.8, 0.5, 0.75):
    n = masking.num_centres(GRID, ratio, 5)
    target = masking.num_visible(N, ratio) / N
    assert (
      masking.expected_coverage(GRID, 5, n) >= target > masking.expected_coverage(GRID, 5, n - 1)
    )
  # The analytic expectation matches a Monte-Carlo union of clipped squares.
  rng = np.random.default_rng(0)
  n = masking.num_centres(GRID, 0.8, 5)
  t, f = np.meshgrid(np.arange(GRID[0]), np.arange(GRID[1]), indexing='ij')
  covered = []
  for _ in range(2000):
    c = rng.integers(0, N, n)
    ct, cf = c // GRID[1], c % GRID[1]
    inside = (np.abs(t[..., None] - ct) <= 2) & (np.abs(f[..., None] - cf) <= 2)
    covered.append(inside.any(-1).mean())
  np.testing.assert_allclose(np.mean(covered), masking.expected_coverage(GRID, 5, n), atol=0.01)


@pytest.mark.parametrize('ratio', [0.8, 0.5, 0.75])
def test_realised_ratio_is_exact_for_every_clone(ratio):
  m = _draw(ratio)
  n_vis = masking.num_visible(N, ratio)
  chex.assert_shape(m.visible_idx, (DRAWS, n_vis))
  chex.assert_shape(m.masked_idx, (DRAWS, N - n_vis))
  chex.assert_shape(m.mask, (DRAWS, N))
  assert m.visible_idx.dtype == np.int32 and m.masked_idx.dtype == np.int32
  assert m.mask.dtype == np.bool_
  np.testing.assert_array_equal(m.mask.sum(axis=1), N - n_vis)


@pytest.mark.parametrize('ratio', [0.8, 0.5])
def test_indices_are_a_sorted_partition_consistent_with_mask(ratio):
  m = _draw(ratio)
  assert np.all(np.diff(m.visible_idx, axis=1) > 0)  # Strictly ascending, so also no repeats.
  assert np.all(np.diff(m.masked_idx, axis=1) > 0)
  union = np.sort(np.concatenate([m.visible_idx, m.masked_idx], axis=1), axis=1)
  np.testing.assert_array_equal(union, np.broadcast_to(np.arange(N), union.shape))
  rows = np.arange(DRAWS)[:, None]
  assert not m.mask[rows, m.visible_idx].any()
  assert m.mask[rows, m.masked_idx].all()


def _boundary_length(mask_bn):
  """Mean count of 4-neighbour pairs with one masked and one visible token, per grid."""
  grid_btf = mask_bn.reshape(-1, *GRID)
  along_t = (grid_btf[:, 1:] != grid_btf[:, :-1]).sum(axis=(1, 2))
  along_f = (grid_btf[:, :, 1:] != grid_btf[:, :, :-1]).sum(axis=(1, 2))
  return float((along_t + along_f).mean())


def test_visible_and_masked_regions_are_block_shaped():
  m = _draw(0.8)
  n_vis = masking.num_visible(N, 0.8)
  # Random masking with the same exact count: the first n_vis entries of a random permutation per row.
  perm = np.random.default_rng(0).permuted(np.tile(np.arange(N), (DRAWS, 1)), axis=1)
  random_mask = np.ones((DRAWS, N), bool)
  random_mask[np.arange(DRAWS)[:, None], perm[:, :n_vis]] = False
  assert (random_mask.sum(axis=1) == N - n_vis).all()

  block_vis, random_vis = _mean_component_size(~m.mask), _mean_component_size(~random_mask)
  block_msk, random_msk = _mean_component_size(m.mask), _mean_component_size(random_mask)
  block_edge, random_edge = _boundary_length(m.mask), _boundary_length(random_mask)
  print(f'\nvisible component size: block {block_vis:.2f} vs random {random_vis:.2f}')
  print(f'masked component size:  block {block_msk:.2f} vs random {random_msk:.2f}')
  print(f'masked/visible boundary: block {block_edge:.1f} vs random {random_edge:.1f} edges')
  # Random 20% visible gives ~1.3-token islands; the block union gives islands of one or more
  # (clipped) 5x5 squares, plus the few random singletons that top the count up. Ask for a wide margin.
  assert block_vis > 4.0 * random_vis
  # Component size is a poor measure for the masked 80%: random masking already percolates into one
  # sea. Block-shaped masked regions show up instead as a short masked/visible boundary.
  assert block_edge < 0.5 * random_edge


def test_clones_of_one_clip_differ():
  m = masking.inverse_block_mask(jax.random.key(3), CLONES, GRID)
  rows = np.asarray(m.mask)
  assert len({r.tobytes() for r in rows}) == CLONES


def test_deterministic_for_a_fixed_key_and_different_for_another():
  a = masking.inverse_block_mask(jax.random.key(7), CLONES, GRID)
  b = masking.inverse_block_mask(jax.random.key(7), CLONES, GRID)
  c = masking.inverse_block_mask(jax.random.key(8), CLONES, GRID)
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(a.mask, c.mask)


def test_jits_once_for_different_keys():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def draw(rng):
    return masking.inverse_block_mask(rng, CLONES, GRID, 0.8, 5)

  a = draw(jax.random.key(0))
  b = draw(jax.random.key(1))
  assert isinstance(a, masking.Masks)
  assert not np.array_equal(a.mask, b.mask)
  # The jitted draw equals the eager one.
  chex.assert_trees_all_equal(
    a, masking.inverse_block_mask(jax.random.key(0), CLONES, GRID, 0.8, 5)
  )


def test_gather_selects_visible_tokens():
  x = np.arange(CLONES * N * 3, dtype=np.float32).reshape(CLONES, N, 3)
  m = masking.inverse_block_mask(jax.random.key(0), CLONES, GRID)
  out = np.asarray(masking.gather(x, m.visible_idx))
  np.testing.assert_array_equal(out, np.take_along_axis(x, np.asarray(m.visible_idx)[..., None], 1))


@pytest.mark.parametrize('ratio', [0.0, 1.0, -0.1, 1.5])
def test_bad_ratio_raises(ratio):
  with pytest.raises(ValueError, match='mask_ratio'):
    masking.inverse_block_mask(jax.random.key(0), 2, GRID, ratio, 5)


@pytest.mark.parametrize('block_size', [0, -1, 2.5])
def test_bad_block_size_raises(block_size):
  with pytest.raises(ValueError, match='block_size'):
    masking.inverse_block_mask(jax.random.key(0), 2, GRID, 0.8, block_size)


def test_eat_centre_count():
  """EAT's count, int(L * (mask_prob + mask_prob_adjust) / 25) with mask_prob = 1 - 0.8
  (utils/data_utils.py:296-309): 5 on 64 x 8, 1 on 16 x 8, 0 on 8 x 8; the masks keep exactly the
  visible count either way."""
  assert [masking.eat_num_centres(g, 0.8, 5) for g in ((64, 8), (16, 8), (8, 8))] == [5, 1, 0]
  for grid in ((16, 8), (8, 8)):
    m = masking.inverse_block_mask(jax.random.key(0), 4, grid, 0.8, 5, centres='eat')
    assert m.visible_idx.shape == (4, masking.num_visible(grid[0] * grid[1], 0.8))
  with pytest.raises(ValueError, match='mask_centres'):
    masking.inverse_block_mask(jax.random.key(0), 4, (8, 8), 0.8, 5, centres='bogus')
