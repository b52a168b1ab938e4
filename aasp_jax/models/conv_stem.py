"""The standard patch stem: a strided convolution that turns a log-mel into a grid of patch tokens.

This is the ViT / Audio-MAE patchifier (kernel = stride = patch). Its temporal stride is what
lowers the modulation Nyquist frequency and makes content above it alias; `aape.AaPE` wraps this
stem and adds features from that alias-prone band.

Weight layout: the input is laid out NHWC = [B, T, F, 1] and the kernel is [patch_t, patch_f, 1, D],
so a timm / Audio-MAE PyTorch `patch_embed.proj.weight` of shape [D, 1, patch_t, patch_f] (whose
input is [B, 1, T, F]) maps here by `w.transpose(2, 3, 1, 0)`, and its bias maps as is.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# MAE / Audio-MAE initialise the patch projection with xavier_uniform on the kernel viewed as
# [D, patch_t * patch_f]: fan_in is the patch size and fan_out is D (not D * patch size, which is
# what a plain conv xavier would use).
_MAE_PATCH_INIT = nn.initializers.variance_scaling(
  1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2), out_axis=3
)


def check_patch_grid(num_t: int, num_f: int, patch_t: int, patch_f: int) -> None:
  """Raises ValueError unless the [T, F] input tiles exactly into [patch_t, patch_f] patches."""
  if num_t % patch_t or num_f % patch_f:
    raise ValueError(
      f'input [T={num_t}, F={num_f}] does not tile into [{patch_t}, {patch_f}] patches: T must be '
      f'a multiple of patch_t and F a multiple of patch_f (pad or crop the log-mel first).'
    )


class ConvPatchStem(nn.Module):
  """Conv patchifier: log-mel [B, T, F] -> tokens [B, T // patch_t, F // patch_f, D] (time-major).

  Attributes:
    embed_dim: token width D.
    patch_t: patch size (= stride) along time, in frames.
    patch_f: patch size (= stride) along frequency, in mel bins.
    dtype: compute dtype; the output has this dtype.
    param_dtype: parameter dtype.
  """

  embed_dim: int
  patch_t: int = 16
  patch_f: int = 16
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_btf):
    if x_btf.ndim != 3:
      raise ValueError(f'expected a log-mel batch [B, T, F]; got shape {x_btf.shape}.')
    check_patch_grid(x_btf.shape[1], x_btf.shape[2], self.patch_t, self.patch_f)
    x_btfc = x_btf[..., None].astype(self.dtype)
    y_btfd = nn.Conv(
      features=self.embed_dim,
      kernel_size=(self.patch_t, self.patch_f),
      strides=(self.patch_t, self.patch_f),
      padding='VALID',
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(_MAE_PATCH_INIT, (None, None, None, 'embed')),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)),
      name='proj',
    )(x_btfc)
    return nn.with_logical_constraint(y_btfd, ('batch', None, None, 'embed'))
