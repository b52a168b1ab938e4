"""Checkpoint -> export folder, the folder's validating loader, and the JAX re-import.

  from aasp_jax.export import exporter
  result = exporter.export_checkpoint('runs/quickstart', 'exports/quickstart')  # EMA teacher
  config, preset, tensors = exporter.load_export('exports/quickstart')
  encoder, params, preset = exporter.encoder_from_export('exports/quickstart')  # back in JAX

An export folder (see `FILES`) holds the encoder's float32 weights in the *native* layout: one
tensor per flax parameter of the unrolled encoder ('blocks_0', 'blocks_1', ...), named by its flax
path joined with '.' ('stem.conv_stem.proj.kernel', 'blocks_0.attn.query.kernel', 'cls',
'norm.scale'), arrays exactly as in JAX (a Dense kernel is [in, out], a conv kernel HWIO). No
pickle is written or read anywhere. `config.json` carries the checkpoint's `model` section and the
expected shape of every tensor, so a mismatch is reported against it; `preprocessor_config.json`
is the front-end preset (sample rate, Kaldi options, window length, normalisation).

Scanned checkpoints (model.scan_layers) are exported unrolled and their exported config says
scan_layers=False, because that is the layout of the files; `vit.stack_blocks` converts back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
import time
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

import aasp_jax
from aasp_jax.audio import presets as presets_lib
from aasp_jax.export import safetensors_io
from aasp_jax.export.safetensors_io import ExportFormatError
from aasp_jax.models import build, vit

FORMAT = 'aasp-jax-encoder'
FORMAT_VERSION = 1
LAYOUT = 'native'
WEIGHTS = 'model.safetensors'
CONFIG = 'config.json'
PREPROCESSOR = 'preprocessor_config.json'
MODEL_CARD = 'README.md'
FILES = (WEIGHTS, CONFIG, PREPROCESSOR, MODEL_CARD)
FEATURE_LAYOUT = '[batch, time, mel]'
METADATA = {'format': FORMAT, 'format_version': str(FORMAT_VERSION), 'layout': LAYOUT}
WHICH = ('teacher', 'student')

__all__ = [
  'ExportFormatError',
  'ExportResult',
  'encoder_from_export',
  'expected_shapes',
  'export_checkpoint',
  'flatten_params',
  'load_export',
  'params_from_export',
  'unflatten_params',
  'write_export',
]


@dataclasses.dataclass(frozen=True)
class ExportResult:
  """What `export_checkpoint` / `write_export` wrote.

  Attributes:
    out_dir: the export folder (absolute).
    files: {file name: size in bytes} of the files written (`FILES`).
    seconds: wall time of the export.
    which: 'teacher' or 'student' (or whatever label `write_export` was given).
    step: the checkpoint's training step.
  """

  out_dir: str
  files: dict[str, int]
  seconds: float
  which: str
  step: int


# ----------------------------------------------------------------------------------------------
# Parameter trees <-> flat tensors
# ----------------------------------------------------------------------------------------------


def flatten_params(params: Mapping) -> dict[str, np.ndarray]:
  """Nested flax params -> {'a.b.c': float32 numpy array} (logical-axis boxes removed)."""
  flat = {}

  def visit(prefix: str, node):
    if isinstance(node, Mapping):
      for key, child in node.items():
        if not isinstance(key, str) or not key or '.' in key:
          raise ValueError(
            f'parameter name {prefix}{key!r} cannot be exported (empty or has a dot)'
          )
        visit(f'{prefix}{key}.', child)
      return
    flat[prefix[:-1]] = np.asarray(node, dtype=np.float32)

  visit('', nn.meta.unbox(params))
  return flat


def unflatten_params(tensors: Mapping[str, np.ndarray]) -> dict:
  """{'a.b.c': array} -> nested dict {'a': {'b': {'c': array}}} (the inverse of flatten_params)."""
  tree: dict = {}
  for name, array in tensors.items():
    *parents, leaf = name.split('.')
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = array
  return tree


def _model_dict(model_cfg) -> dict:
  return (
    model_cfg.to_dict() if isinstance(model_cfg, ConfigDict) else json.loads(json.dumps(model_cfg))
  )


def _preset_of(preset) -> presets_lib.FrontEndPreset:
  if isinstance(preset, presets_lib.FrontEndPreset):
    return preset
  fields = {k: v for k, v in preset.items() if k != 'feature_layout'}
  return presets_lib.FrontEndPreset.from_dict(fields)


def expected_shapes(model_cfg, preset) -> dict[str, tuple[int, ...]]:
  """{tensor name: shape} of the unrolled encoder that `model_cfg` and `preset` describe.

  Computed abstractly (`jax.eval_shape`: no FLOPs, no memory), so it is cheap for any size.
  """
  model = ConfigDict(_model_dict(model_cfg))
  model.scan_layers = False
  preset = _preset_of(preset)
  encoder = build.build_encoder(model, drop_path=0.0)
  shape = (1, preset.target_length, preset.num_mel_bins)
  abstract = jax.eval_shape(
    lambda r: encoder.init(r, jnp.zeros(shape, jnp.float32))['params'], jax.random.key(0)
  )
  leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract))
  return {'.'.join(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in leaves}


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def write_export(
  out_dir: str | os.PathLike,
  model_cfg,
  preset,
  params: Mapping,
  *,
  which: str,
  step: int,
  source: str,
) -> ExportResult:
  """Writes an export folder from a model config, a front end and encoder params.

  Args:
    out_dir: the folder (created if needed; the files in `FILES` are replaced).
    model_cfg: the config's `model` section (ConfigDict or dict).
    preset: the front end (`FrontEndPreset` or its dict).
    params: the encoder's parameters, unrolled or scanned ('blocks' with a leading layer axis; they
      are unrolled here and the exported config says scan_layers=False).
    which, step, source: recorded in config.json and the model card.

  Raises:
    ValueError: if the params do not match the architecture `model_cfg` describes (naming the
      tensors), before anything is written.
  """
  start = time.perf_counter()
  model = _model_dict(model_cfg)
  preset = _preset_of(preset)
  params = nn.meta.unbox(params)
  if 'blocks' in params:
    params = vit.unstack_blocks(params, model['depth'])
  model['scan_layers'] = False
  tensors = flatten_params(params)
  shapes = expected_shapes(model, preset)
  _compare_names_shapes(
    {k: v.shape for k, v in tensors.items()}, shapes, 'the parameters', 'the model config implies'
  )
  out_dir = os.path.abspath(os.fspath(out_dir))
  os.makedirs(out_dir, exist_ok=True)
  config = {
    'format': FORMAT,
    'format_version': FORMAT_VERSION,
    'layout': LAYOUT,
    'model': model,
    'which': which,
    'step': int(step),
    'source': str(source),
    'tensors': {name: list(shapes[name]) for name in sorted(shapes)},
    'aasp_jax_version': aasp_jax.__version__,
  }
  preprocessor = dict(dataclasses.asdict(preset), feature_layout=FEATURE_LAYOUT)
  safetensors_io.save(os.path.join(out_dir, WEIGHTS), tensors, METADATA)
  _write_text(os.path.join(out_dir, CONFIG), json.dumps(config, indent=2) + '\n')
  _write_text(os.path.join(out_dir, PREPROCESSOR), json.dumps(preprocessor, indent=2) + '\n')
  _write_text(os.path.join(out_dir, MODEL_CARD), model_card(config, preprocessor, tensors))
  return ExportResult(
    out_dir=out_dir,
    files={name: os.path.getsize(os.path.join(out_dir, name)) for name in FILES},
    seconds=time.perf_counter() - start,
    which=which,
    step=int(step),
  )


def export_checkpoint(
  checkpoint: str | os.PathLike, out_dir: str | os.PathLike, which: str = 'teacher', step=None
) -> ExportResult:
  """Exports the encoder of a training checkpoint to `out_dir`.

  Args:
    checkpoint: a workdir, its checkpoints/ folder or one step's folder (as
      `pretrained.load_pretrained` takes).
    out_dir: the export folder (created if needed).
    which: 'teacher' (the EMA encoder, the default) or 'student'.
    step: a specific step (default: the newest complete checkpoint).
  """
  from aasp_jax.evaluate import pretrained  # orbax is only needed for this entry point

  start = time.perf_counter()
  model = pretrained.load_pretrained(os.fspath(checkpoint), which=which, step=step)
  result = write_export(
    out_dir,
    model.config.model,
    model.preset,
    model.params,
    which=model.which,
    step=model.step,
    source=model.source,
  )
  return dataclasses.replace(result, seconds=time.perf_counter() - start)


def _write_text(path: str, text: str) -> None:
  partial = path + '.partial'
  with open(partial, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(partial, path)


def model_card(config: dict, preprocessor: dict, tensors: Mapping[str, np.ndarray]) -> str:
  """The export's README.md: what the model is, how it was made, and how to use it in PyTorch."""
  m, p = config['model'], preprocessor
  num_params = sum(int(np.prod(a.shape)) for a in tensors.values())
  window_s = ((p['target_length'] - 1) * p['frame_shift_ms'] + p['frame_length_ms']) / 1000.0
  frame_width = (p['num_mel_bins'] // m['patch_f']) * m['width']
  if m['stem'] == 'aape':
    a = m['aape']
    stem = (
      f'AaPE (aliasing-aware patch embedding: {a["num_modes"]} SBLU modes per group, kernel '
      f'{a["kernel_size"]}, {a["window"]} window, {a["phase"]} phase, {a["lambda_mode"]} Lambda, '
      f'{a["fusion"]} fusion)'
    )
  else:
    stem = 'conv (the ViT / Audio-MAE patch projection)'
  bullets = [
    (
      f'Weights: the {config["which"]} encoder of step {config["step"]} of `{config["source"]}`: '
      f'{num_params:,} float32 parameters in `model.safetensors` (native layout: flax names and '
      'shapes).'
    ),
    (
      f'Architecture: ViT, width {m["width"]}, depth {m["depth"]}, {m["num_heads"]} heads, MLP '
      f'{m["mlp_dim"]}, {m["patch_t"]}x{m["patch_f"]} patches, fixed 2-D sin-cos positions, a CLS '
      f'token, pre-LN blocks, a final LayerNorm. Patch stem: {stem}.'
    ),
    (
      f'Front end (`preprocessor_config.json`, preset `{p["name"]}`): mono {p["sample_rate"]} Hz '
      f'float waveform in [-1, 1] -> Kaldi log-mel ({p["num_mel_bins"]} bins, '
      f'{p["frame_length_ms"]} ms window, {p["frame_shift_ms"]} ms hop) -> padded or cropped to '
      f'{p["target_length"]} frames ({window_s:g} s windows) -> normalised ({p["norm_mode"]}, '
      f'mean {p["norm_mean"]}, std {p["norm_std"]}).'
    ),
    f'Trained in JAX with compute dtype {m["dtype"]}; the PyTorch module computes in float32.',
  ]
  about = '\n'.join(
    textwrap.fill(b, 100, initial_indent='- ', subsequent_indent='  ') for b in bullets
  )
  return f"""# AaSP audio encoder ({m['variant']}, {m['stem']} stem)

An audio spectrogram transformer pre-trained with AaSP (aliasing-aware self-supervised
pre-training), exported from aasp-jax {config['aasp_jax_version']}.

{about}

## Use in PyTorch

```python
import soundfile
import torch
from aasp_jax.export.torch_model import AaSPEncoder  # torch and numpy; JAX is not needed

model = AaSPEncoder.from_pretrained('path/to/this/folder')  # eval mode, float32
wave, rate = soundfile.read('clip.wav', dtype='float32')  # mono at {p['sample_rate']} Hz
out = model.embed(torch.from_numpy(wave)[None])  # any length: cut into {window_s:g} s windows
out['scene']  # [1, {2 * m['width']}]: CLS ++ mean of the clip's patch tokens
out['frames']  # [1, T, {frame_width}]: one per {m['patch_t']}-frame time patch
out['timestamps_ms']  # [1, T]: the time patches' centres
x = model.features(torch.from_numpy(wave)[None])  # log-mel of the first window
tokens = model(x)['tokens']  # [1, time x frequency patches (time-major), {m['width']}]
```

Back in JAX: `aasp_jax.export.exporter.encoder_from_export('path/to/this/folder')` returns the
flax encoder, its parameters and the front-end preset.
"""


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _compare_names_shapes(got: Mapping, want: Mapping, got_what: str, want_what: str) -> None:
  """Raises ExportFormatError naming the first missing / extra / mismatched tensor."""
  for name in sorted(want):
    if name not in got:
      raise ExportFormatError(
        f'tensor {name!r} (expected shape {list(want[name])}, as {want_what}) is missing from '
        f'{got_what}.'
      )
  for name in sorted(got):
    if name not in want:
      raise ExportFormatError(
        f'tensor {name!r} (shape {list(got[name])}) in {got_what} is not one {want_what} has.'
      )
    if tuple(got[name]) != tuple(want[name]):
      raise ExportFormatError(
        f'tensor {name!r} has shape {list(got[name])} in {got_what}, but {want_what} expected '
        f'shape {list(want[name])}.'
      )


def read_json(path: str) -> dict:
  """A JSON object file, with errors naming the file."""
  return safetensors_io.read_json_object(path, str(list(FILES)))


def check_config(config: dict, path: str) -> None:
  """The config.json fields every reader relies on (format, version, layout, model, tensors)."""
  for key in ('format', 'format_version', 'layout', 'model', 'tensors'):
    if key not in config:
      raise ExportFormatError(f'{path}: missing key {key!r}.')
  if config['format'] != FORMAT or config['layout'] != LAYOUT:
    raise ExportFormatError(
      f'{path}: format {config["format"]!r} / layout {config["layout"]!r}; this reader handles '
      f'{FORMAT!r} / {LAYOUT!r}.'
    )
  if config['format_version'] != FORMAT_VERSION:
    raise ExportFormatError(
      f'{path}: format_version {config["format_version"]!r}; this reader handles '
      f'{FORMAT_VERSION} (export the checkpoint again with this aasp-jax version).'
    )
  tensors = config['tensors']
  if not isinstance(tensors, dict) or not all(
    isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s) for s in tensors.values()
  ):
    raise ExportFormatError(f"{path}: 'tensors' must map names to lists of sizes.")


