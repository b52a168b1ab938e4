"""The timm-ViT / Audio-MAE weight layout of the plain-stem (conv) encoder: export and import.

Existing PyTorch audio tools (Audio-MAE, EAT's timm-style encoders, timm's VisionTransformer with
`in_chans=1`) name a ViT's weights as below. `to_timm` writes the JAX encoder's weights under these
names; `from_timm` reads them back (or an Audio-MAE / EAT-style checkpoint) into JAX parameters.

  JAX (unrolled encoder params)            timm / Audio-MAE                shape (timm)
  stem.proj.kernel [pt, pf, 1, D]          patch_embed.proj.weight         [D, 1, pt, pf]
  stem.proj.bias                           patch_embed.proj.bias           [D]
  cls [1, 1, D]                            cls_token                       [1, 1, D]
  (sin-cos table) or posemb [T, F, D]      pos_embed                       [1, 1 + N, D]
  blocks_i.norm1.{scale, bias}             blocks.i.norm1.{weight, bias}   [D]
  blocks_i.attn.{query,key,value}.kernel   blocks.i.attn.qkv.weight        [3D, D] (q; k; v rows)
  blocks_i.attn.{query,key,value}.bias     blocks.i.attn.qkv.bias          [3D]
  blocks_i.attn.out.{kernel, bias}         blocks.i.attn.proj.{weight, bias}
  blocks_i.norm2.{scale, bias}             blocks.i.norm2.{weight, bias}
  blocks_i.mlp.fc1 / fc2.{kernel, bias}    blocks.i.mlp.fc1 / fc2.{weight, bias}
  norm.{scale, bias}                       norm.{weight, bias}

Dense kernels are [in, out] in flax and [out, in] in torch, hence the transposes. The PyTorch model
feeds the log-mel as an image [B, 1, T, F] (H = time, W = mel), so `patch_embed.proj` sees the
same 16x16 patch as the flax conv on [B, T, F, 1], and timm's `flatten(2)` gives the same
time-major token order. LayerNorm epsilon is 1e-6 and the GELU is exact (erf) on both sides.

Positions. The JAX encoder adds its position table (`model.posemb`) to the patch tokens and none
to the CLS token. `to_timm` writes the table of any kind (cropped to `target_length`) as
`pos_embed` with a zero CLS row, so a timm model that adds `pos_embed` to every token computes the
same function. `from_timm` imports `pos_embed` so that the encoder computes what the original
model computed: its CLS row is folded into `cls` (exact), and its patch rows are recognised as our
sin-cos table ('sincos'), Audio-MAE's (the same two halves swapped: MAE's meshgrid puts the
frequency coordinate first; 'sincos_mae'), or anything else, imported as a table parameter
('learned', `posemb` [T, F, D], with `model.max_time_patches` = T). What the config must say for
that is `TimmImport.model_overrides`; `write_encoder_checkpoint(..., model_overrides=...)` saves
it.

The timm layout is pre-LN (`model.block_norm='pre'`) with LayerNorm epsilon 1e-6: an EAT-style
post-LN encoder has no timm form (`aasp_jax/export/eat_layout.py` imports EAT checkpoints).
`timm_constructor_args` gives the `timm.models.vision_transformer.VisionTransformer` arguments
that load `to_timm`'s file strictly.

Fine-tuning from Audio-MAE ViT-B weights. Their encoder is `configs/pretrain_base.py` with the
plain stem (`:stem=conv`): width 768, depth 12, 12 heads, MLP 3072, 16x16 patches, and the
`eat_audiomae` front end (Kaldi fbank, 128 mel bins, 1024 frames, AudioSet normalisation). The
weights do not encode the head count: 12 is what ViT-B uses.

  python -m aasp_jax.export.timm_layout --weights=pretrained.pth --workdir=runs/audiomae_b16
  # or in Python:
  config = configuration.load_config('configs/pretrain_base.py:stem=conv')
  imported = timm_layout.load_timm('audiomae_pretrained.pth', config.model)
  timm_layout.write_encoder_checkpoint(
    'runs/audiomae_b16', config, imported.params, model_overrides=imported.model_overrides
  )
  # then: aasp-finetune --config=configs/finetune/esc50.py:test_fold=1 \
  #         --config.init_checkpoint=runs/audiomae_b16 --config.dataset.root=... ...
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from aasp_jax.export import safetensors_io
from aasp_jax.models import posemb

LAYOUT_METADATA = {'format': 'aasp-jax-encoder', 'format_version': '1', 'layout': 'timm'}
# Wrappers that training scripts put around a state dict, and the name prefixes that DataParallel
# ('module.'), Audio-MAE / EAT style wrappers ('model.', 'encoder.') add to every tensor name.
_NESTING_KEYS = ('model', 'state_dict')
_NAME_PREFIXES = ('module.', 'model.', 'encoder.')
_TORCH_HINT = 'reading .pt/.pth files needs PyTorch: pip install torch (CPU wheels are enough)'
# A position table within this of a sin-cos table is that table: EAT computes its table in float32
# (about 5e-5 off ours at 768 time patches); learned tables differ by orders of magnitude more.
SINCOS_ATOL = 1e-4

log = logging.getLogger(__name__)


class TimmLayoutError(ValueError):
  """A state dict that cannot be mapped to (or from) the timm layout; the message says why."""


@dataclasses.dataclass(frozen=True)
class TimmImport:
  """What `from_timm` produced.

  Attributes:
    params: the encoder's parameters (unrolled layout, float32 numpy), ready for `encoder.apply`
      of the encoder that `model_overrides` describe.
    ignored: names of tensors in the state dict that the encoder has no place for (decoder, head,
      mask token, fc_norm, ...), sorted.
    notes: what happened to `pos_embed` (which table it is, CLS row folded in).
    model_overrides: the `model` config fields the parameters need ('posemb', 'block_norm', and
      'max_time_patches' for a learned table); `apply_model_overrides` / `write_encoder_checkpoint`
      apply them.
  """

  params: dict
  ignored: list[str]
  notes: list[str]
  model_overrides: dict = dataclasses.field(default_factory=dict)


def _cfg(model_cfg: Mapping[str, Any], key: str):
  # model_cfg is a ConfigDict (training config) or a plain dict (an export's config.json).
  try:
    return model_cfg[key]
  except KeyError:
    raise TimmLayoutError(f'model config has no {key!r} field; is this a model section?') from None


def check_conv_stem(model_cfg: Mapping[str, Any]) -> None:
  """Raises TimmLayoutError unless the model uses the plain conv stem (the timm layout's only)."""
  stem = _cfg(model_cfg, 'stem')
  if stem != 'conv':
    raise TimmLayoutError(
      f"the timm / Audio-MAE layout holds only the plain conv patch stem, but this model's stem is "
      f'{stem!r}: a ViT in timm has no place for the AaPE branch (Lambda encoder, SBLU modes, '
      'fusion gate). Use the native export (model.safetensors + the aasp-jax PyTorch module), '
      'which reproduces AaPE.'
    )


def check_pre_norm(model_cfg: Mapping[str, Any]) -> None:
  """Raises TimmLayoutError unless the blocks are pre-LN with epsilon 1e-6 (timm's ViT)."""
  block_norm = model_cfg.get('block_norm', 'pre')
  if block_norm != 'pre':
    raise TimmLayoutError(
      f"this model's blocks are {block_norm!r}-LN (model.block_norm): timm's VisionTransformer is "
      'pre-LN, so the timm layout cannot hold it. Use the native export (model.safetensors + the '
      'aasp-jax PyTorch module).'
    )
  eps = float(model_cfg.get('norm_eps', 1e-6))
  if eps != 1e-6:
    raise TimmLayoutError(
      f"model.norm_eps={eps:g}, but timm's VisionTransformer uses LayerNorm(eps=1e-6); the timm "
      'layout would compute another function. Use the native export.'
    )


def grid_size(
  model_cfg: Mapping[str, Any], target_length: int, num_mel_bins: int
) -> tuple[int, int]:
  """(time patches, frequency patches) of a [target_length, num_mel_bins] log-mel."""
  patch_t, patch_f = _cfg(model_cfg, 'patch_t'), _cfg(model_cfg, 'patch_f')
  if target_length % patch_t or num_mel_bins % patch_f:
    raise TimmLayoutError(
      f'a [{target_length}, {num_mel_bins}] log-mel does not tile into [{patch_t}, {patch_f}] '
      'patches; target_length and num_mel_bins must be multiples of the patch size.'
    )
  return target_length // patch_t, num_mel_bins // patch_f


def timm_shapes(model_cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """The shape of every tensor `from_timm` needs (pos_embed is optional and not listed)."""
  width, mlp = _cfg(model_cfg, 'width'), _cfg(model_cfg, 'mlp_dim')
  patch_t, patch_f = _cfg(model_cfg, 'patch_t'), _cfg(model_cfg, 'patch_f')
  shapes = {
    'patch_embed.proj.weight': (width, 1, patch_t, patch_f),
    'patch_embed.proj.bias': (width,),
    'cls_token': (1, 1, width),
  }
  for i in range(_cfg(model_cfg, 'depth')):
    b = f'blocks.{i}'
    shapes.update(
      {
        f'{b}.norm1.weight': (width,),
        f'{b}.norm1.bias': (width,),
        f'{b}.attn.qkv.weight': (3 * width, width),
        f'{b}.attn.qkv.bias': (3 * width,),
        f'{b}.attn.proj.weight': (width, width),
        f'{b}.attn.proj.bias': (width,),
        f'{b}.norm2.weight': (width,),
        f'{b}.norm2.bias': (width,),
        f'{b}.mlp.fc1.weight': (mlp, width),
        f'{b}.mlp.fc1.bias': (mlp,),
        f'{b}.mlp.fc2.weight': (width, mlp),
        f'{b}.mlp.fc2.bias': (width,),
      }
    )
  shapes['norm.weight'] = (width,)
  shapes['norm.bias'] = (width,)
  return shapes


def fixed_pos_embed(
  model_cfg: Mapping[str, Any], target_length: int, num_mel_bins: int
) -> np.ndarray:
  """[1, 1 + N, D]: the encoder's sin-cos table for this input size, with a zero CLS row."""
  n_time, n_freq = grid_size(model_cfg, target_length, num_mel_bins)
  width = _cfg(model_cfg, 'width')
  kind = model_cfg.get('posemb', 'sincos')
  if kind not in posemb.FIXED_KINDS:
    raise TimmLayoutError(f'model.posemb={kind!r} is a parameter, not a fixed table.')
  table = posemb.grid_posemb(width, (n_time, n_freq), _cfg(model_cfg, 'max_time_patches'), kind)
  return np.concatenate([np.zeros((1, width), np.float32), table], axis=0)[None]


def _export_pos_embed(p, model_cfg, target_length: int, num_mel_bins: int) -> np.ndarray:
  """[1, 1 + N, D] of any posemb kind: a fixed table, or the learned one cropped to the input."""
  if model_cfg.get('posemb', 'sincos') != 'learned':
    return fixed_pos_embed(model_cfg, target_length, num_mel_bins)
  n_time, n_freq = grid_size(model_cfg, target_length, num_mel_bins)
  table = _f32(p['posemb'])
  if table.shape[0] < n_time or table.shape[1] != n_freq:
    raise TimmLayoutError(
      f'the learned position table is {list(table.shape)} (time, frequency patches, width), but a '
      f'[{target_length}, {num_mel_bins}] input needs [{n_time}, {n_freq}, ...]: choose a '
      'target_length the table covers.'
    )
  rows = table[:n_time].reshape(n_time * n_freq, table.shape[-1])
  return np.concatenate([np.zeros((1, rows.shape[-1]), np.float32), rows], axis=0)[None]


def classify_pos_table(table_tfd: np.ndarray, atol: float = SINCOS_ATOL) -> tuple[str, float]:
  """(kind, distance) of a [T, F, D] position table: 'sincos' or 'sincos_mae' when it is within
  `atol` (max abs) of that table, else 'learned'; distance is the max abs difference from the
  nearer sin-cos table (inf when the width admits none)."""
  n_time, n_freq, width = table_tfd.shape
  if width % 4:
    return 'learned', float('inf')
  diffs = {
    kind: float(np.max(np.abs(table_tfd - posemb.sincos_table(width, n_time, n_freq, kind))))
    for kind in posemb.FIXED_KINDS
  }
  kind = min(diffs, key=diffs.get)
  return (kind if diffs[kind] <= atol else 'learned'), diffs[kind]


def timm_constructor_args(
  model_cfg: Mapping[str, Any], target_length: int = 1024, num_mel_bins: int = 128
) -> dict[str, Any]:
  """Keyword arguments of `timm.models.vision_transformer.VisionTransformer` whose model loads
  `to_timm(params, model_cfg, target_length=..., num_mel_bins=...)` strictly and computes the same
  CLS and tokens (`forward_features`; JSON-able, tuples as lists once written).

  timm's default norm layer is LayerNorm(eps=1e-6), which `check_pre_norm` requires.
  """
  check_conv_stem(model_cfg)
  check_pre_norm(model_cfg)
  grid_size(model_cfg, target_length, num_mel_bins)
  width = _cfg(model_cfg, 'width')
  return {
    'img_size': [target_length, num_mel_bins],
    'patch_size': [_cfg(model_cfg, 'patch_t'), _cfg(model_cfg, 'patch_f')],
    'in_chans': 1,
    'num_classes': 0,
    'global_pool': 'token',
    'embed_dim': width,
    'depth': _cfg(model_cfg, 'depth'),
    'num_heads': _cfg(model_cfg, 'num_heads'),
    'mlp_ratio': _cfg(model_cfg, 'mlp_dim') / width,
    'qkv_bias': True,
    'class_token': True,
    'no_embed_class': False,  # pos_embed holds a (zero) CLS row and is added to every token
    'pre_norm': False,
    'fc_norm': False,  # the final `norm` is applied to every token, as in the JAX encoder
    'dynamic_img_size': False,
  }


def _f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _unrolled(params: Mapping[str, Any], depth: int) -> Mapping[str, Any]:
  if 'blocks' in params:  # a scanned-layout tree: per-layer names are what timm addresses
    # Imported here: it pulls in flax, which reading or writing the timm layout does not need.
    from aasp_jax.models import vit

    return vit.unstack_blocks(dict(params), depth)
  return params


def to_timm(
  params: Mapping[str, Any],
  model_cfg: Mapping[str, Any],
  *,
  target_length: int = 1024,
  num_mel_bins: int = 128,
) -> dict[str, np.ndarray]:
  """The conv-stem encoder's parameters under timm / Audio-MAE names (float32 numpy, torch layout).

  Args:
    params: the encoder's parameters (unrolled 'blocks_0', ... or scanned 'blocks').
    model_cfg: the model section of the config (ConfigDict or dict); its stem must be 'conv'.
    target_length, num_mel_bins: the input size (the front-end preset's) that sizes `pos_embed`.
  """
  check_conv_stem(model_cfg)
  check_pre_norm(model_cfg)
  depth = _cfg(model_cfg, 'depth')
  p = _unrolled(params, depth)
  kernel = _f32(p['stem']['proj']['kernel'])  # [pt, pf, 1, D] (flax HWIO)
  out = {
    'patch_embed.proj.weight': _f32(kernel.transpose(3, 2, 0, 1)),  # -> [D, 1, pt, pf] (OIHW)
    'patch_embed.proj.bias': _f32(p['stem']['proj']['bias']),
    'cls_token': _f32(p['cls']),
    'pos_embed': _export_pos_embed(p, model_cfg, target_length, num_mel_bins),
  }
  for i in range(depth):
    blk, b = p[f'blocks_{i}'], f'blocks.{i}'
    attn = blk['attn']
    qkv_w = np.concatenate([_f32(attn[n]['kernel']).T for n in ('query', 'key', 'value')], axis=0)
    qkv_b = np.concatenate([_f32(attn[n]['bias']) for n in ('query', 'key', 'value')], axis=0)
    out.update(
      {
        f'{b}.norm1.weight': _f32(blk['norm1']['scale']),
        f'{b}.norm1.bias': _f32(blk['norm1']['bias']),
        f'{b}.attn.qkv.weight': _f32(qkv_w),
        f'{b}.attn.qkv.bias': _f32(qkv_b),
        f'{b}.attn.proj.weight': _f32(_f32(attn['out']['kernel']).T),
        f'{b}.attn.proj.bias': _f32(attn['out']['bias']),
        f'{b}.norm2.weight': _f32(blk['norm2']['scale']),
        f'{b}.norm2.bias': _f32(blk['norm2']['bias']),
        f'{b}.mlp.fc1.weight': _f32(_f32(blk['mlp']['fc1']['kernel']).T),
        f'{b}.mlp.fc1.bias': _f32(blk['mlp']['fc1']['bias']),
        f'{b}.mlp.fc2.weight': _f32(_f32(blk['mlp']['fc2']['kernel']).T),
        f'{b}.mlp.fc2.bias': _f32(blk['mlp']['fc2']['bias']),
      }
    )
  out['norm.weight'] = _f32(p['norm']['scale'])
  out['norm.bias'] = _f32(p['norm']['bias'])
  _check_against(out, timm_shapes(model_cfg), 'to_timm output')
  return out


def _check_against(tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple], where: str):
  missing = [n for n in shapes if n not in tensors]
  if missing:
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    hint = ''
    if 'norm.weight' in missing and 'fc_norm.weight' in tensors:
      hint = (
        ' This looks like a fine-tuned Audio-MAE with global pooling (fc_norm replaces norm): '
        'start from the pre-trained checkpoint instead.'
      )
    raise TimmLayoutError(
      f'{where}: tensor {missing[0]!r} (expected shape {list(shapes[missing[0]])}) is missing'
      f'{more}; the model config asks for {len(shapes)} tensors.{hint}'
    )
  for name, shape in shapes.items():
    got = tuple(np.shape(tensors[name]))
    if got != tuple(shape):
      raise TimmLayoutError(
        f'{where}: tensor {name!r} has shape {list(got)} but the model config expects '
        f'{list(shape)}; check that width / depth / mlp_dim / patch size match the checkpoint.'
      )


def _import_pos_embed(pos: np.ndarray, model_cfg, num_mel_bins: int):
  """A pos_embed [1, (1 +) T * F, D] -> (CLS row or None, kind, [T, F, D] table, note)."""
  width = _cfg(model_cfg, 'width')
  n_freq = num_mel_bins // _cfg(model_cfg, 'patch_f')
  rows = pos.shape[1] if pos.ndim == 3 else -1
  if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != width or rows < n_freq:
    raise TimmLayoutError(
      f'pos_embed has shape {list(pos.shape)}, which is no [1, (1 +) T * {n_freq}, {width}] table '
      f'of a [T, {n_freq}] patch grid ({num_mel_bins} mel bins, patch_f '
      f'{_cfg(model_cfg, "patch_f")}); check num_mel_bins and the patch size.'
    )
  # timm's default holds a CLS row first; no_embed_class models hold patch rows only.
  if (rows - 1) % n_freq == 0:
    cls_row, patch = pos[:, :1], pos[0, 1:]
  elif rows % n_freq == 0:
    cls_row, patch = None, pos[0]
  else:
    raise TimmLayoutError(
      f'pos_embed has {rows} rows: neither {rows} nor {rows - 1} patches fill a [T, {n_freq}] grid.'
    )
  n_time = patch.shape[0] // n_freq
  table = patch.reshape(n_time, n_freq, width)
  kind, diff = classify_pos_table(table)
  grid = f'{n_time}x{n_freq} patches'
  if kind == 'sincos':
    note = f"pos_embed ({grid}) equals the encoder's fixed sin-cos table."
  elif kind == 'sincos_mae':
    note = (
      f"pos_embed ({grid}) is Audio-MAE's sin-cos table (frequency in the first half, max abs "
      f"diff {diff:.2g}): imported as model.posemb='sincos_mae'."
    )
  else:
    note = (
      f'pos_embed ({grid}) is no sin-cos table (max abs diff {diff:.3g}; e.g. a learned table): '
      f"imported as model.posemb='learned' with model.max_time_patches={n_time}."
    )
  return cls_row, kind, table, note


def from_timm(
  state_dict: Mapping[str, Any], model_cfg: Mapping[str, Any], *, num_mel_bins: int = 128
) -> TimmImport:
  """Imports timm / Audio-MAE-named weights into the conv-stem encoder's parameter tree.

  Args:
    state_dict: name -> array (numpy or anything np.asarray accepts), names already unwrapped
      (`load_state_dict_file` does that for files).
    model_cfg: the model section the parameters are for; its stem must be 'conv'.
    num_mel_bins: the input's mel bins, to read `pos_embed` as a [T, F] patch grid.

  Returns:
    TimmImport(params, ignored, notes, model_overrides). Extra tensors (decoder, head, ...) are
    ignored, listed and logged; a missing or mis-shaped one raises TimmLayoutError naming it and
    its expected shape. `pos_embed` is imported exactly (see the module docstring); the config
    fields that needs are `model_overrides`.
  """
  check_conv_stem(model_cfg)
  shapes = timm_shapes(model_cfg)
  sd = {k: v for k, v in state_dict.items()}
  _check_against(sd, shapes, 'state dict')
  t = {k: _f32(sd[k]) for k in shapes}
  notes = []
  overrides: dict[str, Any] = {'block_norm': 'pre'}
  cls = t['cls_token']
  table = None
  if 'pos_embed' in sd:
    cls_row, kind, table, note = _import_pos_embed(_f32(sd['pos_embed']), model_cfg, num_mel_bins)
    if cls_row is not None:
      # timm adds pos_embed[:, :1] to the CLS token; the JAX encoder adds nothing to it, so the
      # sum is the equivalent CLS parameter (exact; zero for Audio-MAE and our own export).
      if np.any(cls_row):
        notes.append('the CLS row of pos_embed is non-zero: folded into cls (cls_token + row).')
      cls = _f32(cls + cls_row)
    notes.append(note)
    overrides['posemb'] = kind
    if kind == 'learned':
      overrides['max_time_patches'] = int(table.shape[0])
  else:
    notes.append(
      f'no pos_embed: the encoder adds its fixed table (model.posemb='
      f'{model_cfg.get("posemb", "sincos")!r}), which the original model did not.'
    )
  params: dict[str, Any] = {
    'cls': cls,
    'stem': {
      'proj': {
        'kernel': _f32(t['patch_embed.proj.weight'].transpose(2, 3, 1, 0)),  # OIHW -> HWIO
        'bias': t['patch_embed.proj.bias'],
      }
    },
    'norm': {'scale': t['norm.weight'], 'bias': t['norm.bias']},
  }
  if table is not None and overrides['posemb'] == 'learned':
    params['posemb'] = _f32(table)
  params.update(block_params(t, _cfg(model_cfg, 'depth')))
  ignored = sorted(set(sd) - set(shapes) - {'pos_embed'})
  if ignored:
    shown = ', '.join(ignored[:8]) + (f', ... ({len(ignored)} in all)' if len(ignored) > 8 else '')
    log.info(
      'timm import: ignored %d tensor(s) the encoder has no place for: %s', len(ignored), shown
    )
  for note in notes:
    log.info('timm import: %s', note)
  return TimmImport(params=params, ignored=ignored, notes=notes, model_overrides=overrides)


def block_params(t: Mapping[str, np.ndarray], depth: int) -> dict:
  """timm-named blocks ('blocks.i.norm1.weight', 'blocks.i.attn.qkv.weight', ...; EAT's AltBlocks
  use the same names) -> the encoder's unrolled {'blocks_i': ...} parameters (float32)."""
  out = {}
  for i in range(depth):
    b = f'blocks.{i}'
    q_w, k_w, v_w = np.split(_f32(t[f'{b}.attn.qkv.weight']), 3, axis=0)
    q_b, k_b, v_b = np.split(_f32(t[f'{b}.attn.qkv.bias']), 3, axis=0)

    def dense(name):
      return {'kernel': _f32(_f32(t[f'{b}.{name}.weight']).T), 'bias': _f32(t[f'{b}.{name}.bias'])}

    def norm(name):
      return {'scale': _f32(t[f'{b}.{name}.weight']), 'bias': _f32(t[f'{b}.{name}.bias'])}

    out[f'blocks_{i}'] = {
      'norm1': norm('norm1'),
      'attn': {
        'query': {'kernel': _f32(q_w.T), 'bias': _f32(q_b)},
        'key': {'kernel': _f32(k_w.T), 'bias': _f32(k_b)},
        'value': {'kernel': _f32(v_w.T), 'bias': _f32(v_b)},
        'out': dense('attn.proj'),
      },
      'norm2': norm('norm2'),
      'mlp': {'fc1': dense('mlp.fc1'), 'fc2': dense('mlp.fc2')},
    }
  return out


# ----------------------------------------------------------------------------------------------
# Files


def _unwrap(obj: Any, path: str) -> dict:
  """Descends through {'model': ...} / {'state_dict': ...} wrappers to the name -> tensor dict."""
  while isinstance(obj, Mapping):
    nested = [k for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)]
    if not nested:
      break
    obj = obj[nested[0]]
  if not isinstance(obj, Mapping) or not obj:
    raise TimmLayoutError(f'{path}: holds no state dict (a name -> tensor mapping).')
  return dict(obj)


