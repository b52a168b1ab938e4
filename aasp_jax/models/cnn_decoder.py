"""EAT / data2vec 2.0-style CNN decoder: the predictor of `recipe=eat` and AaSP's `predictor=cnn`.

Visible student tokens are scattered back onto the patch grid, masked cells are filled, and a stack
of 2-D convolutions (LayerNorm, GELU, residual) mixes neighbours before a linear projection to the
target width. Predictions are read out at the masked positions.

EAT's decoder (models/modules.py:182-230, DecoderBase 98-121, ModalitySpecificEncoder.decoder_input
models/base.py:165-195 at 06c1c34), which `input_proj=False, norm_affine=False, norm_eps=1e-5,
mask_fill='noise'` and `width` = the encoder width reproduce:
  x = cat(visible outputs without CLS, N(0, mask_noise_std) noise)  fresh noise every step, gathered
                                                                     back to grid order; no positions
  for each layer i:  y = GELU(LayerNorm_noaffine(Conv2d_grouped(x)))  (eps 1e-5: fairseq's LayerNorm)
                     x = y + x   whenever the channel counts match (DecoderBase.add_residual), so at
                                 layer 0 too when the decoder is as wide as the encoder
  out = Linear(x) at the masked positions
The AaSP variant (the defaults) projects the encoder output to `width` first (`in_proj`), uses an
affine LayerNorm and a learned mask token. Either way the residual follows data2vec's rule.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aasp_jax.models.vit import gather_tokens

Dtype = Any
MASK_FILLS = ('token', 'noise')


class GroupedConv(nn.Module):
  """A 'SAME' 2-D convolution with `groups` channel groups over [B, T, F, C], computed as one
  einsum over the kernel's shifted views. It has nn.Conv's parameters (kernel [kh, kw, C / groups,
  features], output channel o in group o // (features / groups); bias [features]) and its result;
  XLA's CPU grouped convolution is ~15x slower than this on EAT's 16-group decoder."""

  features: int
  kernel_size: tuple[int, int]
  groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btfc):
    kh, kw = self.kernel_size
    channels = x_btfc.shape[-1]
    if channels % self.groups or self.features % self.groups:
      raise ValueError(
        f'grouped convolution: {channels} -> {self.features} channels do not split into '
        f'{self.groups} groups.'
      )
    kernel = self.param(
      'kernel',
      nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, 'embed')),
      (kh, kw, channels // self.groups, self.features),
      self.param_dtype,
    )
    bias = self.param(
      'bias',
      nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)),
      (self.features,),
      self.param_dtype,
    )
    x_btfc = x_btfc.astype(self.dtype)
    batch, n_t, n_f, _ = x_btfc.shape
    # SAME padding for odd and even kernels, as lax.conv's 'SAME' (the extra row goes after).
    pad_t, pad_f = kh - 1, kw - 1
    x = jnp.pad(
      x_btfc, ((0, 0), (pad_t // 2, pad_t - pad_t // 2), (pad_f // 2, pad_f - pad_f // 2), (0, 0))
    )
    views = jnp.stack(
      [x[:, i : i + n_t, j : j + n_f] for i in range(kh) for j in range(kw)], axis=3
    )  # [B, T, F, kh * kw, C]
    cg, og = channels // self.groups, self.features // self.groups
    views = views.reshape(batch, n_t, n_f, kh * kw, self.groups, cg)
    k = kernel.astype(self.dtype).reshape(kh * kw, cg, self.groups, og)
    y = jnp.einsum('btfkgc,kcgo->btfgo', views, k).reshape(batch, n_t, n_f, self.features)
    return y + bias.astype(self.dtype)


class CnnDecoder(nn.Module):
  """Same call signature as CrossAttentionPredictor, plus `mask_noise` for mask_fill='noise'.

  Attributes:
    width: decoder channels.
    input_proj: a Dense from the encoder width to `width` before the first convolution (AaSP);
      False: the first convolution reads the encoder output directly (EAT).
    norm_affine / norm_eps: the LayerNorm after each convolution (EAT: no affine, 1e-5).
    mask_fill: 'token' (a learned mask token) or 'noise' (EAT: N(0, mask_noise_std) per cell, drawn
      by the caller each step and passed as `mask_noise` [R, K, C], C the decoder's input channels).
  """

  width: int = 384
  num_layers: int = 6
  kernel_size: int = 3
  groups: int = 16
  out_dim: int = 768
  input_proj: bool = True
  norm_affine: bool = True
  norm_eps: float = 1e-6
  mask_fill: str = 'token'
  mask_noise_std: float = 0.01
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def input_channels(self, encoder_width: int) -> int:
    """Channels of the grid the first convolution reads (what `mask_noise` must have)."""
    return self.width if self.input_proj else encoder_width

  def draw_mask_noise(self, rng, masked_idx_rk, encoder_width: int) -> jax.Array:
    """EAT's masked-cell fill: N(0, mask_noise_std) [R, K, C] (base.py:175-179)."""
    shape = masked_idx_rk.shape + (self.input_channels(encoder_width),)
    return self.mask_noise_std * jax.random.normal(rng, shape, jnp.float32)

  @nn.compact
  def __call__(self, visible_bvd, visible_idx_bv, masked_idx_bm, grid: tuple[int, int],
               mask_noise=None):
    if self.width % self.groups:
      raise ValueError(f'CNN decoder width {self.width} is not divisible by groups={self.groups}.')
    if self.mask_fill not in MASK_FILLS:
      raise ValueError(f'CNN decoder mask_fill={self.mask_fill!r}; choose one of {MASK_FILLS}.')
    n_time, n_freq = grid
    batch = visible_bvd.shape[0]
    x_bvd = visible_bvd
    if self.input_proj:
      x_bvd = nn.Dense(
        self.width,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ('embed', None)),
        name='in_proj',
      )(x_bvd)
    channels = x_bvd.shape[-1]
    if channels % self.groups:
      raise ValueError(
        f'CNN decoder input width {channels} is not divisible by groups={self.groups}.'
      )
    rows_b1 = jnp.arange(batch)[:, None]
    if self.mask_fill == 'token':
      mask_token = self.param(
        'mask_token',
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, 'embed')),
        (1, 1, channels),
        self.param_dtype,
      )
      full_bnd = jnp.broadcast_to(mask_token.astype(self.dtype), (batch, n_time * n_freq, channels))
    else:
      if mask_noise is None:
        raise ValueError("CNN decoder mask_fill='noise' needs mask_noise [R, K, C] from the step.")
      full_bnd = jnp.zeros((batch, n_time * n_freq, channels), self.dtype)
      full_bnd = full_bnd.at[rows_b1, masked_idx_bm].set(mask_noise.astype(self.dtype))
    full_bnd = full_bnd.at[rows_b1, visible_idx_bv].set(x_bvd.astype(self.dtype))
    h_btfd = full_bnd.reshape(batch, n_time, n_freq, channels)
    for i in range(self.num_layers):
      y = GroupedConv(
        self.width,
        (self.kernel_size, self.kernel_size),
        self.groups,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f'conv_{i}',
      )(h_btfd)
      y = nn.LayerNorm(
        epsilon=self.norm_eps,
        use_scale=self.norm_affine,
        use_bias=self.norm_affine,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f'norm_{i}',
      )(y)
      y = nn.gelu(y, approximate=False)
      # data2vec 2.0's DecoderBase.add_residual (modules.py:111-121): the residual is added
      # whenever the channel counts match, the first layer included.
      h_btfd = h_btfd + y if h_btfd.shape[-1] == y.shape[-1] else y
    h_bnd = h_btfd.reshape(batch, n_time * n_freq, self.width)
    out_bmd = nn.Dense(
      self.out_dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, 'embed')),
      name='out_proj',
    )(gather_tokens(h_bnd, masked_idx_bm))
    return out_bmd
