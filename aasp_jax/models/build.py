"""Builds the model modules from a config's `model` section (the only place that maps names to classes).

Sizes come from `VARIANTS`; configs copy a variant's numbers into explicit fields so every size stays
overridable on the command line (`--config.model.depth=6`).
"""

import jax.numpy as jnp
from ml_collections import ConfigDict

from aasp_jax import later_fields
from aasp_jax.models import posemb, vit
from aasp_jax.models.aape import AaPE
from aasp_jax.models.cnn_decoder import CnnDecoder
from aasp_jax.models.conv_stem import ConvPatchStem
from aasp_jax.models.mae_decoder import AudioMaeDecoder
from aasp_jax.models.predictor import CrossAttentionPredictor
from aasp_jax.models.vit import Encoder

# width, depth, heads, MLP width. 'tiny' is sized for CPU runs (minutes, not hours).
VARIANTS = {
  'tiny': dict(width=128, depth=4, num_heads=4, mlp_dim=512),
  'S': dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
  'B': dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
  'L': dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}
STEMS = ('aape', 'conv')
POSEMBS = posemb.KINDS  # 'sincos' | 'sincos_mae' | 'learned' (aasp_jax/models/vit.py)
BLOCK_NORMS = vit.BLOCK_NORMS  # 'pre' | 'post'
PREDICTORS = ('cross_attention', 'cnn', 'mae')  # 'mae': Audio-MAE's decoder (models/mae_decoder.py)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def dtype_of(name: str):
  if name not in DTYPES:
    raise ValueError(f'Unknown dtype {name!r}; choose one of {sorted(DTYPES)}.')
  return DTYPES[name]


def _attention_impl(model_cfg: ConfigDict):
  # 'xla' lets XLA pick (portable); 'cudnn' is the fused flash-attention kernel on NVIDIA GPUs.
  return None if model_cfg.attention_impl == 'xla' else model_cfg.attention_impl


def build_stem(model_cfg: ConfigDict):
  dtype, param_dtype = dtype_of(model_cfg.dtype), dtype_of(model_cfg.param_dtype)
  common = dict(
    embed_dim=model_cfg.width,
    patch_t=model_cfg.patch_t,
    patch_f=model_cfg.patch_f,
    dtype=dtype,
    param_dtype=param_dtype,
  )
  if model_cfg.stem == 'conv':
    return ConvPatchStem(**common)
  if model_cfg.stem == 'aape':
    aape = model_cfg.aape.to_dict()
    aape['spectrum_floor'] = later_fields.get(model_cfg.aape, 'model.aape.spectrum_floor')
    return AaPE(**common, **aape)
  raise ValueError(f'Unknown model.stem {model_cfg.stem!r}; choose one of {STEMS}.')


def build_encoder(model_cfg: ConfigDict, drop_path: float | None = None) -> Encoder:
  """The encoder (student and teacher share this architecture)."""
  return Encoder(
    stem=build_stem(model_cfg),
    width=model_cfg.width,
    depth=model_cfg.depth,
    num_heads=model_cfg.num_heads,
    mlp_dim=model_cfg.mlp_dim,
    max_time_patches=model_cfg.max_time_patches,
    drop_path=model_cfg.drop_path if drop_path is None else drop_path,
    dtype=dtype_of(model_cfg.dtype),
    param_dtype=dtype_of(model_cfg.param_dtype),
    remat=model_cfg.remat,
    scan_layers=model_cfg.scan_layers,
    attention_impl=_attention_impl(model_cfg),
    # Configs saved before these fields existed describe the defaults (AaSP's own encoder).
    posemb=later_fields.get(model_cfg, 'model.posemb'),
    block_norm=later_fields.get(model_cfg, 'model.block_norm'),
    norm_eps=float(later_fields.get(model_cfg, 'model.norm_eps')),
  )


def predictor_width(model_cfg: ConfigDict) -> int:
  """model.predictor.width, where 0 means the encoder's width (EAT's decoder is as wide)."""
  return model_cfg.predictor.width or model_cfg.width


def build_predictor(model_cfg: ConfigDict):
  """The masked-target predictor; outputs are projected to the encoder width."""
  p = model_cfg.predictor
  dtype, param_dtype = dtype_of(model_cfg.dtype), dtype_of(model_cfg.param_dtype)
  if p.kind == 'cross_attention':
    return CrossAttentionPredictor(
      width=predictor_width(model_cfg),
      depth=p.depth,
      num_heads=p.num_heads,
      mlp_ratio=p.mlp_ratio,
      out_dim=model_cfg.width,
      max_time_patches=model_cfg.max_time_patches,
      dtype=dtype,
      param_dtype=param_dtype,
      attention_impl=_attention_impl(model_cfg),
    )
  if p.kind == 'cnn':
    return CnnDecoder(
      width=predictor_width(model_cfg),
      num_layers=p.cnn_layers,
      kernel_size=p.cnn_kernel_size,
      groups=p.cnn_groups,
      out_dim=model_cfg.width,
      # Switches added with EAT's decoder (configs saved before them mean the AaSP decoder).
      input_proj=later_fields.get(p, 'model.predictor.cnn_input_proj'),
      norm_affine=later_fields.get(p, 'model.predictor.cnn_norm_affine'),
      norm_eps=float(later_fields.get(p, 'model.predictor.cnn_norm_eps')),
      mask_fill=later_fields.get(p, 'model.predictor.cnn_mask_fill'),
      mask_noise_std=float(later_fields.get(p, 'model.predictor.cnn_mask_noise_std')),
      dtype=dtype,
      param_dtype=param_dtype,
    )
  if p.kind == 'mae':
    return AudioMaeDecoder(
      width=p.mae_width,
      depth=p.mae_depth,
      num_heads=p.mae_num_heads,
      mlp_ratio=p.mlp_ratio,
      out_dim=model_cfg.width,
      attention=p.mae_attention,
      max_time_patches=model_cfg.max_time_patches,
      remat=model_cfg.remat,
      dtype=dtype,
      param_dtype=param_dtype,
    )
  raise ValueError(f'Unknown model.predictor.kind {p.kind!r}; choose one of {PREDICTORS}.')
