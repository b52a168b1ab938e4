"""EAT checkpoints (the fairseq release and the Hugging Face one) imported into the aasp-jax
encoder, computing what EAT computes.

EAT (github.com/cwx-worst-one/EAT) is data2vec 2.0's image modality on log-mels. Its encoder, as
its fine-tuning and feature extraction run it (student weights, no masking):

  x = local_encoder(log-mel [B, 1, T, 128])      Conv2d 16x16, flattened time-major (as timm)
  x = x + positions[:, :N]                       fixed 2-D sin-cos, MAE's order (frequency first),
                                                 768 time patches, patch tokens only
  x = cat(extra_tokens, x)                       one extra token (the CLS), no position
  x = LayerNorm(x)                               context_encoder.norm (fairseq) / pre_norm (HF)
  for each AltBlock (layer_norm_first=False):    x = norm1(x + attn(x)); x = norm2(x + mlp(x))
  (no final norm: Data2VecMultiModel.norm is None when layer_norm_first is False)

which is `vit.Encoder` with posemb='sincos_mae', block_norm='post', norm_eps=1e-6 (EAT's
`norm_eps`) and max_time_patches=768 (its `max_length`). Attention has q/k/v biases
(`qkv_bias=True`), scale head_dim ** -0.5 and an exact GELU, as ours.

  ours          fairseq (checkpoint['model'])                         Hugging Face (weights)
  stem.proj     modality_encoders.IMAGE.local_encoder.proj.*          model.local_encoder.proj.*
  cls           modality_encoders.IMAGE.extra_tokens [1, 1, D]        model.extra_tokens
  (posemb)      modality_encoders.IMAGE.fixed_positional_encoder      model.fixed_positional_
                  .positions [1, 768 * 8, D]                            encoder.positions
  input_norm    modality_encoders.IMAGE.context_encoder.norm.*        model.pre_norm.*
  blocks_i      blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*  (both)

Ignored, and counted in `EatImport.ignored` / the log: the CNN decoder (`modality_encoders.IMAGE
.decoder.*`), the EMA teacher (`_ema`, a nested dict of fairseq checkpoints; `which='teacher'`
imports it instead), other pre-training heads, and the fine-tuned release's `fc_norm` / `head`. The
position table is read from the file and recognised (`timm_layout.classify_pos_table`); a table that
is not EAT's sin-cos is imported as a learned one (`posemb='learned'`), so the outputs still match.
The head count is not in the weights: it is read from the fairseq config saved in the checkpoint or
the Hugging Face `config.json` next to the weights, else width / 64 (EAT-base 12, EAT-large 16).

fairseq checkpoints pickle their config (with enums of EAT's code) next to the weights: the file is
read with torch's weights-only unpickler and those objects replaced by inert stand-in classes
(`timm_layout._load_torch`), so neither fairseq nor EAT's code is needed, and none runs.

  python -m aasp_jax.export.eat_layout --weights=EAT-base_epoch30_pretrain.pt --workdir=runs/eat_b
  # or: overrides, params = eat_layout.load_eat('EAT-base_epoch30_pretrain.pt')
  #     timm_layout.write_encoder_checkpoint(
  #       'runs/eat_b', config, params, model_overrides=overrides)
  # then: aasp-finetune --config=configs/finetune/esc50.py:test_fold=1 \
  #         --config.init_checkpoint=runs/eat_b --config.dataset.root=... ...
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from aasp_jax.export import safetensors_io, timm_layout

log = logging.getLogger(__name__)

FAIRSEQ, HF = 'fairseq', 'hf'
# Where each part of the encoder lives, per release (names after `strip_prefixes`, which removes
# the Hugging Face wrapper's 'model.').
_PARTS = {
  FAIRSEQ: {
    'patch': 'modality_encoders.IMAGE.local_encoder.proj',
    'cls': 'modality_encoders.IMAGE.extra_tokens',
    'positions': 'modality_encoders.IMAGE.fixed_positional_encoder.positions',
    'norm': 'modality_encoders.IMAGE.context_encoder.norm',
  },
  HF: {
    'patch': 'local_encoder.proj',
    'cls': 'extra_tokens',
    'positions': 'fixed_positional_encoder.positions',
    'norm': 'pre_norm',
  },
}
_BLOCK_PARTS = (
  'norm1.weight',
  'norm1.bias',
  'attn.qkv.weight',
  'attn.qkv.bias',
  'attn.proj.weight',
  'attn.proj.bias',
  'norm2.weight',
  'norm2.bias',
  'mlp.fc1.weight',
  'mlp.fc1.bias',
  'mlp.fc2.weight',
  'mlp.fc2.bias',
)
WHICH = ('student', 'teacher')
DEFAULT_NORM_EPS = 1e-6  # EAT's config/pretraining_AS2M.yaml (model.norm_eps) and HF EATConfig


class EatLayoutError(timm_layout.TimmLayoutError):
  """A checkpoint that is not (or not this kind of) EAT encoder; the message says why."""


@dataclasses.dataclass(frozen=True)
class EatImport:
  """What `from_eat` produced.

  Attributes:
    params: the encoder's parameters (unrolled layout, float32 numpy).
    model_overrides: every `model` config field the parameters need (sizes, stem='conv',
      posemb, block_norm='post', norm_eps, max_time_patches).
    ignored: names of the tensors that are not part of the encoder (decoder, heads, ...), sorted.
    notes: what was found (release, positions, head count, the teacher's tensors).
    release: 'fairseq' or 'hf'.
  """

  params: dict
  model_overrides: dict
  ignored: list[str]
  notes: list[str]
  release: str


def _f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def release_of(state_dict: Mapping[str, Any]) -> str:
  """'fairseq' or 'hf' from the names; EatLayoutError if the state dict is no EAT encoder."""
  for release, parts in _PARTS.items():
    if f'{parts["patch"]}.weight' in state_dict:
      return release
  raise EatLayoutError(
    'no EAT patch embedding in this state dict (looked for '
    f'{", ".join(repr(p["patch"] + ".weight") for p in _PARTS.values())}); is it an EAT '
    'checkpoint? timm / Audio-MAE weights are read by timm_layout.load_timm.'
  )


def _check_supported(sd: Mapping[str, Any], release: str) -> None:
  """Refuses data2vec 2.0 variants EAT does not use, which this encoder cannot compute."""
  if release == FAIRSEQ:
    prefix = 'modality_encoders.IMAGE.context_encoder.blocks.'
    prenet = sorted(k for k in sd if k.startswith(prefix))
    if prenet:
      raise EatLayoutError(
        f'{prenet[0]}: the checkpoint has modality-specific blocks (prenet_depth > 0); EAT uses '
        'prenet_depth=0 and this encoder has no place for them.'
      )
    if 'norm.weight' in sd or f'{_PARTS[release]["norm"]}.weight' not in sd:
      raise EatLayoutError(
        'the checkpoint is pre-LN (layer_norm_first=True: a final norm.weight and no '
        'context_encoder.norm); EAT is post-LN and only that variant is supported.'
      )
  alibi = sorted(k for k in sd if 'alibi' in k)
  if alibi:
    raise EatLayoutError(f'{alibi[0]}: ALiBi attention biases are not supported (EAT has none).')


def _tensor(sd: Mapping[str, Any], name: str, shape: tuple | None = None) -> np.ndarray:
  if name not in sd:
    raise EatLayoutError(f'tensor {name!r} is missing; the checkpoint is incomplete.')
  value = _f32(sd[name])
  if shape is not None and value.shape != tuple(shape):
    raise EatLayoutError(f'tensor {name!r} has shape {list(value.shape)}, expected {list(shape)}.')
  return value


def from_eat(
  state_dict: Mapping[str, Any],
  *,
  num_heads: int | None = None,
  norm_eps: float | None = None,
  num_mel_bins: int = 128,
) -> EatImport:
  """Imports an EAT encoder (fairseq or Hugging Face names, prefixes already stripped).

  Args:
    state_dict: name -> array; the student's (or teacher's) tensors.
    num_heads: the attention heads (not in the weights); default width // 64.
    norm_eps: EAT's `norm_eps`; default 1e-6 (every released EAT).
    num_mel_bins: the log-mel's bins (EAT: 128), to read the position table as [T, F].

  Returns:
    EatImport(params, model_overrides, ignored, notes, release).
  """
  sd = dict(state_dict)
  release = release_of(sd)
  _check_supported(sd, release)
  parts = _PARTS[release]
  notes = [f'EAT checkpoint ({release} names).']
  proj_w = _tensor(sd, f'{parts["patch"]}.weight')
  if proj_w.ndim != 4 or proj_w.shape[1] != 1:
    raise EatLayoutError(
      f'{parts["patch"]}.weight has shape {list(proj_w.shape)}; EAT embeds a one-channel '
      'log-mel with a [D, 1, pt, pf] convolution.'
    )
  width, _, patch_t, patch_f = proj_w.shape
  depth = 0
  while f'blocks.{depth}.norm1.weight' in sd:
    depth += 1
  if depth == 0:
    raise EatLayoutError('no transformer blocks (blocks.0.norm1.weight) in the checkpoint.')
  mlp_dim = _tensor(sd, 'blocks.0.mlp.fc1.weight').shape[0]
  if num_heads is None:
    num_heads = max(width // 64, 1)
    notes.append(f'num_heads is not in the weights: {num_heads} (width / 64, as EAT-B / EAT-L).')
  eps = DEFAULT_NORM_EPS if norm_eps is None else float(norm_eps)
  cls = _tensor(sd, parts['cls'])
  if cls.shape != (1, 1, width):
    raise EatLayoutError(
      f'{parts["cls"]} has shape {list(cls.shape)}: one extra token [1, 1, {width}] expected '
      '(num_extra_tokens=1, as EAT).'
    )
  n_freq = num_mel_bins // patch_f
  positions = _tensor(sd, parts['positions'])
  if positions.ndim != 3 or positions.shape[2] != width or positions.shape[1] % n_freq:
    raise EatLayoutError(
      f'{parts["positions"]} has shape {list(positions.shape)}: not a [1, T * {n_freq}, {width}] '
      f'table ({num_mel_bins} mel bins, {patch_f}-bin patches).'
    )
  table = positions[0].reshape(-1, n_freq, width)
  kind, diff = timm_layout.classify_pos_table(table)
  grid = f'{table.shape[0]}x{n_freq} patches'
  if kind == 'learned':
    notes.append(
      f'positions ({grid}) are no sin-cos table (max abs diff {diff:.3g}): imported as a table, '
      "model.posemb='learned'."
    )
  else:
    name = "EAT's" if kind == 'sincos_mae' else "AaSP's (time first)"
    notes.append(
      f'positions ({grid}) are {name} fixed sin-cos table (max abs diff {diff:.2g}): '
      f'model.posemb={kind!r}.'
    )
  blocks = {}
  for i in range(depth):
    for part in _BLOCK_PARTS:
      blocks[f'blocks.{i}.{part}'] = _tensor(sd, f'blocks.{i}.{part}')
  params: dict[str, Any] = {
    'cls': cls,
    'stem': {
      'proj': {
        'kernel': _f32(proj_w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
        'bias': _tensor(sd, f'{parts["patch"]}.bias', (width,)),
      }
    },
    'input_norm': {
      'scale': _tensor(sd, f'{parts["norm"]}.weight', (width,)),
      'bias': _tensor(sd, f'{parts["norm"]}.bias', (width,)),
    },
  }
  if kind == 'learned':
    params['posemb'] = _f32(table)
  params.update(timm_layout.block_params(blocks, depth))
  used = set(blocks) | {
    f'{parts["patch"]}.weight',
    f'{parts["patch"]}.bias',
    parts['cls'],
    parts['positions'],
    f'{parts["norm"]}.weight',
    f'{parts["norm"]}.bias',
  }
  ignored = sorted(set(sd) - used)
  overrides = {
    'stem': 'conv',
    'width': int(width),
    'depth': depth,
    'num_heads': int(num_heads),
    'mlp_dim': int(mlp_dim),
    'patch_t': int(patch_t),
    'patch_f': int(patch_f),
    'posemb': kind,
    'block_norm': 'post',
    'norm_eps': eps,
    'max_time_patches': int(table.shape[0]),
  }
  if ignored:
    groups = collections.Counter('.'.join(name.split('.')[:3]) for name in ignored)
    notes.append(
      f'ignored {len(ignored)} tensor(s) that are not the encoder: '
      + ', '.join(f'{k} ({v})' for k, v in sorted(groups.items()))
    )
  for note in notes:
    log.info('EAT import: %s', note)
  return EatImport(params, overrides, ignored, notes, release)


# ----------------------------------------------------------------------------------------------
# Files


def _is_tensor(value) -> bool:
  return hasattr(value, 'detach') or isinstance(value, np.ndarray)


def _plain(value, path: str) -> dict:
  return {k: timm_layout._to_numpy(k, v, path) for k, v in value.items() if _is_tensor(v)}


def _setting(cfg: Any, *keys: str):
  """cfg['model'][...] of a fairseq checkpoint when it was saved as plain dicts, else None."""
  node = cfg
  for key in keys:
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  return node


def read_eat(
  path: str,
  *,
  which: str = 'student',
  num_heads: int | None = None,
  num_mel_bins: int = 128,
) -> EatImport:
  """Reads an EAT checkpoint file: a fairseq `.pt` (EAT's GitHub release) or the Hugging Face
  release's `model.safetensors` / `pytorch_model.bin` (its `config.json` is read when it lies next
  to the weights).

  Args:
    path: the weights file.
    which: 'student' (what EAT fine-tunes and extracts features with) or 'teacher' (the EMA
      encoder `_ema` of a fairseq pre-training checkpoint; parts it lacks are the student's).
    num_heads: overrides the head count found in the saved config (else width / 64).
    num_mel_bins: the log-mel's bins (EAT: 128).
  """
  if which not in WHICH:
    raise ValueError(f'which={which!r}: choose one of {WHICH}.')
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file.')
  settings: dict[str, Any] = {}
  notes = []
  hf_config = os.path.join(os.path.dirname(os.path.abspath(path)), 'config.json')
  if os.path.isfile(hf_config):
    with open(hf_config, encoding='utf-8') as f:
      saved = json.load(f)
    if isinstance(saved, dict) and saved.get('model_type') == 'eat':
      settings = {'num_heads': saved.get('num_heads'), 'norm_eps': saved.get('norm_eps')}
      notes.append(f'read num_heads / norm_eps from {hf_config}.')
  if path.endswith('.safetensors'):
    tensors, _ = safetensors_io.load(path)
    teacher = None
  elif path.endswith(('.pt', '.pth', '.bin', '.ckpt')):
    obj = timm_layout._load_torch(path, opaque_objects=True)
    if isinstance(obj, Mapping) and isinstance(obj.get('cfg'), Mapping):
      settings = {
        'num_heads': _setting(obj['cfg'], 'model', 'num_heads'),
        'norm_eps': _setting(obj['cfg'], 'model', 'norm_eps'),
      }
    sd = timm_layout._unwrap(obj, path)
    teacher = sd.get('_ema')
    tensors = _plain(sd, path)
  else:
    raise EatLayoutError(f'{path}: give a .pt / .pth / .bin or .safetensors file.')
  tensors = timm_layout.strip_prefixes(tensors, path)
  if which == 'teacher':
    if not isinstance(teacher, Mapping):
      raise EatLayoutError(
        f'{path}: holds no EMA teacher (_ema); Hugging Face releases and fine-tuned checkpoints '
        "hold one encoder: use which='student'."
      )
    # ema_encoder_only=True keeps only the blocks ('0.norm1.weight', ...); the rest is shared.
    ema = _plain(teacher, path)
    tensors.update({f'blocks.{k}' if k[:1].isdigit() else k: v for k, v in ema.items()})
    notes.append(f'the EMA teacher: {len(ema)} tensors from _ema.')
  elif isinstance(teacher, Mapping):
    notes.append(f'the EMA teacher (_ema, {len(teacher)} tensors) is not imported: the student is.')
  heads = num_heads if num_heads is not None else settings.get('num_heads')
  try:
    imported = from_eat(
      tensors,
      num_heads=heads,
      norm_eps=settings.get('norm_eps'),
      num_mel_bins=num_mel_bins,
    )
  except timm_layout.TimmLayoutError as e:
    raise EatLayoutError(f'{path}: {e}') from None
  for note in notes:
    log.info('EAT import: %s', note)
  return dataclasses.replace(imported, notes=notes + imported.notes)


def load_eat(path: str, **kwargs) -> tuple[dict, dict]:
  """(model config overrides, encoder parameters) of an EAT checkpoint file (see `read_eat`).

  Write them as a checkpoint that `aasp-finetune --config.init_checkpoint=...` reads:
  `timm_layout.write_encoder_checkpoint(workdir, config, params, model_overrides=overrides)`.
  """
  imported = read_eat(path, **kwargs)
  return imported.model_overrides, imported.params


def _load_for_cli(path: str, config):
  from aasp_jax import configuration

  mel = configuration.frontend_preset(config).num_mel_bins
  imported = read_eat(path, num_mel_bins=mel)
  return imported.model_overrides, imported.params, imported.notes


def main(argv=None) -> int:
  return timm_layout.import_main(
    argv,
    'Import an EAT checkpoint (fairseq or Hugging Face) as an aasp-jax encoder checkpoint.',
    _load_for_cli,
    'EAT',
  )


if __name__ == '__main__':
  sys.exit(main())
