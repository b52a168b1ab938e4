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


def _run_onnx(path, *inputs):
  session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
  names = [o.name for o in session.get_outputs()]
  feeds = {spec.name: value for spec, value in zip(session.get_inputs(), inputs)}
  return dict(zip(names, session.run(names, feeds)))


def _frame_mask(frames_b, num_frames):
  """int32 [B, T]: 1 for the first frames_b[i] frames of row i (the feature extractor's mask)."""
  return (np.arange(num_frames)[None] < np.asarray(frames_b)[:, None]).astype(np.int32)


def _jax_masked(encoder, params, x, mask):
  """JAX's (scene, cls, tokens) under the padding rule: time patches whose first frame is padding
  are masked as keys and left out of the scene's mean (aasp_jax/evaluate/embed.py)."""
  n_freq = x.shape[2] // 16
  valid = np.repeat(mask[:, ::16] != 0, n_freq, axis=1)
  out = encoder.apply({'params': params}, x, token_valid_bn=valid)
  w = valid[..., None].astype(np.float64)
  mean = (np.asarray(out['tokens'], np.float64) * w).sum(1) / w.sum(1)
  return np.concatenate([out['cls'], mean], axis=1), out['cls'], out['tokens']


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
  dims = {
    i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
    for i in model.graph.input
  }
  assert dims == {'log_mel': ['batch', 'frames', 128], 'attention_mask': ['batch', 'frames']}
  # Traced with batch 1 and the 64-frame window, run with other batches, lengths and masks.
  rng = np.random.default_rng(1)
  for batch, frames in ((3, 128), (1, 256), (2, 1024)):
    x = rng.standard_normal((batch, frames, 128)).astype(np.float32)
    mask = _frame_mask(rng.integers(1, frames + 1, batch), frames)
    inputs = (torch.from_numpy(x), torch.from_numpy(mask))
    assert onnx_export.check_onnx(path, done.module, inputs) < 1e-4, frames
  x, mask = x[:, :256], _frame_mask([256, 37], 256)  # a clip of 37 frames: 3 valid time patches
  got = _run_onnx(path, x, mask)
  scene, cls, tokens = _jax_masked(encoder, params, x, mask)
  assert got['tokens'].shape == (2, (256 // 16) * 8, 32)
  assert _rel_err(got['scene'], scene) < 1e-4
  assert _rel_err(got['cls'], cls) < 1e-4
  assert _rel_err(got['tokens'], tokens) < 1e-4
  # The short clip alone, cut to its own patches: the padding changed nothing.
  alone = _run_onnx(path, x[1:, :48], mask[1:, :48])
  assert _rel_err(alone['scene'], got['scene'][1:]) < 1e-5


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
  # The second clip cut to 40% of the window and zero-padded: its true length goes in.
  waves = np.stack([c[:window] for c in clips]).astype(np.float32)
  lengths = np.array([window, int(0.4 * window)], np.int64)
  waves[1, lengths[1] :] = 0.0
  inputs = (torch.from_numpy(waves), torch.from_numpy(lengths))
  assert onnx_export.check_onnx(path, done.module, inputs) < 1e-4
  got = _run_onnx(path, waves, lengths)
  with torch.no_grad():
    scene = encoder.embed(*inputs)['scene'].numpy()
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
  serves every input length, periodic inputs included."""
  folder, encoder, params = _export_folder(tmp_path, 'aape')
  path = str(tmp_path / 'aape.onnx')
  done = onnx_export.export_encoder_onnx(folder, path, batch=2)
  assert done.exporter == 'dynamo' and onnx_export.onnx_opset(path) >= 17
  # The dynamo exporter's stack traces (absolute paths of this machine) are dropped.
  assert os.path.dirname(onnx_export.__file__).encode() not in open(path, 'rb').read()
  rng = np.random.default_rng(2)
  for batch, frames in ((3, 128), (2, 1024)):
    x = rng.standard_normal((batch, frames, 128)).astype(np.float32)
    mask = _frame_mask(rng.integers(1, frames + 1, batch), frames)
    inputs = (torch.from_numpy(x), torch.from_numpy(mask))
    assert onnx_export.check_onnx(path, done.module, inputs) < 1e-5, frames
  # A periodic input: half its modulation bins are zero in exact arithmetic (the case that made
  # a trained AaPE model's graph fail its check at 2.8e-3).
  periodic = np.tile(x[:, :64], (1, 4, 1))
  inputs = (torch.from_numpy(periodic), torch.from_numpy(mask[:, :256]))
  assert onnx_export.check_onnx(path, done.module, inputs) < 1e-5
  x, mask = x[:, :TARGET_LENGTH], _frame_mask([TARGET_LENGTH, 20], TARGET_LENGTH)
  got = _run_onnx(path, x, mask)
  scene, _, tokens = _jax_masked(encoder, params, x, mask)
  assert _rel_err(got['tokens'], tokens) < 1e-5
  assert _rel_err(got['scene'], scene) < 1e-5
