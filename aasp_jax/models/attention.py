"""Multi-head attention and MLP blocks shared by the encoder and the cross-attention predictor.

Query, key and value are separate Dense projections [width, width] with logical axes
('embed', 'heads'), reshaped into heads; tensor parallelism splits the heads dimension, and the export
code concatenates them into timm's fused qkv layout.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _dense_init(axes):
  return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes)


def _bias_init(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class Attention(nn.Module):
  """Self-attention (x_kv is None) or cross-attention from queries x_q to x_kv."""

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # None lets XLA choose; 'cudnn' selects the fused flash-attention kernel on NVIDIA GPUs.
  implementation: str | None = None

  @nn.compact
  def __call__(self, x_q, x_kv=None, mask=None):
    x_kv = x_q if x_kv is None else x_kv
    width = x_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'Attention width {width} is not divisible by num_heads={self.num_heads}.')
    head_dim = width // self.num_heads

    def project(name, x):
      # A plain Dense to width, split into heads afterwards (timm's layout); the 'heads' axis of the
      # kernel is the fused heads x head_dim dimension, which tensor parallelism splits by heads.
      y = nn.Dense(
        width,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=_dense_init(('embed', 'heads')),
        bias_init=_bias_init(('heads',)),
        name=name,
      )(x)
      return y.reshape(*y.shape[:-1], self.num_heads, head_dim)

    q_bqhk = project('query', x_q)
    k_bshk = project('key', x_kv)
    v_bshk = project('value', x_kv)
    out_bqhk = jax.nn.dot_product_attention(
      q_bqhk, k_bshk, v_bshk, mask=mask, implementation=self.implementation
    )
    return nn.Dense(
      width,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_dense_init(('heads', 'embed')),
      bias_init=_bias_init(('embed',)),
      name='out',
    )(out_bqhk.reshape(*out_bqhk.shape[:-2], width))


class Mlp(nn.Module):
  """Two-layer GELU MLP, hidden axis named 'mlp' so it can be split over the tensor axis."""

  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = nn.Dense(
      self.mlp_dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_dense_init(('embed', 'mlp')),
      bias_init=_bias_init(('mlp',)),
      name='fc1',
    )(x)
    # Exact (erf) GELU, as in timm / PyTorch's default, so exported weights give the same outputs.
    h = nn.gelu(h, approximate=False)
    return nn.Dense(
      width,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_dense_init(('mlp', 'embed')),
      bias_init=_bias_init(('embed',)),
      name='fc2',
    )(h)


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype, eps: float = 1e-6) -> nn.LayerNorm:
  """LayerNorm with timm's epsilon by default (1e-6) and logically named scale/bias."""
  return nn.LayerNorm(
    epsilon=eps,
    dtype=dtype,
    param_dtype=param_dtype,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',)),
    bias_init=_bias_init(('embed',)),
    name=name,
  )
