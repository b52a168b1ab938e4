"""Audio-MAE's decoder as a predictor (`model.predictor.kind='mae'`, the `recipe=mae` default).

What it computes is `MaskedAutoencoderViT.forward_decoder` of Audio-MAE (facebookresearch/AudioMAE,
models_mae.py:358-399 at bd60e29), returned at the masked positions only (the only ones its
`forward_loss` reads): the visible encoder outputs go through `decoder_embed`, a shared mask token
fills every masked position (the scatter below is its concat + `ids_restore` gather), the fixed 2-D
sin-cos decoder positions are added (MAE's order, computed in float64 as Audio-MAE does:
`decoder_posemb`), then the decoder blocks, `decoder_norm` and `decoder_pred`.

Two block stacks, Audio-MAE's `decoder_mode` (`attention` here):
- 'local' (decoder_mode=1): what its released AudioSet-2M pre-training uses (main_pretrain.py's
  default and submit_pretrain_audioset2M.sh: `--decoder_mode 1`). 16 Swin-V2-style blocks
  (timm_patch/swin_transformer.py:214-376), width 512, 16 heads, MLP ratio 4, 4x4 (time x
  frequency) windows; even blocks unshifted, odd blocks cyclically shifted by 2 time patches
  (models_mae.py:82-109). Each block is residual post-norm, x + LN(attn(x)), x + LN(mlp(x)); the
  attention is scaled cosine attention with a learned per-head temperature (clamped at 0.01) plus a
  relative-position bias from a 2 -> 384 -> heads ReLU meta-MLP on log-spaced offsets, and shifted
  windows mask cross-region pairs with -100. The CLS token is dropped before these blocks
  (models_mae.py:371-373), so this mode needs no CLS.
- 'global' (decoder_mode=0): pre-norm ViT blocks (timm 0.3.2 `Block`; Audio-MAE's
  `mae_vit_base_patch16` uses 8 of them, width 512, 16 heads) over the CLS token and all patches;
  the CLS enters through `decoder_embed` with a zero position and is dropped after `decoder_pred`.
  The encoder's CLS output is the optional `cls_rd` argument (the other predictors take none).

Differences from Audio-MAE's code, all deliberate and listed:
- The meta-MLP has dropout 0.1 on both of its layers in Audio-MAE (active in training). It runs here
  only when the call passes `deterministic=False` with a 'dropout' rng; otherwise the bias is the
  deterministic one (Audio-MAE's eval mode). Whether training passes it (and `cls_rd`) is the train
  step's choice: a step that passes neither trains 'local' without that dropout.
- Audio-MAE's Swin decoder is built for one fixed grid (64 x 8, models_mae.py:76-81); here the grid
  is the call's, with the window clamped to the grid as `SwinTransformerBlock._calc_window_shift`
  does. A grid that the window does not tile is refused (Audio-MAE's reshape would fail too).
- Predictions are computed only at the masked positions (norm and projection are per token, so
  those rows are identical; the visible rows carry no loss in Audio-MAE).
- Separate query/key/value kernels instead of a fused qkv; they are initialised with the fused
  matrix's Xavier bound, so the initial distribution is Audio-MAE's.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aasp_jax.models import posemb
from aasp_jax.models.attention import Mlp, layer_norm
from aasp_jax.models.vit import gather_tokens

Dtype = Any

ATTENTIONS = ('local', 'global')  # Audio-MAE's decoder_mode 1 and 0
# Pre-softmax value for pairs of tokens from different regions of a shifted window (timm's -100).
SHIFT_MASK_VALUE = -100.0
# Floors of the cosine attention: on the product of the norms, and on the learned temperature.
COSINE_EPS = 1e-6
MIN_TAU = 0.01


def _xavier(axes):
  return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


# Xavier-uniform of a fused [width, 3 * width] qkv matrix (the bound sqrt(6 / (4 * width))), for
# each of the three [width, width] kernels: fan_avg of the fused matrix is twice that of one part.
_QKV_INIT = nn.initializers.variance_scaling(0.5, 'fan_avg', 'uniform')


def _qkv(x, width, num_heads, dtype, param_dtype):
  """Query, key and value [..., tokens, heads, head_dim] from x [..., tokens, width]."""

  def project(name):
    y = nn.Dense(
      width,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(_QKV_INIT, ('embed', 'heads')),
      bias_init=_zeros(('heads',)),
      name=name,
    )(x)
    return y.reshape(*y.shape[:-1], num_heads, width // num_heads)

  return project('query'), project('key'), project('value')


def _out_proj(x, width, dtype, param_dtype):
  return nn.Dense(
    width,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=_xavier(('heads', 'embed')),
    bias_init=_zeros(('embed',)),
    name='out',
  )(x.reshape(*x.shape[:-2], width))


def decoder_posemb(width: int, grid: tuple[int, int], max_time_patches: int) -> np.ndarray:
  """Audio-MAE's decoder positions [N, width] float32: MAE's order (the frequency code in the first
  half, time in the second), computed in float64 and rounded once, as util/pos_embed.py:38-85 does
  (its omega is `np.float`). That is our float64 'sincos' table with its halves swapped; posemb's
  'sincos_mae' follows EAT's float32 computation, which differs in the last bits."""
  table = posemb.grid_posemb(width, grid, max_time_patches, 'sincos')
  return np.concatenate([table[:, width // 2 :], table[:, : width // 2]], axis=1)


# ------------------------------------------------------------------------------ window geometry


def window_layout(
  grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
  """(window, shift) on `grid`: an axis no longer than its window gets the whole axis and no shift
  (timm_patch/swin_transformer.py:282-285). Raises ValueError if the window does not tile the
  grid."""
  win = tuple(min(g, w) for g, w in zip(grid, window))
  sft = tuple(0 if g <= w else s for g, w, s in zip(grid, win, shift))
  if grid[0] % win[0] or grid[1] % win[1]:
    raise ValueError(
      f'The Audio-MAE local decoder needs a patch grid that its {win[0]}x{win[1]} windows tile; '
      f'got {grid[0]}x{grid[1]} (time x frequency). Use a number of time patches that is a '
      f'multiple of {win[0]} (frontend.target_length a multiple of {win[0]} patches) or '
      "model.predictor.mae_attention='global'."
    )
  return win, sft


def partition(x_bhwc, window: tuple[int, int]):
  """[B, H, W, C] -> [B, windows, window_t * window_f, C]; windows row-major over the grid."""
  b, h, w, c = x_bhwc.shape
  wt, wf = window
  x = x_bhwc.reshape(b, h // wt, wt, w // wf, wf, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // wt) * (w // wf), wt * wf, c)


def merge(x_bnlc, window: tuple[int, int], grid: tuple[int, int]):
  """Inverse of `partition`: [B, windows, window area, C] -> [B, H, W, C]."""
  b, _, _, c = x_bnlc.shape
  (h, w), (wt, wf) = grid, window
  x = x_bnlc.reshape(b, h // wt, w // wf, wt, wf, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def _regions(length: int, window: int, shift: int) -> np.ndarray:
  """Region of each position on one axis after a cyclic shift: the rows that wrapped around form
  their own regions, so a window never mixes tokens that were not neighbours before the roll."""
  if shift == 0:
    return np.zeros(length, np.int64)
  pos = np.arange(length)
  return np.where(pos < length - window, 0, np.where(pos < length - shift, 1, 2))


def shift_mask(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]):
  """Additive attention mask [windows, area, area] for a shifted block (None when unshifted):
  0 within a region, SHIFT_MASK_VALUE across regions (timm_patch/swin_transformer.py:287-311)."""
  if not any(shift):
    return None
  ids_hw = (
    3 * _regions(grid[0], window[0], shift[0])[:, None]
    + _regions(grid[1], window[1], shift[1])[None, :]
  )
  ids_nl = np.asarray(partition(ids_hw[None, :, :, None], window))[0, :, :, 0]
  return np.where(ids_nl[:, None, :] != ids_nl[:, :, None], SHIFT_MASK_VALUE, 0.0)


def relative_coords_log(window: tuple[int, int]) -> np.ndarray:
  """[area * area, 2] offsets between the cells of a window, sign(d) * log(1 + |d|), row-major over
  (query, key) pairs (timm_patch/swin_transformer.py:121-131)."""
  t, f = np.meshgrid(np.arange(window[0]), np.arange(window[1]), indexing='ij')
  coords_2l = np.stack([t.reshape(-1), f.reshape(-1)])
  rel_llc = (coords_2l[:, :, None] - coords_2l[:, None, :]).transpose(1, 2, 0).astype(np.float64)
  return (np.sign(rel_llc) * np.log1p(np.abs(rel_llc))).reshape(-1, 2)


# ------------------------------------------------------------------------------------ blocks


class WindowAttention(nn.Module):
  """Scaled cosine self-attention inside each window, with the meta-MLP position bias."""

  num_heads: int
  window: tuple[int, int]
  meta_hidden: int = 384
  meta_dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bnlc, mask_nll, deterministic: bool = True):
    width = x_bnlc.shape[-1]
    q, k, v = _qkv(x_bnlc, width, self.num_heads, self.dtype, self.param_dtype)
    # The logits in at least float32 whatever the compute dtype: cosines over a temperature that
    # may reach 0.01, so bf16 rounding would be amplified 100-fold.
    f = jnp.promote_types(self.dtype, jnp.float32)
    qf, kf = q.astype(f), k.astype(f)
    dots = jnp.einsum('bnlhd,bnmhd->bnhlm', qf, kf)
    q_norm = jnp.linalg.norm(qf, axis=-1).transpose(0, 1, 3, 2)  # [b, n, h, l]
    k_norm = jnp.linalg.norm(kf, axis=-1).transpose(0, 1, 3, 2)
    logits = dots / jnp.maximum(q_norm[..., :, None] * k_norm[..., None, :], COSINE_EPS)
    tau = self.param(
      'tau',
      nn.with_logical_partitioning(nn.initializers.ones_init(), (None,)),
      (self.num_heads,),
      self.param_dtype,
    )
    logits = logits / jnp.maximum(tau.astype(f), MIN_TAU)[:, None, None]
    logits = logits + self._position_bias(f, deterministic)
    if mask_nll is not None:
      logits = logits + jnp.asarray(mask_nll, f)[None, :, None]
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bnhlm,bnmhd->bnlhd', probs, v)
    return _out_proj(out, width, self.dtype, self.param_dtype)

  def _position_bias(self, dtype, deterministic: bool):
    """[heads, area, area] in `dtype` from the meta-MLP (timm_patch/swin_transformer.py:144-157)."""
    area = self.window[0] * self.window[1]
    h = jnp.asarray(relative_coords_log(self.window), dtype)
    h = nn.Dense(
      self.meta_hidden,
      dtype=dtype,
      param_dtype=self.param_dtype,
      kernel_init=_xavier((None, None)),
      bias_init=_zeros((None,)),
      name='meta_fc1',
    )(h)
    h = nn.Dropout(self.meta_dropout)(nn.relu(h), deterministic=deterministic)
    h = nn.Dense(
      self.num_heads,
      dtype=dtype,
      param_dtype=self.param_dtype,
      kernel_init=_xavier((None, None)),
      bias_init=_zeros((None,)),
      name='meta_fc2',
    )(h)
    h = nn.Dropout(self.meta_dropout)(h, deterministic=deterministic)
    return h.T.reshape(self.num_heads, area, area)


class SwinBlock(nn.Module):
  """Residual post-norm window block, x + LN(attn(x)) then x + LN(mlp(x))
  (timm_patch/swin_transformer.py:362-376)."""

  num_heads: int
  grid: tuple[int, int]
  window: tuple[int, int]
  shift: tuple[int, int]
  mlp_ratio: float = 4.0
  meta_hidden: int = 384
  meta_dropout: float = 0.1
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc, deterministic: bool = True):
    width = x_bhwc.shape[-1]
    shift = self.shift
    y = jnp.roll(x_bhwc, (-shift[0], -shift[1]), axis=(1, 2)) if any(shift) else x_bhwc
    y = WindowAttention(
      self.num_heads,
      self.window,
      self.meta_hidden,
      self.meta_dropout,
      self.dtype,
      self.param_dtype,
      name='attn',
    )(partition(y, self.window), shift_mask(self.grid, self.window, shift), deterministic)
    y = merge(y, self.window, self.grid)
    y = jnp.roll(y, shift, axis=(1, 2)) if any(shift) else y
    x_bhwc = x_bhwc + layer_norm('norm1', self.dtype, self.param_dtype, self.norm_eps)(y)
    y = Mlp(int(width * self.mlp_ratio), self.dtype, self.param_dtype, name='mlp')(x_bhwc)
    x_bhwc = x_bhwc + layer_norm('norm2', self.dtype, self.param_dtype, self.norm_eps)(y)
    return nn.with_logical_constraint(x_bhwc, ('batch', None, None, 'embed'))


class GlobalBlock(nn.Module):
  """Pre-norm ViT block over the whole sequence (timm 0.3.2 `Block`, fused-qkv init).

  The attention is written out rather than `jax.nn.dot_product_attention`, which forms its softmax
  in float32 whatever the input dtype: here the logits are in at least float32 (float64 stays
  float64, so the oracle test can hold this block to Audio-MAE's at float64 rounding).
  """

  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bnc, deterministic: bool = True):
    del deterministic  # no dropout in this block; kept so both blocks share one call
    width = x_bnc.shape[-1]
    h = layer_norm('norm1', self.dtype, self.param_dtype, self.norm_eps)(x_bnc)
    q, k, v = _qkv(h, width, self.num_heads, self.dtype, self.param_dtype)
    f = jnp.promote_types(self.dtype, jnp.float32)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q.astype(f), k.astype(f)) / np.sqrt(
      width // self.num_heads
    )
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    x_bnc = x_bnc + _out_proj(out, width, self.dtype, self.param_dtype)
    h = layer_norm('norm2', self.dtype, self.param_dtype, self.norm_eps)(x_bnc)
    x_bnc = x_bnc + Mlp(int(width * self.mlp_ratio), self.dtype, self.param_dtype, name='mlp')(h)
    return nn.with_logical_constraint(x_bnc, ('batch', 'tokens', 'embed'))


# ----------------------------------------------------------------------------------- decoder


class AudioMaeDecoder(nn.Module):
  """Audio-MAE's forward_decoder at the masked positions; same call as CrossAttentionPredictor.

  Parameter names map to Audio-MAE's: embed = decoder_embed, mask_token, block_{i} =
  decoder_blocks.{i} (query/key/value = the thirds of attn.qkv, out = attn.proj), norm =
  decoder_norm, out_proj = decoder_pred.
  """

  # Tells the train step that this predictor reads the encoder's CLS output (`cls_rd`; 'global').
  takes_cls: ClassVar[bool] = True

  width: int = 512
  depth: int = 16
  num_heads: int = 16
  mlp_ratio: float = 4.0
  out_dim: int = 256
  attention: str = 'local'
  window: tuple[int, int] = (4, 4)
  shift: tuple[int, int] = (2, 0)
  meta_hidden: int = 384
  meta_dropout: float = 0.1
  norm_eps: float = 1e-6
  max_time_patches: int = 750
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    visible_rvd,
    visible_idx_rv,
    masked_idx_rk,
    grid: tuple[int, int],
    cls_rd=None,
    deterministic: bool = True,
  ):
    """Returns reconstructions [rows, num_masked, out_dim].

    Args:
      visible_rvd: the encoder's outputs for the visible patches (after its final norm, no CLS).
      visible_idx_rv: their grid indices (time-major), any order without repeats.
      masked_idx_rk: grid indices of the positions to predict; the output's order.
      grid: (n_time, n_freq) patch grid of the clip.
      cls_rd: the encoder's CLS output [rows, encoder width]; 'global' attends to it (Audio-MAE's
        decoder_mode=0 does), 'local' ignores it (decoder_mode=1 drops it before its blocks). Only
        `init` may leave it out for 'global': parameter shapes do not depend on it.
      deterministic: False applies the meta-MLP dropout ('local'; needs a 'dropout' rng).
    """
    if self.attention not in ATTENTIONS:
      raise ValueError(
        f'model.predictor.mae_attention={self.attention!r} is not valid; choose one of '
        f'{ATTENTIONS}.'
      )
    if self.width % self.num_heads:
      raise ValueError(
        f'Audio-MAE decoder width {self.width} is not divisible by num_heads={self.num_heads}.'
      )
    if self.attention == 'global' and cls_rd is None and not self.is_initializing():
      raise ValueError(
        "The Audio-MAE global decoder (decoder_mode=0) attends to the encoder's CLS output: pass "
        'cls_rd.'
      )
    n_time, n_freq = grid
    rows = visible_rvd.shape[0]
    embed = nn.Dense(
      self.width,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_xavier(('embed', None)),
      bias_init=_zeros((None,)),
      name='embed',
    )
    mask_token = self.param(
      'mask_token',
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, 'embed')),
      (1, 1, self.width),
      self.param_dtype,
    )
    # The mask token everywhere, the embedded visible tokens at their own positions.
    x_rnc = jnp.broadcast_to(mask_token.astype(self.dtype), (rows, n_time * n_freq, self.width))
    x_rnc = x_rnc.at[jnp.arange(rows)[:, None], visible_idx_rv].set(
      embed(visible_rvd).astype(self.dtype)
    )
    pos_nc = decoder_posemb(self.width, grid, self.max_time_patches)
    x_rnc = x_rnc + jnp.asarray(pos_nc, self.dtype)
    if self.attention == 'local':
      x_rnc = self._local_blocks(x_rnc, grid, deterministic)
    else:
      x_rnc = self._global_blocks(x_rnc, embed, cls_rd, deterministic)
    x_rkc = gather_tokens(x_rnc, masked_idx_rk)
    x_rkc = layer_norm('norm', self.dtype, self.param_dtype, self.norm_eps)(x_rkc)
    return nn.Dense(
      self.out_dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_xavier((None, 'embed')),
      bias_init=_zeros(('embed',)),
      name='out_proj',
    )(x_rkc)

  def _block_class(self, cls):
    # static_argnums counts `self`: argument 2 is `deterministic`.
    return nn.remat(cls, static_argnums=(2,)) if self.remat else cls

  def _local_blocks(self, x_rnc, grid, deterministic):
    window, shift = window_layout(grid, self.window, self.shift)
    block = self._block_class(SwinBlock)
    x = x_rnc.reshape(x_rnc.shape[0], grid[0], grid[1], self.width)
    for i in range(self.depth):
      x = block(
        self.num_heads,
        grid,
        window,
        shift if i % 2 else (0, 0),
        self.mlp_ratio,
        self.meta_hidden,
        self.meta_dropout,
        self.norm_eps,
        self.dtype,
        self.param_dtype,
        name=f'block_{i}',
      )(x, deterministic)
    return x.reshape(x_rnc.shape)

  def _global_blocks(self, x_rnc, embed, cls_rd, deterministic):
    if cls_rd is not None:
      # The CLS row's decoder position is 0 (the table's first row, models_mae.py:152-156).
      x_rnc = jnp.concatenate([embed(cls_rd[:, None]).astype(self.dtype), x_rnc], axis=1)
    block = self._block_class(GlobalBlock)
    for i in range(self.depth):
      x_rnc = block(
        self.num_heads,
        self.mlp_ratio,
        self.norm_eps,
        self.dtype,
        self.param_dtype,
        name=f'block_{i}',
      )(x_rnc, deterministic)
    return x_rnc[:, 1:] if cls_rd is not None else x_rnc