def load_export(export_dir: str | os.PathLike) -> tuple[dict, dict, dict[str, np.ndarray]]:
  """(config dict, preset dict, {name: float32 array}) of an export folder, fully validated.

  Every tensor of model.safetensors must be listed in config.json's 'tensors' with its shape, and
  that list must be exactly the encoder that config.json's 'model' section and the preset describe.

  Raises:
    FileNotFoundError: for a missing file.
    ExportFormatError: naming the file, and for a tensor its name and expected shape, when
      something is corrupted, truncated, missing, extra or of the wrong shape or dtype.
  """
  export_dir = os.fspath(export_dir)
  config_path = os.path.join(export_dir, CONFIG)
  config = read_json(config_path)
  check_config(config, config_path)
  preset_path = os.path.join(export_dir, PREPROCESSOR)
  preset = read_json(preset_path)
  try:
    preset_obj = _preset_of(preset)
  except (TypeError, ValueError) as e:
    raise ExportFormatError(f'{preset_path}: not a valid front-end preset ({e}).') from None
  weights_path = os.path.join(export_dir, WEIGHTS)
  if not os.path.isfile(weights_path):
    raise FileNotFoundError(
      f'{weights_path}: missing (an aasp-jax export folder holds {list(FILES)}).'
    )
  tensors, metadata = safetensors_io.load(weights_path)
  if metadata.get('format') != FORMAT or metadata.get('layout') != LAYOUT:
    raise ExportFormatError(
      f'{weights_path}: __metadata__ {metadata!r} does not mark an {FORMAT!r} / {LAYOUT!r} file.'
    )
  for name, array in tensors.items():
    if array.dtype != np.float32:
      raise ExportFormatError(f'{weights_path}: tensor {name!r} is {array.dtype}, not float32.')
  _compare_names_shapes(
    {k: v.shape for k, v in tensors.items()},
    config['tensors'],
    weights_path,
    f"{config_path}'s 'tensors'",
  )
  try:
    implied = expected_shapes(config['model'], preset_obj)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ExportFormatError(
      f"{config_path}: the 'model' section does not build an encoder ({e})."
    ) from None
  _compare_names_shapes(
    config['tensors'], implied, f"{config_path}'s 'tensors'", f"{config_path}'s 'model' section"
  )
  return config, preset, tensors


def params_from_export(export_dir: str | os.PathLike) -> dict:
  """The export's weights as a flax params tree for `build.build_encoder(config['model'])`
  (unrolled layout; bit-identical to the exported float32 arrays)."""
  return unflatten_params(load_export(export_dir)[2])


def encoder_from_export(export_dir: str | os.PathLike):
  """(flax Encoder, params, FrontEndPreset) of an export folder: the JAX model back again."""
  config, preset, tensors = load_export(export_dir)
  model = ConfigDict(config['model'])
  model.lock()
  encoder = build.build_encoder(model, drop_path=0.0)
  return encoder, unflatten_params(tensors), _preset_of(preset)
