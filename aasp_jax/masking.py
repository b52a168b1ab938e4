"""Inverse block masks on the patch-token grid, drawn on device (AaSP design section 4, "Masking").

Tokens are flattened time-major: token = t * n_freq + f on an (n_time, n_freq) grid, matching the
ViT stem. Inverse block masking (data2vec 2.0 / EAT) chooses the VISIBLE tokens as a union of
block_size x block_size squares and masks everything else, so the student must predict whole
regions rather than interpolate from scattered neighbours.

Why static shapes: on TPU (and under XLA generally) every array shape is fixed at compile time, and
a shape that changed from step to step would recompile the train step. So every clone keeps exactly
`num_visible(N, mask_ratio)` tokens, a pure function of the static config. The random block union
only ranks the tokens (block members first, random order within each group), and `jax.lax.top_k`
takes a fixed number of them. The whole draw is a handful of dense ops on [batch, N] arrays: no
host round trip, no data-dependent loop, and it jits once per (batch, grid, ratio, block) config.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aasp_jax.models.vit import gather_tokens

# Uniform noise is scaled below 1 so that it can only reorder tokens within the 'keep' group and
# within the 'drop' group: every block token outranks every non-block token.
_NOISE_SCALE = 0.5


class Masks(NamedTuple):
  """One mask per clone. A NamedTuple, so it is a pytree and passes through jit unchanged.

  Attributes:
    visible_idx: int32 [batch, Nv], the visible token indices, sorted ascending.
    masked_idx: int32 [batch, Nm], the masked token indices, sorted ascending; Nv + Nm = N.
    mask: bool [batch, N], True where the token is masked.
  """

  visible_idx: jax.Array
  masked_idx: jax.Array
  mask: jax.Array


def _check(num_tokens: int, mask_ratio: float, block_size: int = 1) -> None:
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f'mask_ratio must lie strictly between 0 and 1, got {mask_ratio}.')
  if int(block_size) != block_size or block_size < 1:
    raise ValueError(f'block_size must be a positive integer, got {block_size}.')
  if num_tokens < 2:
    raise ValueError(f'Need at least 2 tokens to mask some and keep some, got {num_tokens}.')


def num_visible(num_tokens: int, mask_ratio: float) -> int:
  """Visible tokens per clone: int((1 - ratio) * N), truncated as EAT does, clamped to [1, N - 1].

  EAT's compute_block_mask_2d (utils/data_utils.py:347 at 06c1c34, with inverse_mask its mask_prob
  is 1 - ratio) keeps `int(L * mask_prob)` tokens: 102 of 512 and 25 of 128 at ratio 0.8 (rounding
  would give 26 on a 16 x 8 grid). The clamp keeps both the visible and the masked sets non-empty,
  so the encoder and the predictor always have at least one token. The result depends only on
  static config, so it is a valid shape.
  """
  _check(num_tokens, mask_ratio)
  return int(min(max(int((1.0 - mask_ratio) * num_tokens), 1), num_tokens - 1))


def _block_offsets(block_size: int) -> tuple[int, int]:
  """Offsets [lo, hi] of a block around its centre; for even sizes the extra row goes before."""
  lo = -(block_size // 2)
  return lo, lo + block_size - 1


def _cover_counts(length: int, block_size: int) -> np.ndarray:
  """For each position on a 1-D axis, how many centre positions put it inside their (clipped) block."""
  lo, hi = _block_offsets(block_size)
  pos = np.arange(length)
  # Token p is covered by centre c iff lo <= p - c <= hi, i.e. c in [p - hi, p - lo] within the axis.
  return np.minimum(pos - lo, length - 1) - np.maximum(pos - hi, 0) + 1


def expected_coverage(grid: tuple[int, int], block_size: int, n: int) -> float:
  """Expected fraction of the grid covered by n uniform centres (see `num_centres`)."""
  n_time, n_freq = grid
  total = n_time * n_freq
  miss = (
    1.0 - np.outer(_cover_counts(n_time, block_size), _cover_counts(n_freq, block_size)) / total
  )
  return float(1.0 - np.mean(miss**n))


def num_centres(grid: tuple[int, int], mask_ratio: float, block_size: int) -> int:
  """Block centres per clone: the fewest whose union is expected to cover the visible fraction.

  With n centres drawn independently and uniformly over the N grid cells, token (t, f) is missed by
  one centre with probability 1 - a_t * a_f / N, where a_t (a_f) counts the centre rows (columns)
  whose clipped block reaches it. Hence the expected covered fraction is exactly

    C(n) = 1 - mean_{t,f} (1 - a_t * a_f / N) ** n,

  and we return the smallest n with C(n) >= Nv / N. This accounts for overlaps and for blocks
  clipped at the grid edges (with a 64x8 grid and block 5, most blocks are 5x5 clipped in frequency).
  The top-k step then trims or tops up the union to exactly Nv tokens.
  """
  n_time, n_freq = grid
  total = n_time * n_freq
  _check(total, mask_ratio, block_size)
  target = num_visible(total, mask_ratio) / total
  # C(n) increases with n; the bound is far beyond any useful value (it would cover the grid with
  # single-token blocks many times over), so the loop always returns from inside.
  for n in range(1, 64 * total + 1):
    if expected_coverage(grid, block_size, n) >= target:
      return n
  return 64 * total


# EAT's mask_prob_adjust (config/pretraining_AS2M.yaml): extra block centres over the visible share.
EAT_MASK_PROB_ADJUST = 0.07
CENTRE_RULES = ('coverage', 'eat')


def eat_num_centres(grid: tuple[int, int], mask_ratio: float, block_size: int) -> int:
  """EAT's block count: int(N * (1 - ratio + 0.07) / block_size^2) uniform centres drawn with
  replacement (compute_block_mask_2d, utils/data_utils.py:296-309 at 06c1c34): 5 on a 64 x 8 grid,
  1 on 16 x 8, 0 (then the visible tokens are drawn at random) on 8 x 8. Its blocks are clamped to
  the grid (:323-327), which covers the same cells as our clipped squares."""
  n_time, n_freq = grid
  total = n_time * n_freq
  _check(total, mask_ratio, block_size)
  return int(total * ((1.0 - mask_ratio) + EAT_MASK_PROB_ADJUST) / block_size**2)


def inverse_block_mask(
  rng: jax.Array,
  batch: int,
  grid: tuple[int, int],
  mask_ratio: float = 0.8,
  block_size: int = 5,
  centres: str = 'coverage',
) -> Masks:
  """Draws `batch` independent inverse block masks on a (n_time, n_freq) token grid.

  Each row draws its own block centres, so the M clones of one clip (laid out as batch = B * M)
  get different masks from a single key. `batch`, `grid`, `mask_ratio` and `block_size` must be
  static Python values under jit; only `rng` is traced.

  Args:
    rng: a PRNG key.
    batch: number of masks (clips x clones).
    grid: (n_time, n_freq) token grid; tokens are flattened time-major.
    mask_ratio: fraction of tokens masked, in (0, 1).
    block_size: side of the square visible blocks, >= 1.
    centres: how many block centres: 'coverage' (`num_centres`, the fewest expected to cover the
      visible share) or 'eat' (`eat_num_centres`, EAT's count). Either way the union is then
      trimmed or topped up with random tokens to exactly the visible count, as EAT does
      (data_utils.py:345-382).

  Returns:
    Masks with exactly num_visible(N, mask_ratio) visible tokens in every row.
  """
  n_time, n_freq = grid
  _check(n_time * n_freq, mask_ratio, block_size)
  if centres not in CENTRE_RULES:
    raise ValueError(f'objective.mask_centres={centres!r} is not valid; choose one of {CENTRE_RULES}.')
  count = (num_centres if centres == 'coverage' else eat_num_centres)(grid, mask_ratio, block_size)
  # Validate eagerly (clear errors, not tracer noise), then run one compiled program: jitting here
  # also caches the draw per static config when it is called outside a jitted step (e.g. in tests),
  # and it simply inlines when called inside one.
  return _inverse_block_mask(rng, batch, tuple(grid), float(mask_ratio), int(block_size), count)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _inverse_block_mask(
  rng: jax.Array, batch: int, grid: tuple[int, int], mask_ratio: float, block_size: int,
  n_centres: int,
) -> Masks:
  """The traced body of `inverse_block_mask`; all but `rng` are static."""
  n_time, n_freq = grid
  total = n_time * n_freq
  n_vis = num_visible(total, mask_ratio)
  lo, hi = _block_offsets(block_size)

  # One uniform draw feeds both the centres and the tie-breaking noise: each threefry call is a
  # sizeable program to compile, and splitting the key buys nothing here.
  u_bm = jax.random.uniform(rng, (batch, n_centres + total))
  # floor(uniform * N) rather than jax.random.randint: the same uniform centres (up to float
  # resolution, irrelevant for N in the thousands), and it compiles several times faster on CPU.
  centres_bc = jnp.minimum(jnp.floor(u_bm[:, :n_centres] * total).astype(jnp.int32), total - 1)
  ct_bc1, cf_bc1 = (centres_bc // n_freq)[..., None], (centres_bc % n_freq)[..., None]

  tok = jnp.arange(total)
  t_n, f_n = tok // n_freq, tok % n_freq
  # A token is kept if it falls inside any centre's square. Squares are clipped at the edges for
  # free: tokens outside the grid simply do not exist. [batch, centres, N] is tiny (a few centres).
  dt_bcn, df_bcn = t_n - ct_bc1, f_n - cf_bc1
  inside_bcn = (dt_bcn >= lo) & (dt_bcn <= hi) & (df_bcn >= lo) & (df_bcn <= hi)
  keep_bn = jnp.any(inside_bcn, axis=1)

  # Block members first, then the rest, each group in random order: top_k trims an oversized union
  # at random or tops an undersized one up with random extra tokens, always to exactly n_vis.
  noise_bn = u_bm[:, n_centres:]
  score_bn = keep_bn.astype(jnp.float32) + _NOISE_SCALE * noise_bn
  _, top_bk = jax.lax.top_k(score_bn, n_vis)
  visible_idx = jnp.sort(top_bk.astype(jnp.int32), axis=-1)

  rows_b1 = jnp.arange(batch)[:, None]
  mask = jnp.ones((batch, total), bool).at[rows_b1, visible_idx].set(False)
  # Derive the masked indices from `mask` (not from a second top_k) so the two sets are an exact
  # partition by construction. Sorting masked tokens' own index before every visible token's
  # (index + N) puts the Nm masked indices first, ascending.
  masked_idx = jnp.sort(jnp.where(mask, tok, tok + total), axis=-1)[:, : total - n_vis]
  return Masks(visible_idx=visible_idx, masked_idx=masked_idx.astype(jnp.int32), mask=mask)


def gather(x_bnd: jax.Array, idx_bk: jax.Array) -> jax.Array:
  """Selects tokens per example: [batch, N, d], [batch, k] -> [batch, k, d]."""
  return gather_tokens(x_bnd, idx_bk)


__all__ = [
  'Masks',
  'eat_num_centres',
  'expected_coverage',
  'gather',
  'inverse_block_mask',
  'num_centres',
  'num_visible',
]
