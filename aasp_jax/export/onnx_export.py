"""ONNX export of the PyTorch encoder of an export folder, and its check with onnxruntime.

  from aasp_jax.export import onnx_export
  done = onnx_export.export_encoder_onnx('exports/quickstart', 'model.onnx')
  error = onnx_export.check_onnx(done.path, done.module, done.inputs)  # max relative error

Two graphs can be written from `torch_model.AaSPEncoder`:
- 'log_mel' (what `aasp-export --onnx` writes): input `log_mel` float32 [batch, target_length, mel]
  (normalised, as `AaSPEncoder.features` returns it), outputs `cls` [batch, D] and `tokens`
  [batch, patches, D] (time-major), i.e. `AaSPEncoder.forward` without a padding mask;
- 'waveform': input `waveform` float32 [batch, samples] holding exactly one window
  (`window_samples` = the samples of target_length frames, e.g. 163,840 = 10.24 s at 16 kHz for
  1024 frames), outputs `scene` [batch, 2D] (CLS ++ mean token, `embed`'s 'cls_mean' pooling of a
  full window), `cls` and `tokens`. The Kaldi front end is matrix products in float64, so the
  graph needs no FFT operator. Shorter clips must be zero-padded by the caller, and then the
  padded frames count as audio (`AaSPEncoder.embed` masks them instead).

The batch axis is dynamic; the time axis is fixed at the window the model was trained with (the
position table is cropped to it when the graph is traced). The conv stem is exported with the
TorchScript exporter (`dynamo=False`) at opset 17, the first with LayerNormalization; the AaPE
stem needs the dynamo exporter (opset 18), which `export_onnx` falls back to.
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
  """log-mel [B, T, F] -> (cls [B, D], tokens [B, N, D]): ONNX outputs are tuples, not dicts."""

  def __init__(self, encoder: nn.Module):
    super().__init__()
    self.encoder = encoder

  def forward(self, log_mel_btf):
    out = self.encoder(log_mel_btf)
    return out['cls'], out['tokens']


class WaveformGraph(nn.Module):
  """One window of waveform [B, S] -> (scene [B, 2D], cls [B, D], tokens [B, N, D])."""

  def __init__(self, encoder: nn.Module):
    super().__init__()
    self.encoder = encoder

  def forward(self, waveform_bs):
    out = self.encoder(self.encoder.features(waveform_bs))
    scene = torch.cat([out['cls'], out['tokens'].mean(dim=1)], dim=-1)
    return scene, out['cls'], out['tokens']


_NAMES = {
  'log_mel': (['log_mel'], ['cls', 'tokens']),
  'waveform': (['waveform'], ['scene', 'cls', 'tokens']),
}


@dataclasses.dataclass(frozen=True)
class OnnxExport:
  """An ONNX file written by `export_encoder_onnx`, and what to check it against.

  Attributes:
    path: the .onnx file.
    module: the traced torch module (`LogMelGraph` or `WaveformGraph`).
    inputs: the example inputs it was traced with (`check_onnx(path, module, inputs)`).
    exporter: 'torchscript' or 'dynamo' (see `export_onnx`).
    opset: the default-domain opset of the file.
  """

  path: str
  module: nn.Module
  inputs: tuple
  exporter: str
  opset: int


def _torchscript_export(module, inputs, path, input_names, output_names, opset):
  dynamic = {name: {0: 'batch'} for name in (*input_names, *output_names)}
  with warnings.catch_warnings():
    # The tracer warns wherever a shape becomes a Python number (the position table is cropped to
    # the window, the front end pads to target_length): fixing the time axis is the intent here.
    warnings.simplefilter('ignore', torch.jit.TracerWarning)
    torch.onnx.export(
      module,
      tuple(inputs),
      path,
      input_names=input_names,
      output_names=output_names,
      dynamic_axes=dynamic,
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


def _dynamo_export(module, inputs, path, input_names, output_names, opset):
  batch = torch.export.Dim('batch')
  with _quiet_torchvision_registry():
    torch.onnx.export(
      module,
      tuple(inputs),
      path,
      input_names=input_names,
      output_names=output_names,
      dynamic_shapes=tuple({0: batch} for _ in inputs),
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
) -> str:
  """Writes `module` traced on `inputs` to `onnx_path` with a dynamic batch axis.

  The TorchScript exporter (`dynamo=False`, fast, opset `opset`) is tried first. The AaPE stem
  does not go through it (it has no ONNX symbolic for `sinh`), so where it fails the dynamo
  exporter (torch.export + onnxscript, opset >= 18, slower) writes the file instead. One file with
  the weights inside, written under a temporary name and renamed into place.

  Returns:
    'torchscript' or 'dynamo': the exporter that wrote the file.
  """
  if opset < OPSET:
    raise ValueError(f'opset {opset}: the encoder needs opset >= {OPSET} (LayerNormalization).')
  onnx_path = os.fspath(onnx_path)
  partial = onnx_path + '.partial'
  module.eval()
  try:
    with torch.no_grad():
      _torchscript_export(module, inputs, partial, input_names, output_names, opset)
    exporter = 'torchscript'
  except Exception as torchscript_error:  # noqa: BLE001
    # Any failure of the tracer or of its symbolic registry: the other exporter may still
    # succeed, and if it does not, both errors are reported.
    log.info('TorchScript ONNX export failed (%s); using the dynamo exporter.', torchscript_error)
    try:
      with torch.no_grad():
        _dynamo_export(module, inputs, partial, input_names, output_names, opset)
    except Exception as dynamo_error:
      if os.path.exists(partial):
        os.remove(partial)
      raise ValueError(
        f'{onnx_path}: neither ONNX exporter could export the model. TorchScript: '
        f'{torchscript_error!r}; dynamo: {dynamo_error!r}'
      ) from dynamo_error
    exporter = 'dynamo'
  os.replace(partial, onnx_path)
  return exporter


def export_encoder_onnx(
  export_dir: str | os.PathLike,
  onnx_path: str | os.PathLike,
  graph: str = 'log_mel',
  batch: int = 1,
  opset: int = OPSET,
) -> OnnxExport:
  """Exports the encoder of an aasp-jax export folder to ONNX.

  Args:
    export_dir: the folder `aasp-export` / `exporter.export_checkpoint` wrote.
    onnx_path: the .onnx file to write.
    graph: 'log_mel' (encoder only) or 'waveform' (front end + encoder + scene pooling).
    batch: batch size of the example the graph is traced with (the batch axis stays dynamic).
    opset: the opset asked of the TorchScript exporter (>= 17).
  """
  from aasp_jax.export import torch_model

  if graph not in GRAPHS:
    raise ValueError(f'graph={graph!r}: choose one of {GRAPHS}.')
  encoder = torch_model.AaSPEncoder.from_pretrained(export_dir)
  opts = encoder.front_end.opts
  generator = torch.Generator().manual_seed(0)
  if graph == 'log_mel':
    module = LogMelGraph(encoder)
    example = (torch.randn(batch, opts.target_length, opts.num_mel_bins, generator=generator),)
  else:
    module = WaveformGraph(encoder)
    example = (0.1 * torch.randn(batch, opts.window_samples, generator=generator),)
  input_names, output_names = _NAMES[graph]
  exporter = export_onnx(module, example, onnx_path, input_names, output_names, opset)
  return OnnxExport(os.fspath(onnx_path), module, example, exporter, onnx_opset(onnx_path))


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
