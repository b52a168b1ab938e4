"""The cross-attention predictor: masked-position queries attend to the student's visible tokens.

Queries are a learned mask token plus the fixed sin-cos position of each masked patch (at the
predictor's width); keys and values are the student's visible-token outputs projected to that width.
Each block is cross-attention + MLP (no self-attention among queries), so every masked prediction
depends only on the visible context, never on which other positions happen to be masked.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from aasp_jax.models import posemb
from aasp_jax.models.attention import Attention, Mlp, layer_norm
from aasp_jax.models.vit import gather_tokens

Dtype = Any


class CrossAttentionPredictor(nn.Module):
  """Predicts teacher targets at masked positions from visible student tokens."""

  width: int = 384
  depth: int = 2
  num_heads: int = 6
  mlp_ratio: float = 4.0
  out_dim: int = 768
  max_time_patches: int = 750
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, visible_bvd, visible_idx_bv, masked_idx_bm, grid: tuple[int, int]):
    """Returns predictions [batch, num_masked, out_dim].

    Args:
      visible_bvd: student outputs for the visible patch tokens (positions are already inside).
      visible_idx_bv: their grid indices (unused here: kept so all predictors share one signature).
      masked_idx_bm: grid indices (time-major) of the positions to predict.
      grid: (n_time, n_freq) patch grid of the clip.
    """
    del visible_idx_bv
    kv_bvd = nn.Dense(
      self.width,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ('embed', None)),
      name='context_proj',
    )(visible_bvd)
    mask_token = self.param(
      'mask_token',
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, 'embed')),
      (1, 1, self.width),
      self.param_dtype,
    )
    pos_nd = jnp.asarray(posemb.grid_posemb(self.width, grid, self.max_time_patches), self.dtype)
    batch = masked_idx_bm.shape[0]
    pos_bnd = jnp.broadcast_to(pos_nd[None], (batch,) + pos_nd.shape)
    q_bmd = mask_token.astype(self.dtype) + gather_tokens(pos_bnd, masked_idx_bm)
    for i in range(self.depth):
      q_norm = layer_norm(f'block_{i}_norm_q', self.dtype, self.param_dtype)(q_bmd)
      kv_norm = layer_norm(f'block_{i}_norm_kv', self.dtype, self.param_dtype)(kv_bvd)
      q_bmd = q_bmd + Attention(
        self.num_heads,
        self.dtype,
        self.param_dtype,
        self.attention_impl,
        name=f'block_{i}_cross_attn',
      )(q_norm, kv_norm)
      mlp_in = layer_norm(f'block_{i}_norm_mlp', self.dtype, self.param_dtype)(q_bmd)
      q_bmd = q_bmd + Mlp(
        int(self.width * self.mlp_ratio), self.dtype, self.param_dtype, name=f'block_{i}_mlp'
      )(mlp_in)
      q_bmd = nn.with_logical_constraint(q_bmd, ('batch', 'tokens', 'embed'))
    q_bmd = layer_norm('norm', self.dtype, self.param_dtype)(q_bmd)
    return nn.Dense(
      self.out_dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, 'embed')),
      name='out_proj',
    )(q_bmd)
