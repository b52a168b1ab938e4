"""Fine-tuning augmentations, on device inside the jitted train step: mixup, SpecAugment and
random token dropping.

All three act on the normalised log-mel batch [batch, frames, mel bins] (or on its patch grid) and
take an explicit PRNG key, so a step is reproducible from (seed, step). Each returns what it drew
(mixing weights, mask positions, kept tokens) next to its output, so callers and tests can see
exactly what was done.

- Mixup (Zhang et al. 2018; AST / Audio-MAE / EAT fine-tuning): example b is mixed with example
  b - 1 (a roll of the batch, so every example is also a partner and an odd batch never pairs an
  example with itself) with its own weight lam_b ~ Beta(alpha, alpha); its labels are mixed with
  the same weight. It is applied to the log-mel features (Audio-MAE and EAT mix features; AST mixes
  waveforms).
- SpecAugment (Park et al. 2019), time and frequency masking only: each of `num_masks` masks has a
  width drawn uniformly from {0, ..., max_width} and a start uniformly from the positions where it
  fits; masked frames / bins are set to `mask_value`. The features are normalised, so the default
  value 0 is the pre-training set's mean log-mel.
- Token dropping: each example keeps a uniformly random subset of its patch tokens (in grid order),
  which the encoder gathers through `visible_idx` (Audio-MAE's fine-tuning token masking, without
  its time/frequency structure).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Mixed(NamedTuple):
  """Mixup output: x = lam x + (1 - lam) x[partner], and the same for the labels (a pytree, so
  jitted functions can return it)."""

  features: jax.Array
  labels: jax.Array
  lam: jax.Array  # [batch]
  partner: jax.Array  # int [batch]


def mix(x_b, y_bc, lam_b, partner_b) -> tuple[jax.Array, jax.Array]:
  """Mixes every example b with example partner_b with weight lam_b (features and labels)."""
  lam_x = lam_b.reshape((-1,) + (1,) * (x_b.ndim - 1)).astype(x_b.dtype)
  lam_y = lam_b[:, None].astype(y_bc.dtype)
  x = lam_x * x_b + (1.0 - lam_x) * x_b[partner_b]
  y = lam_y * y_bc + (1.0 - lam_y) * y_bc[partner_b]
  return x, y


def mixup(rng: jax.Array, x_b, y_bc, alpha: float) -> Mixed:
  """Mixup with lam_b ~ Beta(alpha, alpha) per example and partner b - 1 (mod batch)."""
  if alpha <= 0:
    raise ValueError(f'mixup alpha must be > 0 (got {alpha}); skip mixup to turn it off.')
  batch = x_b.shape[0]
  lam_b = jax.random.beta(rng, alpha, alpha, (batch,), jnp.float32)
  partner_b = (jnp.arange(batch) - 1) % batch
  x, y = mix(x_b, y_bc, lam_b, partner_b)
  return Mixed(x, y, lam_b, partner_b)


class SpecAugmented(NamedTuple):
  """SpecAugment output and the masks it drew (start / width per example and mask)."""

  features: jax.Array
  time_start: jax.Array  # int [batch, time_masks]
  time_width: jax.Array
  freq_start: jax.Array  # int [batch, freq_masks]
  freq_width: jax.Array
  time_mask: jax.Array  # bool [batch, frames]
  freq_mask: jax.Array  # bool [batch, bins]


def _draw_masks(rng, batch: int, length: int, num_masks: int, max_width: int):
  """(start, width, union mask [batch, length]) of `num_masks` random intervals per example."""
  max_width = min(max_width, length)
  r_width, r_start = jax.random.split(rng)
  width = jax.random.randint(r_width, (batch, num_masks), 0, max_width + 1)
  # start ~ U{0, ..., length - width}: uniform over the positions where the interval fits.
  start = jnp.floor(
    jax.random.uniform(r_start, (batch, num_masks)) * (length - width + 1).astype(jnp.float32)
  ).astype(jnp.int32)
  start = jnp.minimum(start, length - width)  # guards uniform()'s float rounding at the top
  pos = jnp.arange(length)[None, None, :]
  inside = (pos >= start[..., None]) & (pos < (start + width)[..., None])
  return start, width, jnp.any(inside, axis=1)


def spec_augment(
  rng: jax.Array,
  x_btf,
  *,
  time_masks: int,
  time_width: int,
  freq_masks: int,
  freq_width: int,
  mask_value: float = 0.0,
) -> SpecAugmented:
  """Time and frequency masking of a log-mel batch [batch, frames, bins] (see the module doc)."""
  for name, value in (
    ('time_masks', time_masks),
    ('time_width', time_width),
    ('freq_masks', freq_masks),
    ('freq_width', freq_width),
  ):
    if value < 0:
      raise ValueError(f'specaug.{name} must be >= 0, got {value}.')
  batch, frames, bins = x_btf.shape
  r_time, r_freq = jax.random.split(rng)
  t_start, t_width, t_mask = _draw_masks(r_time, batch, frames, time_masks, time_width)
  f_start, f_width, f_mask = _draw_masks(r_freq, batch, bins, freq_masks, freq_width)
  masked = t_mask[:, :, None] | f_mask[:, None, :]
  out = jnp.where(masked, jnp.asarray(mask_value, x_btf.dtype), x_btf)
  return SpecAugmented(out, t_start, t_width, f_start, f_width, t_mask, f_mask)


def num_kept_tokens(num_tokens: int, drop_ratio: float) -> int:
  """Tokens an example keeps when a fraction `drop_ratio` is dropped (at least one)."""
  if not 0.0 <= drop_ratio < 1.0:
    raise ValueError(f'token_mask_ratio must be in [0, 1), got {drop_ratio}.')
  return max(1, num_tokens - int(round(drop_ratio * num_tokens)))


def random_keep_indices(rng: jax.Array, batch: int, num_tokens: int, drop_ratio: float):
  """int32 [batch, kept]: a uniformly random subset of token indices per example, ascending."""
  kept = num_kept_tokens(num_tokens, drop_ratio)
  noise_bn = jax.random.uniform(rng, (batch, num_tokens))
  idx_bk = jnp.argsort(noise_bn, axis=1)[:, :kept]
  return jnp.sort(idx_bk, axis=1).astype(jnp.int32)
