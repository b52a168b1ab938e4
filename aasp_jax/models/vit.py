"""The ViT encoder of AaSP: patch stem, 2-D positions, CLS token, transformer blocks.

The encoder can encode a subset of tokens: given `visible_idx` [batch, num_visible] it adds positions to
every patch token first and then gathers the visible ones, so a masked student sees exactly the tokens
(and positions) that the full input would have given it, and pays only for those.

Three options make imported encoders compute what they computed in their own code (all default to
AaSP's encoder):
  posemb      'sincos' (AaSP), 'sincos_mae' (Audio-MAE / EAT: the two halves swapped), or 'learned'
              (a parameter `posemb` [max_time_patches, n_freq, width], e.g. an AST / timm table);
              positions are added to the patch tokens only, never to CLS.
  block_norm  'pre' (timm / Audio-MAE: x + attn(norm1(x)), x + mlp(norm2(x)), a final `norm`) or
              'post' (data2vec 2.0 / EAT's AltBlock with layer_norm_first=False:
              x = norm1(x + attn(x)), x = norm2(x + mlp(x)); every token, CLS included, is
              normalised by `input_norm` before the first block, and there is no final norm).
  norm_eps    the epsilon of every LayerNorm of the encoder (timm, Audio-MAE and EAT: 1e-6).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aasp_jax.models import posemb
from aasp_jax.models.attention import Attention, Mlp, layer_norm

Dtype = Any
# What `return_layers` reports per block: 'residual', the block's output (the residual stream), or
# 'ffn', its MLP branch before the residual add (EAT's targets, `end_of_block_targets: false`).
LAYER_SOURCES = ('residual', 'ffn')
BLOCK_NORMS = ('pre', 'post')


class EncoderBlock(nn.Module):
  """Pre-LN (or post-LN) transformer block with optional stochastic depth (used by fine-tuning)."""

  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  post_norm: bool = False  # EAT / data2vec 2.0 AltBlock(layer_norm_first=False)
  norm_eps: float = 1e-6

  def _drop_path(self, y, deterministic: bool, rate):
    if deterministic or (isinstance(rate, float) and rate == 0.0):
      return y
    keep = 1.0 - rate
    # One Bernoulli draw per example: the whole residual branch is dropped or kept.
    shape = (y.shape[0],) + (1,) * (y.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(mask, y / keep, jnp.zeros_like(y))

  @nn.compact
  def __call__(
    self, x_bnd, attn_mask=None, deterministic: bool = True, drop_rate=None, return_ffn=False
  ):
    """drop_rate: this layer's stochastic-depth rate when it is traced (scanned layers).

    return_ffn (static): return (block output, MLP-branch output before the residual add and the
    stochastic depth) instead of the block output alone.
    """
    rate = self.drop_path if drop_rate is None else drop_rate
    norm1 = layer_norm('norm1', self.dtype, self.param_dtype, self.norm_eps)
    norm2 = layer_norm('norm2', self.dtype, self.param_dtype, self.norm_eps)
    attn = Attention(self.num_heads, self.dtype, self.param_dtype, self.attention_impl, name='attn')
    mlp = Mlp(self.mlp_dim, self.dtype, self.param_dtype, name='mlp')
    if self.post_norm:
      # EAT's AltBlock.forward, layer_norm_first=False: the norms follow the residual adds.
      x_bnd = norm1(x_bnd + self._drop_path(attn(x_bnd, mask=attn_mask), deterministic, rate))
      y = mlp(x_bnd)
      x_bnd = norm2(x_bnd + self._drop_path(y, deterministic, rate))
    else:
      x_bnd = x_bnd + self._drop_path(attn(norm1(x_bnd), mask=attn_mask), deterministic, rate)
      y = mlp(norm2(x_bnd))
      x_bnd = x_bnd + self._drop_path(y, deterministic, rate)
    x_bnd = nn.with_logical_constraint(x_bnd, ('batch', 'tokens', 'embed'))
    return (x_bnd, y) if return_ffn else x_bnd


class ScannedEncoderBlock(EncoderBlock):
  """One step of `nn.scan` over the blocks: (carry, per-layer input) -> (carry, layer output).

  The mask, `deterministic` and `return_ffn` are broadcast (the same for every layer; the bools stay
  static); the per-layer input is the layer's stochastic-depth rate. The layer output is the block
  output, or with `return_ffn` its MLP branch before the residual add.
  """

  def __call__(self, x_bnd, attn_mask, deterministic, drop_rate, return_ffn=False):
    x_bnd, ffn_bnd = super().__call__(x_bnd, attn_mask, deterministic, drop_rate, True)
    return x_bnd, (ffn_bnd if return_ffn else x_bnd)


class Encoder(nn.Module):
  """Audio spectrogram transformer encoder.

  Attributes:
    stem: a patch stem module mapping [batch, time, freq] to a [batch, n_time, n_freq, width] grid
      (ConvPatchStem or AaPE).
    max_time_patches: length of the position table along time (750 = 2 min at 16 frames/patch).
    posemb: 'sincos', 'sincos_mae' or 'learned' (see the module docstring).
    block_norm: 'pre' or 'post' (see the module docstring).
    norm_eps: epsilon of every LayerNorm.
    remat: rematerialise each block in the backward pass (saves activation memory).
    scan_layers: run the blocks as one `nn.scan` (parameters stacked under 'blocks' with a leading
      'layers' axis) instead of unrolled 'blocks_0', 'blocks_1', ...: XLA compiles one block
      instead of `depth`, which keeps ViT-B/L compile times (minutes on a TPU slice) flat in depth.
      `unstack_blocks` / `stack_blocks` convert between the two layouts exactly.
  """

  stem: nn.Module
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  max_time_patches: int = 750
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  attention_impl: str | None = None
  scan_layers: bool = False
  posemb: str = 'sincos'
  block_norm: str = 'pre'
  norm_eps: float = 1e-6

  def setup(self):
    if self.posemb not in posemb.KINDS:
      raise ValueError(f'Encoder: posemb={self.posemb!r}; choose one of {posemb.KINDS}.')
    if self.block_norm not in BLOCK_NORMS:
      raise ValueError(f'Encoder: block_norm={self.block_norm!r}; choose one of {BLOCK_NORMS}.')
    self.cls_token = self.param(
      'cls',
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, 'embed')),
      (1, 1, self.width),
      self.param_dtype,
    )
    # Linearly increasing stochastic depth, as in DeiT/BEiT fine-tuning recipes.
    rates = [self.drop_path * i / max(self.depth - 1, 1) for i in range(self.depth)]
    if self.block_norm == 'pre':
      self.norm = layer_norm('norm', self.dtype, self.param_dtype, self.norm_eps)
    else:
      self.input_norm = layer_norm('input_norm', self.dtype, self.param_dtype, self.norm_eps)
    block_options = dict(post_norm=self.block_norm == 'post', norm_eps=self.norm_eps)
    if self.scan_layers:
      self.drop_rates = jnp.asarray(rates, jnp.float32)
      block_cls = ScannedEncoderBlock
      if self.remat:
        block_cls = nn.remat(ScannedEncoderBlock, static_argnums=(3, 5))
      self.blocks = nn.scan(
        block_cls,
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
        length=self.depth,
        metadata_params={nn.PARTITION_NAME: 'layers'},
      )(
        self.num_heads,
        self.mlp_dim,
        0.0,
        self.dtype,
        self.param_dtype,
        self.attention_impl,
        **block_options,
      )
      return
    # static_argnums counts `self`: argument 3 is `deterministic`, 5 is `return_ffn`.
    block_cls = nn.remat(EncoderBlock, static_argnums=(3, 5)) if self.remat else EncoderBlock
    self.blocks = [
      block_cls(
        self.num_heads,
        self.mlp_dim,
        rates[i],
        self.dtype,
        self.param_dtype,
        self.attention_impl,
        **block_options,
      )
      for i in range(self.depth)
    ]

  @nn.compact
  def embed(self, x_btf):
    """Patchifies and adds positions. Returns (tokens [batch, n_time * n_freq, width], grid)."""
    grid_btfd = self.stem(x_btf)
    batch, n_time, n_freq, width = grid_btfd.shape
    if width != self.width:
      raise ValueError(f'Stem width {width} differs from encoder width {self.width}.')
    if self.posemb == 'learned':
      # Created here (a compact method) because its frequency size is the input's patch grid.
      posemb.check_length(n_time, self.max_time_patches)
      table_tfd = self.param(
        'posemb',
        nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), (None, None, 'embed')),
        (self.max_time_patches, n_freq, width),
        self.param_dtype,
      )
      pos_nd = table_tfd[:n_time].reshape(n_time * n_freq, width)
    else:
      pos_nd = posemb.grid_posemb(width, (n_time, n_freq), self.max_time_patches, self.posemb)
    tokens_bnd = grid_btfd.reshape(batch, n_time * n_freq, width) + jnp.asarray(pos_nd, self.dtype)
    tokens_bnd = nn.with_logical_constraint(
      tokens_bnd.astype(self.dtype), ('batch', 'tokens', 'embed')
    )
    return tokens_bnd, (n_time, n_freq)

  def encode_tokens(
    self,
    tokens_bnd,
    token_valid_bn=None,
    deterministic: bool = True,
    return_layers: bool = False,
    layer_source: str = 'residual',
  ):
    """Runs CLS + blocks + final norm (pre-LN; post-LN: input norm + blocks) over already
    position-embedded tokens.

    Args:
      tokens_bnd: [batch, n, width] tokens (any subset of the grid, positions already added).
      token_valid_bn: optional bool [batch, n]; False marks padding that no token may attend to.
      deterministic: disables stochastic depth.
      return_layers: also return every block's output (before the final norm), for teacher targets.
      layer_source: what 'layers' holds per block: 'residual' (the block output) or 'ffn' (the MLP
        branch before the residual add, EAT's targets).

    Returns:
      dict with 'cls' [batch, width], 'tokens' [batch, n, width] and optionally
      'layers' [depth, batch, n, width] (patch tokens only).
    """
    if layer_source not in LAYER_SOURCES:
      raise ValueError(
        f'layer_source={layer_source!r} is not valid; choose one of {LAYER_SOURCES}.'
      )
    return_ffn = return_layers and layer_source == 'ffn'
    batch = tokens_bnd.shape[0]
    cls_b1d = jnp.broadcast_to(self.cls_token, (batch, 1, self.width)).astype(self.dtype)
    x_bnd = jnp.concatenate([cls_b1d, tokens_bnd.astype(self.dtype)], axis=1)
    attn_mask = None
    if token_valid_bn is not None:
      valid_bn = jnp.concatenate([jnp.ones((batch, 1), bool), token_valid_bn.astype(bool)], axis=1)
      attn_mask = valid_bn[:, None, None, :]  # [batch, heads, queries, keys]
    if self.block_norm == 'post':
      # EAT: BlockEncoder's norm (context_encoder.norm / pre_norm) over CLS + patch tokens.
      x_bnd = self.input_norm(x_bnd)
    if self.scan_layers:
      x_bnd, layers_lbnd = self.blocks(x_bnd, attn_mask, deterministic, self.drop_rates, return_ffn)
      layers = layers_lbnd[:, :, 1:] if return_layers else None
    else:
      per_block = []
      for block in self.blocks:
        # Positional: remat's static_argnums (deterministic, return_ffn) count positions.
        x_bnd = block(x_bnd, attn_mask, deterministic, None, return_ffn)
        if return_ffn:
          x_bnd, ffn_bnd = x_bnd
          per_block.append(ffn_bnd[:, 1:])
        elif return_layers:
          per_block.append(x_bnd[:, 1:])
      layers = jnp.stack(per_block) if return_layers else None
    if self.block_norm == 'pre':
      x_bnd = self.norm(x_bnd)
    out = {'cls': x_bnd[:, 0], 'tokens': x_bnd[:, 1:]}
    if return_layers:
      out['layers'] = layers
    return out

  def __call__(
    self,
    x_btf,
    visible_idx=None,
    token_valid_bn=None,
    deterministic: bool = True,
    return_layers: bool = False,
    layer_source: str = 'residual',
  ):
    """Encodes a log-mel batch [batch, time, freq].

    Args:
      x_btf: normalised log-mel.
      visible_idx: optional int [batch, num_visible] indices into the time-major token grid; only these
        tokens are encoded (static shape: every example keeps the same number).
      token_valid_bn: optional bool mask over the (gathered) tokens, False for padding.
      deterministic: disables stochastic depth.
      return_layers: also return per-block outputs.
      layer_source: 'residual' or 'ffn', see `encode_tokens`.
    """
    tokens_bnd, _ = self.embed(x_btf)
    if visible_idx is not None:
      tokens_bnd = gather_tokens(tokens_bnd, visible_idx)
    return self.encode_tokens(
      tokens_bnd, token_valid_bn, deterministic, return_layers, layer_source
    )


def gather_tokens(tokens_bnd, idx_bk):
  """Selects tokens per example: [batch, n, d], [batch, k] -> [batch, k, d]."""
  return jnp.take_along_axis(tokens_bnd, idx_bk[:, :, None].astype(jnp.int32), axis=1)


def unstack_blocks(encoder_params: dict, depth: int) -> dict:
  """Scanned-layout encoder parameters -> the unrolled layout ('blocks' -> 'blocks_0', ...).

  Works on plain (unboxed) arrays; logical-axis boxes are removed first.
  """
  params = dict(nn.meta.unbox(encoder_params))
  if 'blocks' not in params:
    return params
  stacked = params.pop('blocks')
  for i in range(depth):
    params[f'blocks_{i}'] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return params


def stack_blocks(encoder_params: dict, depth: int) -> dict:
  """Unrolled-layout encoder parameters -> the scanned layout (the inverse of unstack_blocks)."""
  params = dict(nn.meta.unbox(encoder_params))
  per_layer = [params.pop(f'blocks_{i}') for i in range(depth)]
  params['blocks'] = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
  return params
