"""Checkpoint -> export folder (Hugging Face layout), the folder's validating loader, and the JAX
re-import.

  from aasp_jax.export import exporter
  result = exporter.export_checkpoint('runs/quickstart', 'exports/quickstart')  # EMA teacher
  config, preset, tensors = exporter.load_export('exports/quickstart')  # native (flax) layout
  encoder, params, preset = exporter.encoder_from_export('exports/quickstart')  # back in JAX

An export folder (`FILES`) is a Hugging Face model folder that needs neither JAX nor aasp-jax:
- model.safetensors: float32 weights in the PyTorch layout, named by the state dict of
  `hf/aasp_torch.py`'s module ('encoder.blocks.0.attn.query.weight', 'encoder.cls', ...; a Dense
  kernel [in, out] becomes a Linear weight [out, in], a conv kernel HWIO becomes OIHW, a LayerNorm
  scale its weight), plus 'classifier.weight' / 'classifier.bias' for a fine-tuned classifier;
  metadata format=pt, as transformers requires;
- config.json: transformers' fields (model_type 'aasp', architectures, auto_map) and aasp-jax's:
  the checkpoint's `model` section, the front-end preset ('frontend'), every tensor's shape, what
  it was made from (which encoder, step, the run's name, the training data's name) and, for a
  classifier, id2label / label2id / problem_type;
- preprocessor_config.json: the feature extractor (the preset, `sampling_rate`, `feature_size`);
- the code: aasp_torch.py, configuration_aasp.py, modeling_aasp.py, feature_extraction_aasp.py,
  copied verbatim from aasp_jax/export/hf/ (the package's PyTorch module is that file);
- README.md: a model card with a YAML header.
No pickle is written or read anywhere, and no absolute path of this machine is written. Writing
needs numpy only (safetensors_io); the tensors are converted between the flax and PyTorch layouts
here, in both directions, exactly.

Scanned checkpoints (model.scan_layers) are exported unrolled and their exported config says
scan_layers=False; `vit.stack_blocks` converts back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

import aasp_jax
from aasp_jax import later_fields
from aasp_jax.audio import presets as presets_lib
from aasp_jax.export import model_card, safetensors_io
from aasp_jax.export.safetensors_io import ExportFormatError
from aasp_jax.models import build, vit

# Must equal aasp_torch's (a test checks): this module cannot import it without torch.
FORMAT = 'aasp-jax-export'
FORMAT_VERSION = 2
LAYOUT = 'pytorch'
WEIGHTS = 'model.safetensors'
CONFIG = 'config.json'
PREPROCESSOR = 'preprocessor_config.json'
MODEL_CARD = 'README.md'
CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'hf')
CODE_FILES = (
  'aasp_torch.py',
  'configuration_aasp.py',
  'modeling_aasp.py',
  'feature_extraction_aasp.py',
)
FILES = (WEIGHTS, CONFIG, PREPROCESSOR, MODEL_CARD, *CODE_FILES)
TIMM_WEIGHTS = 'timm_model.safetensors'
ONNX_MODEL = 'model.onnx'
OPTIONAL_FILES = (TIMM_WEIGHTS, ONNX_MODEL)
METADATA = {'format': 'pt'}  # transformers refuses safetensors files without it
ENCODER_PREFIX = 'encoder.'
HEAD_PREFIX = 'classifier.'
MODEL_TYPE = 'aasp'
AUTO_MAP = {
  'AutoConfig': 'configuration_aasp.AaSPConfig',
  'AutoModel': 'modeling_aasp.AaSPModel',
}
CLASSIFIER_AUTO_MAP = {
  **AUTO_MAP,
  'AutoModelForAudioClassification': 'modeling_aasp.AaSPForAudioClassification',
}
FEATURE_EXTRACTOR = 'AaSPFeatureExtractor'
FEATURE_EXTRACTOR_AUTO_MAP = {
  'AutoFeatureExtractor': 'feature_extraction_aasp.AaSPFeatureExtractor'
}
PROBLEM_TYPES = {False: 'single_label_classification', True: 'multi_label_classification'}
WHICH = ('teacher', 'student')

__all__ = [
  'ExportFormatError',
  'ExportResult',
  'encoder_from_export',
  'expected_shapes',
  'expected_tensors',
  'export_checkpoint',
  'finetune_checkpoints',
  'flatten_params',
  'from_torch_layout',
  'head_from_export',
  'load_export',
  'params_from_export',
  'to_torch_layout',
  'unflatten_params',
  'write_export',
  'write_model_card',
  'write_timm',
]


@dataclasses.dataclass(frozen=True)
class ExportResult:
  """What `export_checkpoint` / `write_export` wrote.

  Attributes:
    out_dir: the export folder (absolute).
    files: {file name: size in bytes} of the files written (`FILES`).
    seconds: wall time of the export.
    which: 'teacher', 'student', 'finetuned' (or whatever label `write_export` was given).
    step: the checkpoint's training step.
  """

  out_dir: str
  files: dict[str, int]
  seconds: float
  which: str
  step: int


# ----------------------------------------------------------------------------------------------
# Parameter trees <-> flat tensors, flax layout <-> PyTorch layout
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


_BLOCK = re.compile(r'^blocks_(\d+)$')


def _torch_entry(native_name: str, ndim: int) -> tuple[str, str]:
  """(PyTorch name, conversion) of a flax tensor: 'blocks_3.attn.query.kernel' (2-D) ->
  ('encoder.blocks.3.attn.query.weight', 'dense'); conversions 'dense' (transpose), 'conv' (HWIO ->
  OIHW) or 'same'. The PyTorch module names its submodules as flax does, so only the block index
  and the leaf names change."""
  parts = native_name.split('.')
  if match := _BLOCK.match(parts[0]):
    parts = ['blocks', match.group(1), *parts[1:]]
  leaf, kind = parts[-1], 'same'
  if leaf == 'kernel':
    kind = {2: 'dense', 4: 'conv'}.get(ndim)
    if kind is None:
      raise ValueError(f'tensor {native_name!r}: a {ndim}-D kernel has no PyTorch layout here.')
    leaf = 'weight'
  elif leaf == 'scale':
    leaf = 'weight'  # LayerNorm
  return ENCODER_PREFIX + '.'.join([*parts[:-1], leaf]), kind


def _native_entry(torch_name: str, ndim: int) -> tuple[str, str]:
  """The inverse of `_torch_entry` for an 'encoder.*' tensor."""
  parts = torch_name[len(ENCODER_PREFIX) :].split('.')
  if parts[0] == 'blocks' and len(parts) > 2 and parts[1].isdigit():
    parts = [f'blocks_{parts[1]}', *parts[2:]]
  leaf, kind = parts[-1], 'same'
  if leaf == 'weight':
    leaf, kind = {2: ('kernel', 'dense'), 4: ('kernel', 'conv'), 1: ('scale', 'same')}.get(
      ndim, (None, None)
    )
    if leaf is None:
      raise ExportFormatError(f'tensor {torch_name!r}: a {ndim}-D weight has no flax layout.')
  return '.'.join([*parts[:-1], leaf]), kind


def _convert(array: np.ndarray, kind: str, to_torch: bool) -> np.ndarray:
  if kind == 'dense':
    array = array.T
  elif kind == 'conv':
    array = array.transpose((3, 2, 0, 1) if to_torch else (2, 3, 1, 0))
  # np.array, not np.ascontiguousarray: that one makes a scalar (AaPE's log_delta) 1-D.
  return np.array(array, dtype=np.float32, order='C')


def _convert_shape(shape, kind: str) -> tuple[int, ...]:
  if kind == 'dense':
    return tuple(shape[::-1])
  if kind == 'conv':
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def to_torch_layout(native: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Flat flax encoder tensors (`flatten_params`, unrolled) -> the PyTorch module's state dict."""
  out = {}
  for name, array in native.items():
    torch_name, kind = _torch_entry(name, np.ndim(array))
    out[torch_name] = _convert(np.asarray(array), kind, True)
  return out