def strip_prefixes(state_dict: Mapping[str, Any], path: str = 'state dict') -> dict:
  """Removes leading 'module.' / 'model.' / 'encoder.' (in any order, repeated) from every name."""
  out = {}
  for name, value in state_dict.items():
    short = name
    while short.startswith(_NAME_PREFIXES):
      short = short.split('.', 1)[1]
    if short in out:
      raise TimmLayoutError(
        f'{path}: two tensors map to {short!r} once the wrapper prefixes {_NAME_PREFIXES} are '
        'removed; the file holds more than one model. Extract the encoder state dict first.'
      )
    out[short] = value
  return out


def _opaque_class(full_name: str) -> type:
  """An inert stand-in for the class or function `full_name` of a pickled checkpoint: calling it
  (pickle's REDUCE / NEWOBJ) records the arguments, BUILD records the state; nothing runs."""
  module, _, name = full_name.rpartition('.')

  class Opaque:
    def __new__(cls, *args, **kwargs):
      del kwargs
      obj = object.__new__(cls)
      obj.args = args
      return obj

    def __init__(self, *args, **kwargs):
      del args, kwargs

    def __setstate__(self, state):
      self.state = state

    def __repr__(self):
      return f'<opaque {full_name}>'

  Opaque.__module__, Opaque.__name__, Opaque.__qualname__ = module, name, name
  return Opaque


