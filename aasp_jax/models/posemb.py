"""Fixed 2-D sin-cos position embeddings for the time x frequency patch grid.

The table covers a long time axis (default: 2 minutes of audio at 100 frames/s and 16-frame patches) and
is cropped to the input's number of time patches, so one checkpoint serves any clip length up to that.
Tokens are flattened time-major: index = t * num_freq_patches + f.
"""

import numpy as np


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """MAE-style 1-D sin-cos embedding: half sines, half cosines, geometric frequencies."""
  if dim % 2:
    raise ValueError(f'sin-cos embedding needs an even dimension, got {dim}.')
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000**omega
  angles = np.einsum('p,d->pd', positions.astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_table(dim: int, max_time_patches: int, num_freq_patches: int) -> np.ndarray:
  """Returns [max_time_patches, num_freq_patches, dim]: first half encodes time, second frequency."""
  if dim % 4:
    raise ValueError(f'2-D sin-cos embedding needs a width divisible by 4, got {dim}.')
  t_emb = _sincos_1d(dim // 2, np.arange(max_time_patches))
  f_emb = _sincos_1d(dim // 2, np.arange(num_freq_patches))
  table = np.concatenate(
    [
      np.broadcast_to(t_emb[:, None, :], (max_time_patches, num_freq_patches, dim // 2)),
      np.broadcast_to(f_emb[None, :, :], (max_time_patches, num_freq_patches, dim // 2)),
    ],
    axis=-1,
  )
  return table.astype(np.float32)


def grid_posemb(dim: int, grid: tuple[int, int], max_time_patches: int) -> np.ndarray:
  """Returns [num_time * num_freq, dim], the table cropped to `grid` and flattened time-major."""
  num_time, num_freq = grid
  if num_time > max_time_patches:
    raise ValueError(
      f'Input has {num_time} time patches but the position table holds {max_time_patches}; '
      'raise model.max_time_patches or crop the input.'
    )
  return sincos_table(dim, max_time_patches, num_freq)[:num_time].reshape(num_time * num_freq, dim)
