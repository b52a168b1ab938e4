"""ONNX export of the PyTorch model of an export folder, and its check with onnxruntime.

  from aasp_jax.export import onnx_export
  done = onnx_export.export_encoder_onnx('exports/quickstart', 'model.onnx')
  error = onnx_export.check_onnx(done.path, done.module, done.inputs)  # max relative error

Two graphs can be written from `aasp_torch.AaSPEncoder` (the file in the export folder):
- 'log_mel' (what `aasp-export --onnx` writes): inputs `log_mel` float32 [batch, frames, mel]
  (normalised, as `AaSPEncoder.features` / the feature extractor return it) and `attention_mask`
  int32 [batch, frames] (1 for the frames of the clip, the extractor's), outputs `scene` [batch,
  2D] (CLS ++ mean of the valid tokens), `cls` [batch, D] and `tokens` [batch, patches, D]
  (time-major): `AaSPEncoder.forward` under the padding rule (time patches with no frame of the
  clip are masked as keys and left out of the mean). Batch and frames are dynamic: any multiple
  of patch_t up to max_time_patches * patch_t frames (e.g. 128, 256 or 1024), since the position
  tables are sliced and AaPE's modulation DFT and band pooling are computed from the traced
  length. For a classification export the graph is `log_mel` -> `logits` [batch, labels] instead
  (the padding visible, as fine-tuning reads clips).
- 'waveform': inputs `waveform` float32 [batch, samples] holding exactly one window
  (`window_samples` = the samples of target_length frames, e.g. 163,840 = 10.24 s at 16 kHz for
  1024 frames) and `num_samples` int64 [batch] (each clip's true length; shorter clips
  zero-padded), outputs `scene` [batch, 2D] (`embed`'s 'cls_mean' pooling of one window), `cls`
  and `tokens`. The Kaldi front end is matrix products in float64, so the graph needs no FFT
  operator. Only the batch is dynamic here.

The conv stem is exported with the TorchScript exporter (`dynamo=False`) at opset 17, the first
with LayerNormalization; the AaPE stem needs the dynamo exporter (opset 18), which `export_onnx`
falls back to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings

import numpy as np

try:
  import torch
  from torch import nn
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError(
    'aasp_jax.export.onnx_export needs PyTorch and onnx: pip install torch onnx '
    '(and onnxruntime to check the exported file).'
  ) from e

OPSET = 17
DYNAMO_OPSET = 18
# What check_onnx must stay under for a file to be used: the parity bound of the design doc.
CHECK_TOLERANCE = 1e-4
GRAPHS = ('log_mel', 'waveform')

log = logging.getLogger(__name__)


class LogMelGraph(nn.Module):
  """(log-mel [B, T, F], attention_mask [B, T]) -> (scene [B, 2D], cls [B, D], tokens [B, N, D]).

  `attention_mask` marks the frames of the clip (1) as the feature extractor returns it; the time
  patches with none are masked as attention keys and left out of the scene's mean, the padding
  rule of every aasp-jax path. ONNX outputs are tuples, not dicts.
  """

  def __init__(self, encoder: nn.Module):
    super().__init__()
    self.encoder = encoder

  def forward(self, log_mel_btf, attention_mask_bt):
    token_valid = self.encoder.token_valid_of_frames(attention_mask_bt)
    out = self.encoder(log_mel_btf, token_valid)
    return self.encoder.scene(out, token_valid), out['cls'], out['tokens']


class LogitsGraph(nn.Module):
  """log-mel [B, T, F] -> logits [B, C] of an `aasp_torch.AaSPClassifier`."""

  def __init__(self, classifier: nn.Module):
    super().__init__()
    self.classifier = classifier

  def forward(self, log_mel_btf):
    return self.classifier(log_mel_btf)


class WaveformGraph(nn.Module):
  """(waveform [B, S] of one window, num_samples [B]) -> (scene [B, 2D], cls [B, D], tokens).

  Clips shorter than the window are zero-padded to it with their true lengths in `num_samples`:
  the front end analyses each clip's own samples and the padding is masked, as in `embed`.
  """

  def __init__(self, encoder: nn.Module):
    super().__init__()
    self.encoder = encoder

  def forward(self, waveform_bs, num_samples_b):
    token_valid = self.encoder.token_valid(num_samples_b)
    out = self.encoder(self.encoder.features(waveform_bs, num_samples_b), token_valid)
    return self.encoder.scene(out, token_valid), out['cls'], out['tokens']


@dataclasses.dataclass(frozen=True)
class OnnxExport:
  """An ONNX file written by `export_encoder_onnx`, and what to check it against.

  Attributes:
    path: the .onnx file.
    module: the traced torch module (`LogMelGraph`, `LogitsGraph` or `WaveformGraph`).
    inputs: the example inputs it was traced with (`check_onnx(path, module, inputs)`).
    exporter: 'torchscript' or 'dynamo' (see `export_onnx`).
    opset: the default-domain opset of the file.
    max_frames: the longest input the graph takes (frames; None: the input length is fixed).
    frame_multiple: input lengths must be multiples of this (patch_t).
  """

  path: str
  module: nn.Module
  inputs: tuple
  exporter: str
  opset: int
  max_frames: int | None = None
  frame_multiple: int | None = None


def _torchscript_export(module, inputs, path, input_names, output_names, opset, dynamic_axes):
  with warnings.catch_warnings():
    # The tracer warns wherever a shape becomes a Python number (the input checks, the front end's
    # pad to target_length): the dynamic sizes themselves are traced as shape operations.
    warnings.simplefilter('ignore', torch.jit.TracerWarning)
    torch.onnx.export(
      module,
      tuple(inputs),
      path,
      input_names=input_names,
      output_names=output_names,
      dynamic_axes=dynamic_axes,
      opset_version=opset,
      dynamo=False,
    )


@contextlib.contextmanager
def _quiet_torchvision_registry():
  """The dynamo exporter logs a warning per torchvision operator it cannot register when
  torchvision is absent; the encoder uses none of them, so they are noise here."""
  registry = logging.getLogger('torch.onnx._internal.exporter._registration')
  level = registry.level
  registry.setLevel(logging.ERROR)
  try:
    yield
  finally:
    registry.setLevel(level)


def _dynamo_export(module, inputs, path, input_names, output_names, opset, dynamic_shapes):
  with _quiet_torchvision_registry(), warnings.catch_warnings():
    warnings.simplefilter('ignore', FutureWarning)  # torch.export's own deprecation notices
    torch.onnx.export(
      module,
      tuple(inputs),
      path,
      input_names=input_names,
      output_names=output_names,
      dynamic_shapes=dynamic_shapes,
      # The dynamo exporter's own floor is opset 18.
      opset_version=max(opset, DYNAMO_OPSET),
      dynamo=True,
      external_data=False,
      verbose=False,
    )


def export_onnx(
  module: nn.Module,
  inputs: tuple,
  onnx_path: str | os.PathLike,
  input_names: list[str],
  output_names: list[str],
  opset: int = OPSET,
  time_axis: tuple[int, int] | None = None,
  torchscript: bool = True,
) -> str:
  """Writes `module` traced on `inputs` to `onnx_path` with a dynamic batch axis (axis 0 of every
  input and output).

  With `time_axis=(multiple, max_multiples)`, axis 1 of the first input is dynamic too, any
  multiple of `multiple` up to `multiple * max_multiples`, and so is axis 1 of the other inputs
  of rank 2 (the frame mask) and of every output of rank 3 (the tokens).

  The TorchScript exporter (`dynamo=False`, fast, opset `opset`) is tried first (unless
  `torchscript=False`); where it fails the dynamo exporter (torch.export + onnxscript, opset >= 18,
  slower) writes the file instead. The AaPE stem never goes through TorchScript (it has no ONNX
  symbolic for `sinh`). One file with the weights inside, written under a temporary name and
  renamed into place.

  Returns:
    'torchscript' or 'dynamo': the exporter that wrote the file.
  """
  if opset < OPSET:
    raise ValueError(f'opset {opset}: the encoder needs opset >= {OPSET} (LayerNormalization).')
  onnx_path = os.fspath(onnx_path)
  partial = onnx_path + '.partial'
  module.eval()
  with torch.no_grad():
    ranks = [out.ndim for out in _as_tuple(module(*inputs))]
  axes = {name: {0: 'batch'} for name in (*input_names, *output_names)}
  batch = torch.export.Dim('batch', min=1)
  shapes = [{0: batch} for _ in inputs]
  if time_axis is not None:
    multiple, max_multiples = time_axis
    frames = multiple * torch.export.Dim('time_patches', min=1, max=max_multiples)
    # The first input's axis 1 is time, and so is that of every other input of rank 2 (a mask).
    for i, (name, value) in enumerate(zip(input_names, inputs)):
      if i == 0 or value.ndim == 2:
        axes[name][1] = 'frames'
        shapes[i][1] = frames
    for name, rank in zip(output_names, ranks):
      if rank == 3:
        axes[name][1] = 'patches'
  if torchscript:
    try:
      with torch.no_grad():
        _torchscript_export(module, inputs, partial, input_names, output_names, opset, axes)
      os.replace(partial, onnx_path)
      return 'torchscript'
    except Exception as e:  # noqa: BLE001
      # Any failure of the tracer or of its symbolic registry: the dynamo exporter may still
      # succeed, and if it does not, both errors are reported.
      log.info('TorchScript ONNX export failed (%s); using the dynamo exporter.', e)
      torchscript_error = repr(e)
  else:
    torchscript_error = 'not tried'
  try:
    with torch.no_grad():
      _dynamo_export(module, inputs, partial, input_names, output_names, opset, tuple(shapes))
  except Exception as dynamo_error:
    if os.path.exists(partial):
      os.remove(partial)
    raise ValueError(
      f'{onnx_path}: neither ONNX exporter could export the model. TorchScript: '
      f'{torchscript_error}; dynamo: {dynamo_error!r}'
    ) from dynamo_error
  _drop_stack_traces(partial)
  os.replace(partial, onnx_path)
  return 'dynamo'


def _drop_stack_traces(path: str) -> None:
  """Removes the dynamo exporter's per-node source stack traces: they hold absolute paths of the
  machine that exported (an export folder names nothing of it), and no runtime reads them."""
  import onnx

  model = onnx.load(path)
  graphs = [model.graph, *(f for f in model.functions)]
  while graphs:
    graph = graphs.pop()
    for node in graph.node:
      keep = [p for p in node.metadata_props if p.key != 'pkg.torch.onnx.stack_trace']
      del node.metadata_props[:]
      node.metadata_props.extend(keep)
      graphs.extend(a.g for a in node.attribute if a.HasField('g'))
  onnx.save(model, path)


def _as_tuple(value) -> tuple:
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def export_encoder_onnx(
  export_dir: str | os.PathLike,
  onnx_path: str | os.PathLike,
  graph: str = 'log_mel',
  batch: int = 2,
  opset: int = OPSET,
) -> OnnxExport:
  """Exports the model of an aasp-jax export folder to ONNX.

  Args:
    export_dir: the folder `aasp-export` / `exporter.export_checkpoint` wrote.
    onnx_path: the .onnx file to write.
    graph: 'log_mel' (the encoder, or a classifier's logits; dynamic batch and time) or
      'waveform' (front end + encoder + scene pooling of one window; dynamic batch).
    batch: batch size of the example the graph is traced with (the batch axis stays dynamic;
      torch.export needs it above 1 to keep it symbolic).
    opset: the opset asked of the TorchScript exporter (>= 17).
  """
  from aasp_jax.export.hf import aasp_torch

  if graph not in GRAPHS:
    raise ValueError(f'graph={graph!r}: choose one of {GRAPHS}.')
  config = aasp_torch.read_json(os.path.join(os.fspath(export_dir), aasp_torch.CONFIG))
  if config.get('id2label'):
    classifier = aasp_torch.AaSPClassifier.from_pretrained(export_dir)
    encoder = classifier.encoder
  else:
    classifier, encoder = None, aasp_torch.AaSPEncoder.from_pretrained(export_dir)
  opts = encoder.front_end.opts
  generator = torch.Generator().manual_seed(0)
  # The example's second clip holds 60% of the window: the mask is traced with padding in it.
  if graph == 'log_mel':
    module = LogitsGraph(classifier) if classifier is not None else LogMelGraph(encoder)
    x = torch.randn(batch, opts.target_length, opts.num_mel_bins, generator=generator)
    if classifier is not None:
      example, names = (x,), (['log_mel'], ['logits'])
    else:
      frames = torch.full((batch,), opts.target_length)
      frames[1:] = int(0.6 * opts.target_length)
      mask = (torch.arange(opts.target_length)[None] < frames[:, None]).to(torch.int32)
      example, names = (x, mask), (['log_mel', 'attention_mask'], ['scene', 'cls', 'tokens'])
    time_axis = (encoder.patch_t, encoder.max_time_patches)
  else:
    module = WaveformGraph(encoder)
    lengths = torch.full((batch,), opts.window_samples, dtype=torch.int64)
    lengths[1:] = int(0.6 * opts.window_samples)
    example = (0.1 * torch.randn(batch, opts.window_samples, generator=generator), lengths)
    time_axis = None
    names = (['waveform', 'num_samples'], ['scene', 'cls', 'tokens'])
  # TorchScript has no symbolic for the SBLU kernel's sinh: AaPE goes straight to dynamo.
  torchscript = encoder.model['stem'] != 'aape'
  exporter = export_onnx(module, example, onnx_path, *names, opset, time_axis, torchscript)
  max_frames = None if time_axis is None else time_axis[0] * time_axis[1]
  return OnnxExport(
    os.fspath(onnx_path),
    module,
    example,
    exporter,
    onnx_opset(onnx_path),
    max_frames=max_frames,
    frame_multiple=None if time_axis is None else time_axis[0],
  )


def check_inputs(done: OnnxExport) -> list[tuple]:
  """The inputs an export is held to: the traced example; for a graph with a dynamic time axis
  also half and twice its length (twice: the example repeated, a periodic input whose zero
  modulation bins are the hardest case for AaPE's Lambda encoder), with the masks following."""
  cases = [done.inputs]
  if done.max_frames is None:
    return cases
  x = done.inputs[0]
  half = max(done.frame_multiple, (x.shape[1] // 2) // done.frame_multiple * done.frame_multiple)
  lengths = [half] + ([2 * x.shape[1]] if 2 * x.shape[1] <= done.max_frames else [])
  for frames in lengths:
    reps = -(-frames // x.shape[1])
    case = [x.repeat(1, reps, 1)[:, :frames]]
    if len(done.inputs) > 1:  # the frame mask: each clip's frames, scaled to the new length
      valid = done.inputs[1].sum(dim=1) * frames // x.shape[1]
      case.append((torch.arange(frames)[None] < valid[:, None]).to(done.inputs[1].dtype))
    cases.append(tuple(case))
  return cases


def check_export(done: OnnxExport) -> float:
  """The largest `check_onnx` error of an export over `check_inputs`."""
  return max(check_onnx(done.path, done.module, inputs) for inputs in check_inputs(done))


def onnx_opset(onnx_path: str | os.PathLike) -> int:
  """The default-domain opset version the file declares."""
  import onnx

  model = onnx.load(os.fspath(onnx_path), load_external_data=False)
  versions = [o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')]
  if not versions:
    raise ValueError(f'{onnx_path}: declares no default-domain opset.')
  return max(versions)


def _outputs(value) -> list[np.ndarray]:
  if isinstance(value, dict):
    return [v.detach().numpy() for v in value.values()]
  if isinstance(value, (tuple, list)):
    return [v.detach().numpy() for v in value]
  return [value.detach().numpy()]


def check_onnx(onnx_path: str | os.PathLike, torch_module: nn.Module, inputs: tuple) -> float:
  """Runs the ONNX file with onnxruntime (CPU) and `torch_module` on `inputs`; returns the largest
  relative error over the outputs, each measured as max |onnx - torch| / max |torch|.

  A module returning a dict is matched to the graph's outputs by name, otherwise by position.
  """
  try:
    import onnxruntime
  except ImportError:
    raise ImportError(
      'check_onnx needs onnxruntime: pip install onnxruntime (CPU wheels are enough).'
    ) from None
  session = onnxruntime.InferenceSession(os.fspath(onnx_path), providers=['CPUExecutionProvider'])
  feeds = {
    spec.name: np.asarray(x.detach().numpy() if hasattr(x, 'detach') else x)
    for spec, x in zip(session.get_inputs(), inputs)
  }
  output_names = [o.name for o in session.get_outputs()]
  got = session.run(output_names, feeds)
  torch_module.eval()
  with torch.no_grad():
    value = torch_module(*[torch.as_tensor(x) for x in inputs])
  if isinstance(value, dict):
    missing = [n for n in output_names if n not in value]
    if missing:
      raise ValueError(f'{onnx_path}: outputs {missing} are not among the module outputs.')
    want = [value[n].detach().numpy() for n in output_names]
  else:
    want = _outputs(value)
  if len(want) != len(got):
    raise ValueError(f'{onnx_path}: {len(got)} outputs, but the module returns {len(want)}.')
  errors = []
  for name, a, b in zip(output_names, got, want):
    if a.shape != b.shape:
      raise ValueError(f'{onnx_path}: output {name!r} is {a.shape}, PyTorch gives {b.shape}.')
    scale = float(np.max(np.abs(b))) or 1.0
    errors.append(float(np.max(np.abs(a.astype(np.float64) - b))) / scale)
  return max(errors)
