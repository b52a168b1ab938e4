"""Fixed 2-D sin-cos position embeddings for the time x frequency patch grid.

The table covers a long time axis (default: 2 minutes of audio at 100 frames/s and 16-frame patches) and
is cropped to the input's number of time patches, so one checkpoint serves any clip length up to that.
Tokens are flattened time-major: index = t * num_freq_patches + f.

Kinds (`model.posemb`): 'sincos' puts the time code in the first half of each vector and the
frequency code in the second; 'sincos_mae' is Audio-MAE's / EAT's table, the same two halves swapped
(MAE's `np.meshgrid(grid_w, grid_h)` puts the width = frequency coordinate first); 'learned' is a
parameter of the encoder (`vit.Encoder`), not a table computed here.
"""

import numpy as np

KINDS = ('sincos', 'sincos_mae', 'learned')
FIXED_KINDS = ('sincos', 'sincos_mae')


def _sincos_1d(dim: int, positions: np.ndarray, dtype=np.float64) -> np.ndarray:
  """MAE-style 1-D sin-cos embedding: half sines, half cosines, geometric frequencies.

  dtype float32 computes it as MAE's / EAT's get_1d_sincos_pos_embed_from_grid does, step for step
  in float32 (EAT models/mae.py:433-451); float64 is AaSP's table (rounded to float32 once).
  """
  if dim % 2:
    raise ValueError(f'sin-cos embedding needs an even dimension, got {dim}.')
  omega = np.arange(dim // 2, dtype=dtype)
  omega /= dim / 2.0
  omega = 1.0 / 10000**omega
  angles = np.einsum('p,d->pd', positions.astype(dtype), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_table(
  dim: int, max_time_patches: int, num_freq_patches: int, kind: str = 'sincos'
) -> np.ndarray:
  """Returns [max_time_patches, num_freq_patches, dim].

  kind 'sincos': the first half of each vector encodes time, the second frequency; 'sincos_mae':
  the first half encodes frequency, the second time (Audio-MAE / EAT).
  """
  if kind not in FIXED_KINDS:
    raise ValueError(f'sincos_table: kind={kind!r} is no fixed table; choose one of {FIXED_KINDS}.')
  if dim % 4:
    raise ValueError(f'2-D sin-cos embedding needs a width divisible by 4, got {dim}.')
  shape = (max_time_patches, num_freq_patches, dim // 2)
  # 'sincos_mae' in float32 as EAT's code builds it (EAT's table bit for bit; Audio-MAE computes
  # the same table in float64, within 1e-5).
  dtype = np.float64 if kind == 'sincos' else np.float32
  t_emb = np.broadcast_to(
    _sincos_1d(dim // 2, np.arange(max_time_patches), dtype)[:, None, :], shape
  )
  f_emb = np.broadcast_to(
    _sincos_1d(dim // 2, np.arange(num_freq_patches), dtype)[None, :, :], shape
  )
  halves = [t_emb, f_emb] if kind == 'sincos' else [f_emb, t_emb]
  return np.concatenate(halves, axis=-1).astype(np.float32)


def check_length(num_time: int, max_time_patches: int) -> None:
  """Raises ValueError unless `num_time` time patches fit a table of `max_time_patches` rows."""
  if num_time > max_time_patches:
    raise ValueError(
      f'Input has {num_time} time patches but the position table holds {max_time_patches}; '
      'raise model.max_time_patches or crop the input.'
    )


def grid_posemb(
  dim: int, grid: tuple[int, int], max_time_patches: int, kind: str = 'sincos'
) -> np.ndarray:
  """Returns [num_time * num_freq, dim], the table cropped to `grid` and flattened time-major."""
  num_time, num_freq = grid
  check_length(num_time, max_time_patches)
  table = sincos_table(dim, max_time_patches, num_freq, kind)
  return table[:num_time].reshape(num_time * num_freq, dim)
