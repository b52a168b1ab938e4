"""EAT / data2vec 2.0-style CNN decoder, kept as the predictor ablation (`predictor=cnn`).

Visible student tokens are scattered back onto the patch grid, masked cells get a learned mask token,
and a stack of 2-D convolutions (LayerNorm, GELU, residual) mixes neighbours before a linear
projection to the target width. Predictions are read out at the masked positions.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from aasp_jax.models.vit import gather_tokens

Dtype = Any


class CnnDecoder(nn.Module):
  """Same call signature as CrossAttentionPredictor."""

  width: int = 384
  num_layers: int = 6
  kernel_size: int = 3
  groups: int = 16
  out_dim: int = 768
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, visible_bvd, visible_idx_bv, masked_idx_bm, grid: tuple[int, int]):
    if self.width % self.groups:
      raise ValueError(f'CNN decoder width {self.width} is not divisible by groups={self.groups}.')
    n_time, n_freq = grid
    batch = visible_bvd.shape[0]
    x_bvd = nn.Dense(
      self.width,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ('embed', None)),
      name='in_proj',
    )(visible_bvd)
    mask_token = self.param(
      'mask_token',
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, 'embed')),
      (1, 1, self.width),
      self.param_dtype,
    )
    full_bnd = jnp.broadcast_to(mask_token.astype(self.dtype), (batch, n_time * n_freq, self.width))
    rows_b1 = jnp.arange(batch)[:, None]
    full_bnd = full_bnd.at[rows_b1, visible_idx_bv].set(x_bvd.astype(self.dtype))
    h_btfd = full_bnd.reshape(batch, n_time, n_freq, self.width)
    for i in range(self.num_layers):
      y = nn.Conv(
        self.width,
        (self.kernel_size, self.kernel_size),
        padding='SAME',
        feature_group_count=self.groups,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), (None, None, None, 'embed')
        ),
        name=f'conv_{i}',
      )(h_btfd)
      y = nn.LayerNorm(
        epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name=f'norm_{i}'
      )(y)
      y = nn.gelu(y, approximate=False)
      # data2vec 2.0 adds the residual from the second layer on, once widths match.
      h_btfd = y if i == 0 else h_btfd + y
    h_bnd = h_btfd.reshape(batch, n_time * n_freq, self.width)
    out_bmd = nn.Dense(
      self.out_dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, 'embed')),
      name='out_proj',
    )(gather_tokens(h_bnd, masked_idx_bm))
    return out_bmd