def from_torch_layout(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The 'encoder.*' tensors of a PyTorch-layout file -> flat flax tensors (exactly the inverse of
  `to_torch_layout`; 'classifier.*' tensors are left out)."""
  out = {}
  for name, array in tensors.items():
    if name.startswith(ENCODER_PREFIX):
      native_name, kind = _native_entry(name, np.ndim(array))
      out[native_name] = _convert(np.asarray(array), kind, False)
  return out


def _model_dict(model_cfg) -> dict:
  """The model section as a plain dict, with the fields a config saved before they existed means
  (so an export's config.json always states them)."""
  model = (
    model_cfg.to_dict() if isinstance(model_cfg, ConfigDict) else json.loads(json.dumps(model_cfg))
  )
  return {**later_fields.MODEL_FIELDS, **model}


def _preset_of(preset) -> presets_lib.FrontEndPreset:
  if isinstance(preset, presets_lib.FrontEndPreset):
    return preset
  fields = {k: v for k, v in preset.items() if k != 'feature_layout'}
  return presets_lib.FrontEndPreset.from_dict(fields)


def expected_shapes(model_cfg, preset) -> dict[str, tuple[int, ...]]:
  """{flax tensor name: shape} of the unrolled encoder that `model_cfg` and `preset` describe.

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


def expected_tensors(model_cfg, preset, num_labels: int | None = None) -> dict[str, tuple]:
  """{PyTorch tensor name: shape} of model.safetensors for this architecture (with a head of
  `num_labels` classes for a classifier)."""
  shapes = {}
  for name, shape in expected_shapes(model_cfg, preset).items():
    torch_name, kind = _torch_entry(name, len(shape))
    shapes[torch_name] = _convert_shape(shape, kind)
  if num_labels is not None:
    width = _model_dict(model_cfg)['width']
    shapes[HEAD_PREFIX + 'weight'] = (num_labels, width)
    shapes[HEAD_PREFIX + 'bias'] = (num_labels,)
  return shapes


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def run_name(source: str) -> str:
  """The run's name from a checkpoint path ('.../runs/b16/checkpoints/40000' -> 'b16'): exports
  never carry a path of the machine that wrote them."""
  parts = os.path.normpath(str(source)).split(os.sep)
  if len(parts) >= 3 and parts[-2] == 'checkpoints' and parts[-1].isdigit():
    return parts[-3]
  if parts[-1] == 'checkpoints' and len(parts) >= 2:
    return parts[-2]
  return parts[-1]


def _data_name(data) -> str | None:
  """The training data as the card names it: the last two parts of each path of `data.train`
  ('/data/sonicpi/labels.csv' -> 'sonicpi/labels.csv'), never a full path of the machine."""
  if data is None or not str(data).strip() or (isinstance(data, (list, tuple)) and not data):
    return None
  names = []
  parts_of = data if isinstance(data, (list, tuple)) else str(data).split(',')
  for part in parts_of:
    parts = [p for p in os.path.normpath(str(part).strip()).split(os.sep) if p not in ('', '.')]
    names.append('/'.join(parts[-2:]))
  return ', '.join(names)


def _head_tensors(head, labels, width: int) -> tuple[dict[str, np.ndarray], list[str]]:
  """classifier.weight [C, D] / classifier.bias [C] of a flax Dense head {'kernel', 'bias'}."""
  head = nn.meta.unbox(head)
  if set(head) != {'kernel', 'bias'}:
    raise ValueError(f"head must be a Dense's {{'kernel', 'bias'}}; got keys {sorted(head)}.")
  kernel = np.asarray(head['kernel'], np.float32)
  bias = np.asarray(head['bias'], np.float32)
  if kernel.ndim != 2 or kernel.shape[0] != width or bias.shape != (kernel.shape[1],):
    raise ValueError(
      f'head kernel {list(kernel.shape)} / bias {list(bias.shape)}: expected [{width}, C] / [C] '
      f'(a Dense on the width-{width} CLS token).'
    )
  if labels is None:
    raise ValueError('a classifier export needs its label names (labels=...).')
  labels = [str(label) for label in labels]
  if len(labels) != kernel.shape[1] or len(set(labels)) != len(labels):
    raise ValueError(
      f'{len(labels)} labels ({len(set(labels))} distinct) for a head of {kernel.shape[1]} '
      'classes: give one distinct name per class, in logit order.'
    )
  return {HEAD_PREFIX + 'weight': kernel.T.copy(), HEAD_PREFIX + 'bias': bias}, labels


def preprocessor_config(preset: presets_lib.FrontEndPreset) -> dict:
  """preprocessor_config.json: the preset for `AaSPFeatureExtractor`, with transformers' names."""
  fields = preset.to_dict()
  sample_rate = fields.pop('sample_rate')
  return {
    'feature_extractor_type': FEATURE_EXTRACTOR,
    'auto_map': dict(FEATURE_EXTRACTOR_AUTO_MAP),
    'sampling_rate': sample_rate,
    'feature_size': preset.num_mel_bins,
    'padding_value': 0.0,
    'padding_side': 'right',
    'return_attention_mask': True,  # the frames of each clip: the padding rule
    **fields,
  }


def write_export(
  out_dir: str | os.PathLike,
  model_cfg,
  preset,
  params: Mapping,
  *,
  which: str,
  step: int,
  source: str,
  head: Mapping | None = None,
  labels=None,
  multilabel: bool = False,
  data: str | None = None,
  origin: str | None = None,
) -> ExportResult:
  """Writes an export folder from a model config, a front end and encoder params.

  Args:
    out_dir: the folder (created if needed; the files in `FILES` are replaced).
    model_cfg: the config's `model` section (ConfigDict or dict).
    preset: the front end (`FrontEndPreset` or its dict).
    params: the encoder's parameters, unrolled or scanned ('blocks' with a leading layer axis; they
      are unrolled here and the exported config says scan_layers=False).
    which, step: recorded in config.json and the model card.
    source: where the weights come from; only its run name is written (`run_name`).
    head: a classifier's flax Dense on the CLS output, {'kernel': [D, C], 'bias': [C]}; with it
      the folder is an audio-classification model (AaSPForAudioClassification).
    labels: the C class names, in logit order (required with `head`).
    multilabel: independent sigmoid scores (True) or one softmax (False).
    data: the training data (paths or a name; each path is written by its last two parts).
    origin: what imported weights are (`Pretrained.origin`), shown by the model card.

  Raises:
    ValueError: if the params (or head) do not match the architecture `model_cfg` describes
      (naming the tensors), before anything is written.
  """
  start = time.perf_counter()
  model = _model_dict(model_cfg)
  preset = _preset_of(preset)
  params = nn.meta.unbox(params)
  if 'blocks' in params:
    params = vit.unstack_blocks(params, model['depth'])
  model['scan_layers'] = False
  native = flatten_params(params)
  shapes = expected_shapes(model, preset)
  _compare_names_shapes(
    {k: v.shape for k, v in native.items()}, shapes, 'the parameters', 'the model config implies'
  )
  tensors = to_torch_layout(native)
  config = {
    'model_type': MODEL_TYPE,
    'architectures': ['AaSPModel'],
    'auto_map': dict(AUTO_MAP),
    'format': FORMAT,
    'format_version': FORMAT_VERSION,
    'layout': LAYOUT,
    'model': model,
    'frontend': preset.to_dict(),
    'which': which,
    'step': int(step),
    'source': run_name(source),
    'data': _data_name(data),
    'imported_from': origin,
    'aasp_jax_version': aasp_jax.__version__,
  }
  if head is not None:
    head_tensors, labels = _head_tensors(head, labels, model['width'])
    tensors.update(head_tensors)
    config.update(
      architectures=['AaSPForAudioClassification'],
      auto_map=dict(CLASSIFIER_AUTO_MAP),
      id2label={str(i): label for i, label in enumerate(labels)},
      label2id={label: i for i, label in enumerate(labels)},
      problem_type=PROBLEM_TYPES[bool(multilabel)],
    )
  config['tensors'] = {name: list(tensors[name].shape) for name in sorted(tensors)}
  out_dir = os.path.abspath(os.fspath(out_dir))
  os.makedirs(out_dir, exist_ok=True)
  # A model.onnx or timm file of an earlier export would not be these weights: remove them (the
  # caller writes them again from this folder).
  for name in OPTIONAL_FILES:
    if os.path.isfile(stale := os.path.join(out_dir, name)):
      os.remove(stale)
  safetensors_io.save(os.path.join(out_dir, WEIGHTS), tensors, METADATA)
  _write_json(os.path.join(out_dir, CONFIG), config)
  _write_json(os.path.join(out_dir, PREPROCESSOR), preprocessor_config(preset))
  for name in CODE_FILES:
    partial = os.path.join(out_dir, name + '.partial')
    shutil.copyfile(os.path.join(CODE_DIR, name), partial)
    os.replace(partial, os.path.join(out_dir, name))
  write_model_card(out_dir)
  return ExportResult(
    out_dir=out_dir,
    files={name: os.path.getsize(os.path.join(out_dir, name)) for name in FILES},
    seconds=time.perf_counter() - start,
    which=which,
    step=int(step),
  )


def finetune_checkpoints():
  """aasp_jax.finetune.checkpoint, or None where this aasp-jax has no fine-tuning checkpoints."""
  try:
    from aasp_jax.finetune import checkpoint
  except ImportError:
    return None
  return checkpoint


def export_checkpoint(
  checkpoint: str | os.PathLike, out_dir: str | os.PathLike, which: str = 'teacher', step=None
) -> ExportResult:
  """Exports the encoder of a pre-training checkpoint, or the classifier of a fine-tuning one, to
  `out_dir`.

  Args:
    checkpoint: a workdir, its checkpoints/ folder or one step's folder.
    out_dir: the export folder (created if needed).
    which: 'teacher' (the EMA encoder, the default) or 'student' of a pre-training run (a
      fine-tuned classifier has one encoder: `which` does not apply).
    step: a specific step (default: the newest complete checkpoint).
  """
  start = time.perf_counter()
  finetune = finetune_checkpoints()
  if finetune is not None and finetune.is_finetuned(os.fspath(checkpoint)):
    if which != 'teacher':
      raise ValueError(
        f'{checkpoint} is a fine-tuning run: it holds one encoder (with its head), so '
        f'which={which!r} does not apply; drop --which.'
      )
    model = finetune.load_finetuned(os.fspath(checkpoint), step=step)
    result = write_export(
      out_dir,
      model.model_config,
      model.preset,
      model.encoder_params,
      which='finetuned',
      step=model.step,
      source=model.source,
      head=model.head_params,
      labels=model.labels,
      multilabel=model.multilabel,
      data=getattr(model, 'data', None),
      origin=getattr(model, 'origin', None),
    )
    return dataclasses.replace(result, seconds=time.perf_counter() - start)
  from aasp_jax.evaluate import pretrained  # orbax is only needed for this entry point

  try:
    model = pretrained.load_pretrained(os.fspath(checkpoint), which=which, step=step)
  except (OSError, ValueError, KeyError) as e:
    if finetune is None:
      # Without aasp_jax.finetune a fine-tuning checkpoint cannot even be recognised.
      raise type(e)(
        f'{e} (if {os.fspath(checkpoint)} is an aasp-finetune run: this aasp-jax has no '
        'aasp_jax.finetune.checkpoint to read classifier checkpoints)'
      ) from e
    raise
  data = model.config.get('data', {}).get('train')
  result = write_export(
    out_dir,
    model.config.model,
    model.preset,
    model.params,
    which=model.which,
    step=model.step,
    source=model.source,
    data=data,
    origin=model.origin,
  )
  return dataclasses.replace(result, seconds=time.perf_counter() - start)


def write_timm(export_dir: str | os.PathLike) -> str:
  """Adds timm_model.safetensors (timm / Audio-MAE names, conv stem only) to an export folder,
  from the folder's own weights, and records timm's constructor arguments in config.json
  ('timm') where `timm_layout.timm_constructor_args` exists. Returns the file's path."""
  from aasp_jax.export import timm_layout

  export_dir = os.fspath(export_dir)
  config, preset, tensors = load_export(export_dir)
  path = os.path.join(export_dir, TIMM_WEIGHTS)
  sizes = dict(target_length=preset['target_length'], num_mel_bins=preset['num_mel_bins'])
  timm_layout.save_timm(path, unflatten_params(tensors), config['model'], **sizes)
  constructor = getattr(timm_layout, 'timm_constructor_args', None)
  if constructor is not None:
    config['timm'] = constructor(config['model'], **sizes)
    _write_json(os.path.join(export_dir, CONFIG), config)
  write_model_card(export_dir)
  return path


def _write_text(path: str, text: str) -> None:
  partial = path + '.partial'
  with open(partial, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(partial, path)


def _write_json(path: str, value: dict) -> None:
  _write_text(path, json.dumps(value, indent=2) + '\n')


# ----------------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------------


def write_model_card(export_dir: str | os.PathLike) -> str:
  """(Re)writes README.md (`model_card.render`) from the folder's config.json and the files present
  (so model.onnx / timm_model.safetensors are listed once written). Returns its path."""
  export_dir = os.fspath(export_dir)
  config = read_json(os.path.join(export_dir, CONFIG))
  present = [n for n in (*FILES, *OPTIONAL_FILES) if os.path.isfile(os.path.join(export_dir, n))]
  path = os.path.join(export_dir, MODEL_CARD)
  _write_text(path, model_card.render(config, present))
  return path


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
  """The config.json fields every reader relies on (format, version, layout, model, frontend,
  tensors)."""
  for key in ('format', 'format_version', 'layout', 'model', 'frontend', 'tensors'):
    if key not in config:
      raise ExportFormatError(f'{path}: missing key {key!r}.')
  if config['format'] != FORMAT or config['layout'] != LAYOUT:
    raise ExportFormatError(
      f'{path}: format {config["format"]!r} / layout {config["layout"]!r}; this reader handles '
      f'{FORMAT!r} / {LAYOUT!r} (an older aasp-jax wrote it: export the checkpoint again).'
    )
  if config['format_version'] != FORMAT_VERSION:
    raise ExportFormatError(
      f'{path}: format_version {config["format_version"]!r}; this reader handles '
      f'{FORMAT_VERSION} (export the checkpoint again with this aasp-jax version).'
    )
  for key in ('model', 'frontend'):
    if not isinstance(config[key], dict):
      raise ExportFormatError(f'{path}: {key!r} must be a JSON object.')
  tensors = config['tensors']
  if not isinstance(tensors, dict) or not all(
    isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s) for s in tensors.values()
  ):
    raise ExportFormatError(f"{path}: 'tensors' must map names to lists of sizes.")
  id2label = config.get('id2label')
  if id2label is not None and (
    not isinstance(id2label, dict) or sorted(id2label) != sorted(map(str, range(len(id2label))))
  ):
    raise ExportFormatError(f"{path}: 'id2label' must map '0' .. 'C-1' to label names.")


def _check_preprocessor(path: str, preset: presets_lib.FrontEndPreset) -> None:
  """preprocessor_config.json must describe config.json's front end, field by field."""
  found = read_json(path)
  want = preprocessor_config(preset)
  for key in ('sampling_rate', 'feature_size', *preset.to_dict()):
    key = 'sampling_rate' if key == 'sample_rate' else key
    if key not in found:
      raise ExportFormatError(f'{path}: missing key {key!r}.')
    if found[key] != want[key]:
      raise ExportFormatError(
        f"{path}: {key} is {found[key]!r}, but config.json's 'frontend' says {want[key]!r}."
      )


def load_export(export_dir: str | os.PathLike) -> tuple[dict, dict, dict[str, np.ndarray]]:
  """(config dict, preset dict, {flax name: float32 array} of the encoder) of an export folder,
  fully validated.

  Every tensor of model.safetensors must be listed in config.json's 'tensors' with its shape, that
  list must be exactly the model that config.json's 'model' section, front end and labels
  describe, and preprocessor_config.json must agree with the front end. The tensors come back in
  the native flax layout (`from_torch_layout`); a classifier's head is `head_from_export`'s.

  Raises:
    FileNotFoundError: for a missing file.
    ExportFormatError: naming the file, and for a tensor its name and expected shape, when
      something is corrupted, truncated, missing, extra or of the wrong shape or dtype.
  """
  config, preset, tensors = _load(export_dir)
  return config, preset, from_torch_layout(tensors)


def _load(export_dir) -> tuple[dict, dict, dict[str, np.ndarray]]:
  export_dir = os.fspath(export_dir)
  config_path = os.path.join(export_dir, CONFIG)
  config = read_json(config_path)
  check_config(config, config_path)
  try:
    preset = _preset_of(config['frontend'])
  except (TypeError, ValueError) as e:
    raise ExportFormatError(
      f"{config_path}: 'frontend' is not a valid front-end preset ({e})."
    ) from None
  _check_preprocessor(os.path.join(export_dir, PREPROCESSOR), preset)
  weights_path = os.path.join(export_dir, WEIGHTS)
  if not os.path.isfile(weights_path):
    raise FileNotFoundError(
      f'{weights_path}: missing (an aasp-jax export folder holds {list(FILES)}).'
    )
  tensors, metadata = safetensors_io.load(weights_path)
  if metadata.get('format') != METADATA['format']:
    raise ExportFormatError(
      f'{weights_path}: __metadata__ {metadata!r} does not mark a PyTorch-layout file '
      f"(format 'pt')."
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
  id2label = config.get('id2label')
  try:
    implied = expected_tensors(config['model'], preset, len(id2label) if id2label else None)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ExportFormatError(
      f"{config_path}: the 'model' section does not build an encoder ({e})."
    ) from None
  _compare_names_shapes(
    config['tensors'], implied, f"{config_path}'s 'tensors'", f"{config_path}'s 'model' section"
  )
  return config, preset.to_dict(), tensors


def head_from_export(export_dir: str | os.PathLike) -> dict[str, np.ndarray] | None:
  """A classifier export's head as flax Dense params {'kernel': [D, C], 'bias': [C]} (None for an
  encoder export), validated as `load_export` validates the folder."""
  tensors = _load(export_dir)[2]
  if HEAD_PREFIX + 'weight' not in tensors:
    return None
  return {
    'kernel': np.array(tensors[HEAD_PREFIX + 'weight'].T, order='C'),
    'bias': tensors[HEAD_PREFIX + 'bias'],
  }


def params_from_export(export_dir: str | os.PathLike) -> dict:
  """The export's encoder weights as a flax params tree for `build.build_encoder(config['model'])`
  (unrolled layout; bit-identical to the exported float32 arrays)."""
  return unflatten_params(load_export(export_dir)[2])


def encoder_from_export(export_dir: str | os.PathLike):
  """(flax Encoder, params, FrontEndPreset) of an export folder: the JAX model back again."""
  config, preset, tensors = load_export(export_dir)
  model = ConfigDict(config['model'])
  model.lock()
  encoder = build.build_encoder(model, drop_path=0.0)
  return encoder, unflatten_params(tensors), _preset_of(preset)