def _load_torch(path: str, opaque_objects: bool = False) -> Any:
  try:
    import torch  # optional: only .pt / .pth files need it
  except ImportError:
    raise ImportError(f'{path}: {_TORCH_HINT}') from None
  try:
    if opaque_objects:
      # Training checkpoints (fairseq's EAT) pickle their config, enums and argparse objects next
      # to the weights. torch's weights-only unpickler still reads the file; each of those
      # classes is replaced by an inert stand-in class, so no code named in the file is imported.
      names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
      stubs = [(_opaque_class(n), n) for n in names]
      with torch.serialization.safe_globals(stubs):
        return torch.load(path, map_location='cpu', weights_only=True)
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises UnpicklingError / RuntimeError subclasses here
    if 'weights_only' in str(e) or 'Unsupported global' in str(e):
      raise TimmLayoutError(
        f'{path}: holds Python objects besides tensors (e.g. training args), which '
        'torch.load(weights_only=True) refuses to unpickle for safety. Pass '
        'opaque_objects=True (the command line does) to read its tensors with those objects '
        'replaced by inert stand-in classes.'
      ) from e
    raise TimmLayoutError(f'{path}: not a readable PyTorch checkpoint ({e}).') from e


def _to_numpy(name: str, value: Any, path: str) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor (bf16 / fp16 included)
    return value.detach().to('cpu').float().numpy()
  if isinstance(value, np.ndarray):
    return value
  raise TimmLayoutError(f'{path}: entry {name!r} is a {type(value).__name__}, not a tensor.')


