"""Heads on top of the encoder: a classification head (fine-tuning, probes) and the contrastive
projection head that maps a clone's CLS output to an L2-normalised embedding."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any
POOLINGS = ('cls', 'mean', 'cls_mean')


def pool(encoded: dict, pooling: str, token_valid_bn=None):
  """Pools encoder outputs to [batch, width] (or 2*width for 'cls_mean'), ignoring padding tokens."""
  if pooling not in POOLINGS:
    raise ValueError(f'Unknown pooling {pooling!r}; choose one of {POOLINGS}.')
  if pooling == 'cls':
    return encoded['cls']
  tokens_bnd = encoded['tokens'].astype(jnp.float32)
  if token_valid_bn is None:
    mean_bd = tokens_bnd.mean(axis=1)
  else:
    w_bn = token_valid_bn.astype(jnp.float32)
    mean_bd = (tokens_bnd * w_bn[..., None]).sum(1) / jnp.maximum(w_bn.sum(1, keepdims=True), 1.0)
  if pooling == 'mean':
    return mean_bd
  return jnp.concatenate([encoded['cls'].astype(jnp.float32), mean_bd], axis=-1)


class ClassificationHead(nn.Module):
  """Pooling, optional LayerNorm, then a zero-initialised linear layer (logits start at 0)."""

  num_classes: int
  pooling: str = 'cls'
  use_norm: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, encoded: dict, token_valid_bn=None):
    x_bd = pool(encoded, self.pooling, token_valid_bn)
    if self.use_norm:
      x_bd = nn.LayerNorm(
        epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name='norm'
      )(x_bd)
    return nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed', 'classes')),
      name='logits',
    )(x_bd).astype(jnp.float32)


class ProjectionHead(nn.Module):
  """MLP projection to the contrastive space; output is L2-normalised in float32."""

  hidden_dim: int = 512
  out_dim: int = 128
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bd):
    h = nn.Dense(
      self.hidden_dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ('embed', 'mlp')),
      name='fc1',
    )(x_bd)
    h = nn.gelu(h, approximate=False)
    z = nn.Dense(
      self.out_dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ('mlp', None)),
      name='fc2',
    )(h).astype(jnp.float32)
    # The epsilon keeps the gradient finite for an all-zero projection.
    return z / jnp.sqrt(jnp.sum(z * z, axis=-1, keepdims=True) + 1e-12)
