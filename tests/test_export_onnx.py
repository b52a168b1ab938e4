"""ONNX export of the PyTorch encoder (aasp_jax/export/onnx_export.py), run with onnxruntime.

Export folders are written from randomly initialised tiny encoders whose parameters are all
perturbed (the AaPE gate starts at 0 and would otherwise hide the AaPE branch). The ONNX outputs
are compared with PyTorch (check_onnx) and, independently of the torch module, with the JAX
encoder on the same input.
"""

import os

import jax
import numpy as np
import pytest

pytest.importorskip('torch')
pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

import onnx  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402
from conftest import FIXTURES  # noqa: E402

from aasp_jax import configuration  # noqa: E402
from aasp_jax.audio import decode  # noqa: E402
from aasp_jax.evaluate import pretrained  # noqa: E402
from aasp_jax.export import exporter, onnx_export  # noqa: E402

TARGET_LENGTH = 64


def _export_folder(root, stem):
  """(export folder, flax encoder, params) of a perturbed random tiny encoder with `stem`."""
  config = configuration.load_config(
    f'configs/pretrain.py:variant=tiny,stem={stem},target_length={TARGET_LENGTH}',
    [
      'model.width=32',
      'model.depth=2',
      'model.num_heads=2',
      'model.mlp_dim=64',
      'model.aape.num_modes=2',
      'model.dtype=float32',
    ],
  )
  model = pretrained.random_encoder(config, seed=0)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32), model.params
  )
  out = os.path.join(str(root), stem)
  exporter.write_export(
    out, config.model, model.preset, params, which='random', step=0, source=model.source
  )
  return out, model.encoder, params


@pytest.fixture(scope='module')
def conv_export(tmp_path_factory):
  return _export_folder(tmp_path_factory.mktemp('onnx_conv'), 'conv')


def _run_onnx(path, x):
  session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
  names = [o.name for o in session.get_outputs()]
  return dict(zip(names, session.run(names, {session.get_inputs()[0].name: x})))


def _rel_err(got, want):
  want = np.asarray(want, np.float64)
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def test_log_mel_graph_matches_torch_and_jax_with_a_dynamic_batch_and_time(conv_export, tmp_path):
  folder, encoder, params = conv_export
  path = str(tmp_path / 'model.onnx')
  done = onnx_export.export_encoder_onnx(folder, path, batch=1)
  assert done.exporter == 'torchscript' and (done.frame_multiple, done.max_frames) == (16, 12000)
  model = onnx.load(path)
  onnx.checker.check_model(model)
  opsets = {o.domain: o.version for o in model.opset_import}
  assert opsets.get('', opsets.get('ai.onnx')) >= 17 and done.opset >= 17
  dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
  assert dims == ['batch', 'frames', 128]
  # Traced with batch 1 and the 64-frame window, run with other batches and lengths.
  rng = np.random.default_rng(1)
  for batch, frames in ((3, 128), (1, 256), (2, 1024)):
    x = rng.standard_normal((batch, frames, 128)).astype(np.float32)
    assert onnx_export.check_onnx(path, done.module, (torch.from_numpy(x),)) < 1e-4, frames
  got = _run_onnx(path, x[:, :256])
  want = encoder.apply({'params': params}, x[:, :256])
  assert got['tokens'].shape == (2, (256 // 16) * 8, 32)
  assert _rel_err(got['cls'], want['cls']) < 1e-4
  assert _rel_err(got['tokens'], want['tokens']) < 1e-4


def test_waveform_graph_matches_torch_and_the_scene_embedding(conv_export, tmp_path):
  folder, _, _ = conv_export
  path = str(tmp_path / 'waveform.onnx')
  done = onnx_export.export_encoder_onnx(folder, path, graph='waveform')
  encoder = done.module.encoder
  window = encoder.front_end.opts.window_samples
  clips = [
    decode.load_audio(os.path.join(FIXTURES, 'audio', name), 16000)
    for name in ('loop_amen.flac', 'guit_harmonics.flac')
  ]
  assert all(len(c) >= window for c in clips)
  waves = np.stack([c[:window] for c in clips]).astype(np.float32)
  assert onnx_export.check_onnx(path, done.module, (torch.from_numpy(waves),)) < 1e-4
  got = _run_onnx(path, waves)
  with torch.no_grad():
    scene = encoder.embed(torch.from_numpy(waves))['scene'].numpy()
  assert _rel_err(got['scene'], scene) < 1e-4


def test_check_onnx_reports_a_model_that_no_longer_matches(conv_export, tmp_path):
  folder, _, _ = conv_export
  path = str(tmp_path / 'model.onnx')
  done = onnx_export.export_encoder_onnx(folder, path)
  with torch.no_grad():
    done.module.encoder.norm.bias.add_(0.5)
  assert onnx_export.check_onnx(path, done.module, done.inputs) > 1e-2


def test_check_onnx_without_onnxruntime_says_what_to_install(conv_export, monkeypatch):
  monkeypatch.setitem(__import__('sys').modules, 'onnxruntime', None)
  with pytest.raises(ImportError, match='pip install onnxruntime'):
    onnx_export.check_onnx('unused.onnx', None, ())


@pytest.mark.slow  # ~17 s on 2 cores: the dynamo exporter traces through torch.export
def test_aape_encoder_exports_through_the_dynamo_exporter(tmp_path):
  """AaPE goes through the dynamo exporter (TorchScript has no symbolic for the SBLU kernel's
  sinh), with its modulation DFT and band pooling computed from the traced length: one graph
  serves every input length."""
  folder, encoder, params = _export_folder(tmp_path, 'aape')
  path = str(tmp_path / 'aape.onnx')
  done = onnx_export.export_encoder_onnx(folder, path, batch=2)
  assert done.exporter == 'dynamo' and onnx_export.onnx_opset(path) >= 17
  rng = np.random.default_rng(2)
  for batch, frames in ((3, 128), (2, 1024)):
    x = rng.standard_normal((batch, frames, 128)).astype(np.float32)
    assert onnx_export.check_onnx(path, done.module, (torch.from_numpy(x),)) < 1e-4, frames
  x = x[:, :TARGET_LENGTH]
  got = _run_onnx(path, x)
  want = encoder.apply({'params': params}, x)
  assert _rel_err(got['tokens'], want['tokens']) < 1e-4