def load_state_dict_file(path: str, opaque_objects: bool = False) -> dict[str, np.ndarray]:
  """name -> float32-or-native numpy array from a .safetensors, .pt or .pth file.

  'model' / 'state_dict' wrappers are unwrapped and 'module.' / 'model.' / 'encoder.' prefixes
  stripped; other non-tensor entries of a wrapper (epoch, optimizer) are not part of the result.
  `opaque_objects`: read the tensors of a .pt file that also pickles Python objects (a training
  config, enums), which are replaced by inert stand-in classes (see `_load_torch`); otherwise such a
  file is refused with a hint.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file.')
  if path.endswith('.safetensors'):
    tensors, _ = safetensors_io.load(path)
    return strip_prefixes(tensors, path)
  if path.endswith(('.pt', '.pth', '.bin', '.ckpt')):
    sd = _unwrap(_load_torch(path, opaque_objects), path)
    tensors = {}
    for name, value in sd.items():
      if hasattr(value, 'detach') or isinstance(value, np.ndarray):
        tensors[name] = _to_numpy(name, value, path)
    if not tensors:
      raise TimmLayoutError(f'{path}: its state dict holds no tensors.')
    return strip_prefixes(tensors, path)
  raise TimmLayoutError(f'{path}: unknown weight file type; give a .safetensors, .pt or .pth file.')


def load_timm(
  path: str,
  model_cfg: Mapping[str, Any],
  *,
  num_mel_bins: int = 128,
  opaque_objects: bool = False,
) -> TimmImport:
  """`from_timm(load_state_dict_file(path, opaque_objects), model_cfg)`, with the file named in
  errors."""
  sd = load_state_dict_file(path, opaque_objects)
  try:
    return from_timm(sd, model_cfg, num_mel_bins=num_mel_bins)
  except TimmLayoutError as e:
    raise TimmLayoutError(f'{path}: {e}') from None


def save_timm(
  path: str,
  params: Mapping[str, Any],
  model_cfg: Mapping[str, Any],
  *,
  target_length: int = 1024,
  num_mel_bins: int = 128,
) -> dict[str, np.ndarray]:
  """Writes `to_timm(...)` as a safetensors file (metadata layout 'timm'); returns the tensors."""
  tensors = to_timm(params, model_cfg, target_length=target_length, num_mel_bins=num_mel_bins)
  safetensors_io.save(path, tensors, dict(LAYOUT_METADATA))
  return tensors


def apply_model_overrides(config, model_overrides: Mapping[str, Any] | None):
  """A copy of the complete `config` with `model_overrides` set in its `model` section (fields a
  config of an older version lacks are added), locked and validated."""
  from aasp_jax import configuration  # flax/jax are needed only from here on

  config = copy.deepcopy(config)
  with config.unlocked():
    for key, value in (model_overrides or {}).items():
      config.model[key] = value
  config.lock()
  return configuration.validate(config)


# ----------------------------------------------------------------------------------------------
# Fine-tuning from imported weights


def write_encoder_checkpoint(
  workdir: str,
  config,
  params: Mapping[str, Any],
  step: int = 0,
  *,
  model_overrides: Mapping[str, Any] | None = None,
  origin: str | None = None,
) -> str:
  """Saves encoder parameters as a training checkpoint of `workdir`; returns its step folder.

  The checkpoint holds `params` as both the EMA teacher and the student encoder, their checksums,
  and the full `config`, in the layout `pretrained.load_pretrained` reads (and verifies), so
  imported weights (e.g. from `load_timm` or `eat_layout.load_eat`) can be fine-tuned
  (`aasp-finetune --config.init_checkpoint=WORKDIR`), embedded (`aasp-embed`) or probed
  (`aasp-linear-eval`) like an AaSP run. There is no optimizer state: it cannot resume
  pre-training.

  Args:
    workdir: a new run folder (one that already has checkpoints is refused).
    config: the complete config (`model` and `frontend` sections), e.g.
      `configuration.load_config('configs/pretrain_base.py:stem=conv')`.
    params: the encoder's parameters in the unrolled layout ('blocks_0', ...); they are stacked
      here when `config.model.scan_layers` is set.
    model_overrides: `model` fields the parameters need (`TimmImport.model_overrides`, the first
      value of `eat_layout.load_eat`), set in the saved config.
    origin: what the weights are (e.g. "EAT weights `EAT-base_epoch30_pretrain.pt`"), saved as
      the checkpoint's `origin` item: an export's model card says it instead of "pre-trained
      with AaSP".
  """
  # Imported here: orbax and flax are needed only for this function.
  import jax
  import orbax.checkpoint as ocp

  from aasp_jax import checkpointing, configuration
  from aasp_jax.export import exporter
  from aasp_jax.models import vit

  directory = os.path.join(os.path.abspath(os.fspath(workdir)), 'checkpoints')
  if os.path.isdir(directory) and os.listdir(directory):
    raise FileExistsError(f'{directory} already holds checkpoints; choose a new workdir.')
  config = apply_model_overrides(config, model_overrides)
  flat = exporter.flatten_params(params)
  want = exporter.expected_shapes(config.model, configuration.frontend_preset(config))
  _check_against(flat, want, 'encoder params')
  extra = sorted(set(flat) - set(want))
  if extra:
    raise TimmLayoutError(f'encoder params: {extra[:5]} are not parameters of the config encoder.')
  tree = exporter.unflatten_params(flat)  # float32 numpy
  if config.model.scan_layers:
    tree = jax.tree.map(np.asarray, vit.stack_blocks(tree, config.model.depth))
  state = {'train': {'teacher': tree, 'params': {'encoder': tree}}}
  # The trainer's checksum item: load_pretrained verifies every array it restores against it.
  sums = {'format': checkpointing.CHECKSUM_FORMAT, 'arrays': checkpointing.array_checksums(state)}
  manager = ocp.CheckpointManager(
    directory,
    item_handlers={
      checkpointing.STATE: ocp.StandardCheckpointHandler(),
      checkpointing.CHECKSUMS: ocp.JsonCheckpointHandler(),
      checkpointing.CONFIG: ocp.JsonCheckpointHandler(),
      checkpointing.ORIGIN: ocp.JsonCheckpointHandler(),
    },
  )
  items = {
    checkpointing.STATE: ocp.args.StandardSave(state),
    checkpointing.CHECKSUMS: ocp.args.JsonSave(sums),
    checkpointing.CONFIG: ocp.args.JsonSave(json.loads(config.to_json())),
  }
  if origin:
    items[checkpointing.ORIGIN] = ocp.args.JsonSave({'imported_from': str(origin)})
  try:
    manager.save(step, args=ocp.args.Composite(**items))
    manager.wait_until_finished()
  finally:
    manager.close()
  return os.path.join(directory, str(step))


# ----------------------------------------------------------------------------------------------
# Command line: python -m aasp_jax.export.timm_layout --weights=... --workdir=...


def import_main(argv, description: str, load, kind: str) -> int:
  """Shared command line of the importers: weights file -> an encoder checkpoint in a workdir.

  `load(path, config) -> (model_overrides, params, notes)` reads the file for `config`; `kind`
  names the weights' family in the checkpoint's origin ('EAT', 'timm / Audio-MAE').
  """
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--weights', required=True, help='.pt / .pth / .safetensors weights file')
  parser.add_argument('--workdir', required=True, help='new folder for the encoder checkpoint')
  parser.add_argument(
    '--config',
    default='configs/pretrain_base.py:stem=conv',
    help='config (+ :variant arguments) that describes the encoder and its front end',
  )
  parser.add_argument(
    '--set', action='append', default=[], metavar='KEY=VALUE', help='config override, repeatable'
  )
  args = parser.parse_args(argv)
  from aasp_jax import configuration

  logging.basicConfig(level=logging.WARNING)  # the notes are printed below; orbax is chatty
  try:
    config = configuration.load_config(args.config, args.set)
    overrides, params, notes = load(args.weights, config)
    origin = f'{kind} weights `{os.path.basename(args.weights)}`'
    step_dir = write_encoder_checkpoint(
      args.workdir, config, params, model_overrides=overrides, origin=origin
    )
  except (OSError, ValueError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  for note in notes:
    print(f'  {note}')
  shown = ', '.join(f'{k}={v!r}' for k, v in sorted(overrides.items()))
  print(f'wrote {step_dir} (model: {shown})')
  print(f'fine-tune it with --config.init_checkpoint={args.workdir}')
  return 0


def _load_for_cli(path: str, config):
  imported = load_timm(path, config.model, num_mel_bins=_mel_bins(config), opaque_objects=True)
  notes = list(imported.notes)
  if imported.ignored:
    notes.append(f'ignored {len(imported.ignored)} tensor(s): {", ".join(imported.ignored[:8])}')
  return imported.model_overrides, imported.params, notes


def _mel_bins(config) -> int:
  from aasp_jax import configuration

  return configuration.frontend_preset(config).num_mel_bins


def main(argv=None) -> int:
  return import_main(
    argv,
    'Import timm / Audio-MAE ViT weights as an aasp-jax encoder checkpoint.',
    _load_for_cli,
    'timm / Audio-MAE',
  )


if __name__ == '__main__':
  sys.exit(main())
