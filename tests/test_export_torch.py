"""Export of AaSP encoders (aasp_jax.export): safetensors files, the export folder's PyTorch layout,
the JAX re-import, and the PyTorch module's (aasp_jax/export/hf/aasp_torch.py) parity with JAX, on
the real tiny checkpoints (width 32, depth 2, 64-frame windows) and real audio. The Hugging Face
side of the folder (transformers, no JAX installed, ONNX) is tests/test_export_hf.py.

Relative error, everywhere below: max|torch - jax| / max|jax|, over the whole compared array, in
float64; the design's bar (section 7) is 1e-4 in float32. The 2-step checkpoints still have AaPE's
fusion gate at ~0 (it starts at 0) and its Lambda encoder's output layer at ~0 (zero-initialised),
which would hide the whole AaPE branch from a parity test, so the AaPE model compared here has those
and the other AaPE parameters set to random, non-trivial values, in both frameworks (the same
exported arrays), and a test checks that the branch moves the outputs far beyond the tolerance.
"""

import copy
import dataclasses
import functools
import json
import os
import pickle
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
import eval_checkpoints
from conftest import FIXTURES, REPO_ROOT

from aasp_jax import configuration
from aasp_jax.audio import fbank_device, fbank_host
from aasp_jax.audio import presets as presets_lib
from aasp_jax.data import clips
from aasp_jax.evaluate import embed, pretrained
from aasp_jax.export import exporter, safetensors_io
from aasp_jax.export.hf import aasp_torch
from aasp_jax.export.safetensors_io import ExportFormatError
from aasp_jax.models import build, vit
from configs import pretrain

TOLERANCE = 1e-4
AUDIO = os.path.join(FIXTURES, 'audio')
SONICPI = os.path.join(REPO_ROOT, 'data', 'sonicpi', 'audio')
# At 16 kHz with 64-frame windows: loop_amen 1.75 s (173 frames, 3 windows), hat_len 0.86 s (84
# frames, 2 windows, the second mostly padding), perc_swash 0.32 s (30 frames) and hat_raw 0.21 s
# (19 frames) are shorter than a window, elec_pop 0.087 s (7 frames) fills part of one patch.
CLIPS = (
  os.path.join(AUDIO, 'loop_amen.flac'),
  os.path.join(SONICPI, 'hat_len.flac'),
  os.path.join(AUDIO, 'perc_swash.flac'),
  os.path.join(AUDIO, 'hat_raw.flac'),
  os.path.join(SONICPI, 'elec_pop.flac'),
)


def rel_err(got, want) -> float:
  """max|got - want| / max|want| (float64; NaNs, i.e. padded timestamps, must coincide)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  return float(np.nanmax(np.abs(got - want)) / np.nanmax(np.abs(want)))


def tiny_config(stem='aape', **model_overrides):
  """The tiny checkpoints' config (tests/program_runner.py TINY_FLAGS), built in-process."""
  cfg = pretrain.get_config(f'variant=tiny,target_length=64,stem={stem}')
  m = cfg.model
  m.dtype, m.depth, m.width, m.num_heads, m.mlp_dim = 'float32', 2, 32, 2, 64
  m.aape.num_modes = 2
  for key, value in model_overrides.items():
    if key in m.aape:
      m.aape[key] = value
    else:
      m[key] = value
  return cfg


def padded_batch(arrays):
  out = np.zeros((len(arrays), max(map(len, arrays))), np.float32)
  for i, a in enumerate(arrays):
    out[i, : len(a)] = a
  return out, np.array([len(a) for a in arrays])


def jax_encode(model, x_btf, valid_bn):
  """The JAX encoder's outputs, plus what its stem sows ('intermediates', AaPE only)."""
  apply = functools.partial(model.encoder.apply, mutable=['intermediates'])
  out, state = jax.jit(apply)(
    {'params': model.params}, jnp.asarray(x_btf), token_valid_bn=jnp.asarray(valid_bn)
  )
  out = jax.tree.map(np.asarray, out)
  out['sown'] = jax.tree.map(np.asarray, state.get('intermediates', {}).get('stem', {}))
  return out


def assert_aape_branch_matches(sown, module, x_btf):
  """AaPE's sown intermediates (Lambda, envelope features) equal the PyTorch branch's to 5e-5.

  Their float32 noise is ~1e-5 (the Lambda encoder's LayerNorm divides log-magnitudes that carry
  ~2e-6 of float32 error, in JAX as in PyTorch, by their spread of ~0.2), while a slip inside the
  branch, e.g. the exact GELU instead of flax's tanh one in the Lambda MLP, moves them by >1.5e-4
  yet can stay under the end-to-end tolerance.
  """
  with torch.no_grad():
    got = module.stem.analyse(torch.from_numpy(np.array(x_btf)))
  errors = {n: rel_err(v.numpy(), sown[n][0]) for n, v in zip(('alpha', 'omega', 'features'), got)}
  print(f'AaPE branch relative errors: {errors}')
  assert max(errors.values()) < 5e-5, errors


def torch_encode(module, x_btf, valid_bn):
  with torch.no_grad():
    out = module(torch.from_numpy(np.array(x_btf)), torch.from_numpy(np.array(valid_bn)))
  return {k: v.numpy() for k, v in out.items()}


@pytest.fixture(scope='module')
def audio():
  """(waveforms [5, S] zero-padded, true lengths [5]) of real clips of mixed lengths."""
  return padded_batch([clips.load_clip(path, 16000, min_samples=400)[0] for path in CLIPS])


@pytest.fixture(scope='module')
def exports(tiny_checkpoints, tmp_path_factory):
  """{stem: (the JAX Pretrained, its export folder, the PyTorch module)}.

  conv: the checkpoint through `export_checkpoint`. aape: the checkpoint with
  `eval_checkpoints.every_branch_active` applied, written by `write_export`, and the same
  perturbed params on the JAX side.
  """
  root = tmp_path_factory.mktemp('exports')
  out = {}
  conv = pretrained.load_pretrained(tiny_checkpoints['conv'])
  exporter.export_checkpoint(tiny_checkpoints['conv'], root / 'conv')
  aape = pretrained.load_pretrained(tiny_checkpoints['aape'])
  aape = dataclasses.replace(aape, params=eval_checkpoints.every_branch_active(aape.params))
  exporter.write_export(
    root / 'aape',
    aape.config.model,
    aape.preset,
    aape.params,
    which=aape.which,
    step=aape.step,
    source=aape.source,
  )
  for stem, model in (('conv', conv), ('aape', aape)):
    out[stem] = (model, str(root / stem), aasp_torch.AaSPEncoder.from_pretrained(root / stem))
  return out


# ----------------------------------------------------------------------------------------------
# safetensors_io against the reference implementation
# ----------------------------------------------------------------------------------------------


def sample_tensors():
  rng = np.random.default_rng(3)
  return {
    'a.kernel': rng.standard_normal((3, 5)).astype(np.float32),
    'b': rng.standard_normal(7),  # float64
    'c.scalar': np.float32(2.5) * np.ones((), np.float32),
    'd.empty': np.zeros((0, 4), np.float32),
    'e.int': np.arange(-6, 6, dtype=np.int64).reshape(3, 4),
    'f.bytes': np.arange(9, dtype=np.uint8),
    'g.mask': np.array([True, False, True]),
    'h.half': rng.standard_normal(4).astype(np.float16),
    'i.transposed': rng.standard_normal((4, 3)).astype(np.float32).T,  # not C-contiguous
    'j.big_endian': np.arange(5, dtype='>i4'),
  }


def test_safetensors_files_round_trip_through_the_reference_implementation(tmp_path):
  tensors, meta = sample_tensors(), {'format': 'x', 'note': 'ünïcode'}
  ours = tmp_path / 'ours.safetensors'
  safetensors_io.save(ours, tensors, meta)
  read_by_reference = safetensors.numpy.load_file(ours)
  with safetensors.safe_open(ours, framework='np') as f:
    assert f.metadata() == meta
  theirs = tmp_path / 'theirs.safetensors'
  safetensors.numpy.save_file(
    {k: np.array(v, order='C') for k, v in tensors.items()}, theirs, metadata=meta
  )
  read_by_us, read_meta = safetensors_io.load(theirs)
  assert read_meta == meta
  for got in (read_by_reference, read_by_us):
    assert sorted(got) == sorted(tensors)
    for name, want in tensors.items():
      assert got[name].shape == want.shape and got[name].dtype == want.dtype.newbyteorder('=')
      np.testing.assert_array_equal(got[name], want)
  assert all(a.flags.writeable for a in read_by_us.values())
  assert safetensors_io.load(ours)[1] == meta


def _raw(header, data: bytes, length=None) -> bytes:
  text = json.dumps(header).encode()
  return (len(text) if length is None else length).to_bytes(8, 'little') + text + data


def _entry(dtype, shape, begin, end):
  return {'dtype': dtype, 'shape': shape, 'data_offsets': [begin, end]}


CORRUPT = {
  'header_past_end': (_raw({}, b'', length=10**6), 'header length'),
  'too_short': (b'\x01\x02', 'too short'),
  'bad_json': ((9).to_bytes(8, 'little') + b'{not json', 'not valid UTF-8 JSON'),
  'unknown_dtype': (_raw({'w': _entry('Q8', [2], 0, 2)}, b'ab'), "unknown dtype 'Q8'"),
  'bytes_not_shape': (_raw({'w': _entry('F32', [3], 0, 8)}, bytes(8)), 'i.e. 12 bytes'),
  'past_the_data': (_raw({'w': _entry('F32', [4], 0, 16)}, bytes(8)), 'truncated'),
  'overlap': (
    _raw({'w': _entry('F32', [2], 0, 8), 'v': _entry('F32', [2], 4, 12)}, bytes(12)),
    'overlap',
  ),
  'gap': (
    _raw({'w': _entry('F32', [1], 0, 4), 'v': _entry('F32', [1], 8, 12)}, bytes(12)),
    'belong to no tensor',
  ),
  'trailing_bytes': (_raw({'w': _entry('F32', [1], 0, 4)}, bytes(8)), 'cover only 4'),
  'metadata_not_strings': (
    _raw({'__metadata__': {'a': 1}, 'w': _entry('F32', [1], 0, 4)}, bytes(4)),
    '__metadata__',
  ),
}


@pytest.mark.parametrize('case', sorted(CORRUPT))
def test_corrupt_safetensors_files_fail_clearly(tmp_path, case):
  blob, problem = CORRUPT[case]
  path = tmp_path / f'{case}.safetensors'
  path.write_bytes(blob)
  # The reference rejects it too: the file really is invalid.
  with pytest.raises(safetensors.SafetensorError):
    safetensors.numpy.load_file(path)
  with pytest.raises(ExportFormatError, match=problem) as info:
    safetensors_io.load(path)
  assert str(path) in str(info.value)


def test_truncated_and_duplicate_key_files_fail_clearly(tmp_path):
  path = tmp_path / 'w.safetensors'
  safetensors_io.save(path, {'w': np.ones((8, 8), np.float32)})
  path.write_bytes(path.read_bytes()[:-5])
  with pytest.raises(ExportFormatError, match=r"tensor 'w' needs data bytes .* truncated"):
    safetensors_io.load(path)
  # The reference keeps one of two duplicate entries silently; we refuse the ambiguous file.
  text = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":' + text_entry() + b'}'
  path.write_bytes(len(text).to_bytes(8, 'little') + text + bytes(4))
  with pytest.raises(ExportFormatError, match="duplicate key 'w'"):
    safetensors_io.load(path)


def text_entry() -> bytes:
  return json.dumps(_entry('F32', [1], 0, 4)).encode()


# ----------------------------------------------------------------------------------------------
# The export folder
# ----------------------------------------------------------------------------------------------


def test_export_folder_holds_the_checkpoint_exactly_and_no_pickle(
  exports, tiny_checkpoints, tmp_path
):
  result = exporter.export_checkpoint(tiny_checkpoints['aape'], tmp_path / 'plain', which='student')
  folder = tmp_path / 'plain'
  assert sorted(os.listdir(folder)) == sorted(exporter.FILES)  # no stray / partial files
  assert result.files == {n: os.path.getsize(folder / n) for n in exporter.FILES}
  assert (result.which, result.step) == ('student', 2) and result.seconds > 0
  config = json.loads((folder / 'config.json').read_text())
  student = pretrained.load_pretrained(tiny_checkpoints['aape'], which='student')
  assert config['model'] == student.config.model.to_dict()
  assert (config['format'], config['format_version'], config['layout']) == (
    'aasp-jax-export',
    2,
    'pytorch',
  )
  assert (config['model_type'], config['architectures']) == ('aasp', ['AaSPModel'])
  # The run's name and the training data's, never a path of this machine.
  assert (config['which'], config['step'], config['source'], config['data']) == (
    'student',
    2,
    'tiny_aape',
    'fixtures/audio',
  )
  assert presets_lib.FrontEndPreset.from_dict(config['frontend']) == student.preset
  preprocessor = json.loads((folder / 'preprocessor_config.json').read_text())
  assert (preprocessor['sampling_rate'], preprocessor['feature_size']) == (16000, 128)
  assert 'sample_rate' not in preprocessor
  tensors, metadata = safetensors_io.load(folder / 'model.safetensors')
  assert metadata == {'format': 'pt'}
  # Named and shaped as the PyTorch module's state dict, under 'encoder.'.
  module = aasp_torch.AaSPEncoder(config['model'], config['frontend'])
  state = {f'encoder.{k}': tuple(v.shape) for k, v in module.state_dict().items()}
  assert {k: v.shape for k, v in tensors.items()} == state
  assert {k: tuple(v) for k, v in config['tensors'].items()} == state
  flat = exporter.flatten_params(student.params)
  for torch_name, native, layout in (
    ('encoder.blocks.1.attn.query.weight', 'blocks_1.attn.query.kernel', (1, 0)),
    ('encoder.stem.conv_stem.proj.weight', 'stem.conv_stem.proj.kernel', (3, 2, 0, 1)),
    ('encoder.norm.weight', 'norm.scale', (0,)),
    ('encoder.cls', 'cls', (0, 1, 2)),
  ):
    assert tensors[torch_name].dtype == np.float32
    np.testing.assert_array_equal(tensors[torch_name], flat[native].transpose(layout))
  # And back to the flax layout, bit for bit.
  _, preset, native = exporter.load_export(folder)
  assert presets_lib.FrontEndPreset.from_dict(preset) == student.preset
  assert sorted(native) == sorted(flat)
  for name, array in flat.items():
    assert native[name].dtype == np.float32
    np.testing.assert_array_equal(native[name], array)
  # Everything is JSON, text, Python or safetensors: the weights file is exactly header + tensor
  # bytes, so there is no room for a pickle, and nothing is unpickled when the folder is read.
  header, _, start = safetensors_io.read_header(folder / 'model.safetensors')
  data_bytes = sum(e['data_offsets'][1] - e['data_offsets'][0] for e in header.values())
  assert os.path.getsize(folder / 'model.safetensors') == start + data_bytes
  for name in ('config.json', 'preprocessor_config.json', 'README.md', *exporter.CODE_FILES):
    (folder / name).read_bytes().decode('utf-8')
  card = (folder / 'README.md').read_text()
  assert 'AaSPEncoder.from_pretrained' in card and 'student encoder of step 2' in card
  assert 'trust_remote_code=True' in card and 'model.onnx' in card  # how to add it


def test_reading_an_export_never_unpickles(exports, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('pickle used')

  for name in ('load', 'loads', 'Unpickler'):
    monkeypatch.setattr(pickle, name, refuse)
  monkeypatch.setattr(torch, 'load', refuse)
  _, folder, _ = exports['conv']
  exporter.load_export(folder)
  aasp_torch.AaSPEncoder.from_pretrained(folder)


def test_jax_export_jax_is_bit_identical(exports):
  for stem in ('conv', 'aape'):
    model, folder, _ = exports[stem]
    params = exporter.params_from_export(folder)
    assert jax.tree.structure(params) == jax.tree.structure(model.params)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(model.params)):
      assert got.dtype == want.dtype and got.shape == want.shape
      np.testing.assert_array_equal(got, want)
    # The exported config rebuilds the same module (flax modules compare by their fields) and
    # front end: with bit-identical params, the same function.
    encoder, params, preset = exporter.encoder_from_export(folder)
    assert encoder == model.encoder and preset == model.preset


# ----------------------------------------------------------------------------------------------
# PyTorch parity
# ----------------------------------------------------------------------------------------------


def window_batch(audio, preset):
  """One window per clip (the first), zero-padded: ([5, window samples], true lengths [5])."""
  waves, lengths = audio
  samples = preset.window_length + (preset.target_length - 1) * preset.frame_shift
  windows = np.zeros((len(waves), samples), np.float32)
  windows[:, : min(samples, waves.shape[1])] = waves[:, :samples]
  return windows, np.minimum(lengths, samples)


@pytest.mark.parametrize('preset_name', ['eat_audiomae', 'beats'])
def test_front_end_matches_jax(exports, audio, preset_name):
  preset = presets_lib.get_preset(preset_name, target_length=64)
  windows, valid = window_batch(audio, preset)
  want = np.asarray(fbank_device.features(jnp.asarray(windows), preset, jnp.asarray(valid)))
  front_end = aasp_torch.LogMelFrontEnd(dataclasses.asdict(preset))
  got = front_end(torch.from_numpy(windows), torch.from_numpy(valid)).numpy()
  assert got.dtype == np.float32
  assert rel_err(got, want) < 1e-5
  # Padded frames sit at the normalised zero, as in training.
  assert np.all(got[-1, preset.num_frames(int(valid[-1])) :] == want[-1, -1])
  # And each clip alone equals the host (float64) path on the unpadded clip.
  for i in (0, 3):
    host = fbank_host.features(windows[i, : valid[i]], preset)
    assert rel_err(got[i], host) < 1e-5
  # The exported module's front end is this one, with the checkpoint's preset.
  _, _, module = exports['conv']
  np.testing.assert_array_equal(
    module.features(torch.from_numpy(windows), torch.from_numpy(valid)).numpy(),
    aasp_torch.LogMelFrontEnd(module.preset)(torch.from_numpy(windows), torch.from_numpy(valid)),
  )


@pytest.mark.parametrize('stem', ['conv', 'aape'])
def test_encoder_outputs_match_jax(exports, audio, stem):
  model, _, module = exports[stem]
  windows, valid = window_batch(audio, model.preset)
  x = np.asarray(fbank_device.features(jnp.asarray(windows), model.preset, jnp.asarray(valid)))
  token_valid = module.token_valid(torch.from_numpy(valid)).numpy()
  assert not token_valid.all() and token_valid.any(axis=1).all()  # padding is really masked
  want = jax_encode(model, x, token_valid)
  got = torch_encode(module, x, token_valid)
  errors = {key: rel_err(got[key], want[key]) for key in ('cls', 'tokens')}
  print(f'{stem} encoder relative errors: {errors}')
  assert max(errors.values()) < TOLERANCE, errors
  if stem == 'aape':
    assert_aape_branch_matches(want['sown'], module, x)


@pytest.mark.parametrize('stem', ['conv', 'aape'])
def test_scene_and_frame_embeddings_match_the_embedder(exports, audio, stem):
  model, _, module = exports[stem]
  waves, lengths = audio
  embedder = embed.Embedder(model)
  scene = embedder.scene_embeddings(waves, lengths)
  frames, times = embedder.timestamp_embeddings(waves, lengths)
  got = module.embed(torch.from_numpy(waves), torch.from_numpy(lengths))
  assert got['scene'].shape == (5, 64) and got['frames'].shape == frames.shape
  np.testing.assert_allclose(got['timestamps_ms'].numpy(), times, rtol=0, atol=1e-3)
  errors = {
    'scene': rel_err(got['scene'].numpy(), scene),
    'frames': rel_err(got['frames'].numpy(), frames),
  }
  print(f'{stem} embedding relative errors: {errors}')
  assert max(errors.values()) < TOLERANCE, errors
  # A clip gives the same embeddings alone as in the mixed batch (padding handled per clip).
  alone = module.embed(torch.from_numpy(waves[3:4, : lengths[3]]))
  np.testing.assert_allclose(alone['scene'].numpy()[0], got['scene'].numpy()[3], atol=1e-5)


def test_the_aape_branch_is_really_compared(exports, audio):
  """Without its AaPE branch (gate 0) or with a constant Lambda (zero output kernel), the AaPE
  model's embeddings move by far more than the parity tolerance."""
  _, _, module = exports['aape']
  waves, lengths = audio
  full = module.embed(torch.from_numpy(waves), torch.from_numpy(lengths))['scene'].numpy()
  for name in ('stem.gate', 'stem.lambda_encoder.out.weight'):
    ablated = copy.deepcopy(module)
    with torch.no_grad():
      ablated.get_parameter(name).zero_()
    scene = ablated.embed(torch.from_numpy(waves), torch.from_numpy(lengths))['scene'].numpy()
    assert rel_err(scene, full) > 100 * TOLERANCE, name


AAPE_OPTIONS = [
  {'fusion': 'concat', 'learn_delta': True, 'delta': 0.7, 'posemb': 'sincos_mae'},
  {'lambda_mode': 'fixed', 'window': 'one_sided', 'phase': 'literal', 'kernel_size': 15},
]


@pytest.mark.parametrize('options', AAPE_OPTIONS, ids=lambda o: ','.join(map(str, o.values())))
def test_every_aape_option_matches_jax(audio, tmp_path, options):
  model = pretrained.random_encoder(tiny_config('aape', **options), seed=1)
  perturbed = eval_checkpoints.every_branch_active(model.params, seed=2)
  model = dataclasses.replace(model, params=perturbed)
  exporter.write_export(
    tmp_path, model.config.model, model.preset, model.params, which='random', step=0, source='r'
  )
  module = aasp_torch.AaSPEncoder.from_pretrained(tmp_path)
  windows, valid = window_batch(audio, model.preset)
  x = np.asarray(fbank_device.features(jnp.asarray(windows), model.preset, jnp.asarray(valid)))
  token_valid = module.token_valid(torch.from_numpy(valid)).numpy()
  want, got = jax_encode(model, x, token_valid), torch_encode(module, x, token_valid)
  assert max(rel_err(got[k], want[k]) for k in ('cls', 'tokens')) < TOLERANCE
  assert_aape_branch_matches(want['sown'], module, x)


def test_encoder_options_match_jax(audio, tmp_path):
  """The encoder options shared with JAX (model.posemb, block_norm, norm_eps; 'sincos_mae' is in
  AAPE_OPTIONS), on masked real audio in a 128-frame input (twice the window: the position table
  is cropped further)."""
  options = {'posemb': 'learned', 'block_norm': 'post', 'norm_eps': 1e-5}
  cfg = tiny_config('conv', **options)
  model = pretrained.random_encoder(cfg, seed=3)
  rng = np.random.default_rng(3)
  params = jax.tree.map(
    lambda a: (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32), model.params
  )
  model = dataclasses.replace(model, params=params)
  exporter.write_export(
    tmp_path, cfg.model, model.preset, params, which='random', step=0, source='options'
  )
  module = aasp_torch.AaSPEncoder.from_pretrained(tmp_path)
  state = module.state_dict()
  assert 'input_norm.weight' in state and 'norm.weight' not in state
  assert state['posemb'].shape == (750, 8, 32)
  assert module.blocks[0].norm1.eps == module.input_norm.eps == 1e-5
  windows, valid = window_batch(audio, model.preset)
  x = np.asarray(fbank_device.features(jnp.asarray(windows), model.preset, jnp.asarray(valid)))
  token_valid = module.token_valid(torch.from_numpy(valid)).numpy()
  # Each clip's window, then another clip's: 128 frames, the first window's padding masked.
  x2 = np.concatenate([x, x[::-1]], axis=1)
  valid2 = np.concatenate([token_valid, np.ones_like(token_valid)], axis=1)
  want, got = jax_encode(model, x2, valid2), torch_encode(module, x2, valid2)
  errors = {k: rel_err(got[k], want[k]) for k in ('cls', 'tokens')}
  print(f'{options} relative errors: {errors}')
  assert max(errors.values()) < TOLERANCE, errors


def test_scanned_layer_models_export_unrolled(audio, tmp_path):
  cfg = tiny_config('conv', scan_layers=True)
  encoder = build.build_encoder(cfg.model)
  preset = configuration.frontend_preset(cfg)
  shape = configuration.input_shape(cfg)
  params = jax.jit(lambda r: encoder.init(r, jnp.zeros(shape))['params'])(jax.random.key(4))
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  assert params['blocks']['attn']['query']['kernel'].shape == (2, 32, 32)
  exporter.write_export(tmp_path, cfg.model, preset, params, which='random', step=0, source='s')
  config, _, tensors = exporter.load_export(tmp_path)
  assert config['model']['scan_layers'] is False and 'blocks_1.attn.query.kernel' in tensors
  stacked = vit.stack_blocks(exporter.params_from_export(tmp_path), cfg.model.depth)
  assert jax.tree.structure(stacked) == jax.tree.structure(params)
  for got, want in zip(jax.tree.leaves(stacked), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), want)
  windows, valid = window_batch(audio, preset)
  x = np.asarray(fbank_device.features(jnp.asarray(windows), preset, jnp.asarray(valid)))
  module = aasp_torch.AaSPEncoder.from_pretrained(tmp_path)
  token_valid = module.token_valid(torch.from_numpy(valid)).numpy()
  scanned = pretrained.Pretrained(cfg, encoder, params, preset, 0, 's', 'random')
  want, got = jax_encode(scanned, x, token_valid), torch_encode(module, x, token_valid)
  assert max(rel_err(got[k], want[k]) for k in ('cls', 'tokens')) < TOLERANCE


# ----------------------------------------------------------------------------------------------
# Bad export folders
# ----------------------------------------------------------------------------------------------


def both_loaders(folder):
  """Runs both readers; returns their error messages (each must raise)."""
  messages = []
  for load in (exporter.load_export, aasp_torch.AaSPEncoder.from_pretrained):
    with pytest.raises(ValueError) as info:
      load(folder)
    messages.append(str(info.value))
  return messages


def rewrite_weights(folder, edit):
  path = os.path.join(folder, 'model.safetensors')
  tensors, metadata = safetensors_io.load(path)
  edit(tensors)
  safetensors_io.save(path, tensors, metadata)


def edit_config(folder, edit):
  path = os.path.join(folder, 'config.json')
  with open(path) as f:
    config = json.load(f)
  edit(config)
  with open(path, 'w') as f:
    json.dump(config, f)


@pytest.fixture
def broken(exports, tmp_path):
  """A fresh copy of the AaPE export folder to damage."""
  folder = str(tmp_path / 'broken')
  shutil.copytree(exports['aape'][1], folder)
  return folder


def test_corrupted_or_truncated_weights_name_the_file(broken):
  path = os.path.join(broken, 'model.safetensors')
  with open(path, 'rb') as f:
    blob = f.read()
  with open(path, 'wb') as f:
    f.write(blob[:-100])
  for message in both_loaders(broken):
    assert path in message and 'truncated' in message
  with open(path, 'wb') as f:
    f.write((2**40).to_bytes(8, 'little') + blob[8:])
  for message in both_loaders(broken):
    assert path in message and 'header length' in message


def test_a_tensor_of_the_wrong_shape_is_named_with_its_expected_shape(broken):
  rewrite_weights(broken, lambda t: t.update({'encoder.norm.weight': np.ones(33, np.float32)}))
  for message in both_loaders(broken):
    assert "'encoder.norm.weight'" in message and '[33]' in message
    assert 'expected shape [32]' in message
    assert os.path.join(broken, 'model.safetensors') in message


def test_a_missing_or_extra_tensor_is_named(broken):
  rewrite_weights(broken, lambda t: t.pop('encoder.blocks.1.mlp.fc2.bias'))
  for message in both_loaders(broken):
    assert "'encoder.blocks.1.mlp.fc2.bias'" in message and 'expected shape [32]' in message
    assert 'missing' in message
  rewrite_weights(
    broken, lambda t: t.update({'encoder.blocks.1.mlp.fc2.bias': np.zeros(32, np.float32)})
  )
  rewrite_weights(broken, lambda t: t.update({'extra.weight': np.zeros(3, np.float32)}))
  for message in both_loaders(broken):
    assert "'extra.weight'" in message and 'not one' in message


def test_a_config_that_disagrees_with_its_model_section_is_caught(broken):
  # File and config agree with each other, but not with the architecture the model implies.
  rewrite_weights(broken, lambda t: t.update({'encoder.stem.gate': np.ones(33, np.float32)}))
  edit_config(broken, lambda c: c['tensors'].update({'encoder.stem.gate': [33]}))
  for message in both_loaders(broken):
    assert "'encoder.stem.gate'" in message and 'expected shape [32]' in message
    assert "'model' section" in message


def test_unsupported_options_name_the_config_field(broken):
  edit_config(broken, lambda c: c['model']['aape'].update(new_knob=3))
  with pytest.raises(ValueError, match='model.aape.new_knob'):
    aasp_torch.AaSPEncoder.from_pretrained(broken)
  edit_config(broken, lambda c: c['model']['aape'].pop('new_knob'))
  edit_config(broken, lambda c: c['model']['aape'].update(window='cosine'))
  with pytest.raises(ValueError, match="model.aape.window='cosine'"):
    aasp_torch.AaSPEncoder.from_pretrained(broken)
  with pytest.raises(ExportFormatError, match='window'):
    exporter.load_export(broken)


def test_a_front_end_that_disagrees_with_the_feature_extractor_is_named(broken):
  path = os.path.join(broken, 'preprocessor_config.json')
  with open(path) as f:
    preprocessor = json.load(f)
  preprocessor['sampling_rate'] = 22050
  with open(path, 'w') as f:
    json.dump(preprocessor, f)
  with pytest.raises(ExportFormatError, match="sampling_rate is 22050, but config.json's"):
    exporter.load_export(broken)


def test_an_export_of_an_older_format_asks_for_a_new_export(broken):
  edit_config(broken, lambda c: c.update(format_version=1))
  for message in both_loaders(broken):
    assert 'format_version 1' in message and 'export the checkpoint again' in message
  # aasp-jax 0.1's folders (flax layout) say so too.
  edit_config(broken, lambda c: c.update(format='aasp-jax-encoder', layout='native'))
  for message in both_loaders(broken):
    assert "'aasp-jax-encoder'" in message and 'export the checkpoint again' in message


def test_the_exporter_agrees_with_the_exported_module_on_the_format():
  """The exporter (which cannot import torch) and aasp_torch agree on the folder's format."""
  for name in ('FORMAT', 'FORMAT_VERSION', 'LAYOUT', 'WEIGHTS', 'CONFIG', 'PREPROCESSOR'):
    assert getattr(exporter, name) == getattr(aasp_torch, name), name
  assert exporter.ENCODER_PREFIX == aasp_torch.ENCODER_PREFIX
  assert exporter.HEAD_PREFIX == aasp_torch.HEAD_PREFIX


def test_clips_of_0_2_to_6_s_at_a_2_56_s_window_give_the_hear_embeddings(tmp_path):
  """Issue 23's acceptance at a real window (256 frames, 2.56 s): real clips of 0.2, 0.9, 2.56,
  4 and 6 s, an AaPE encoder with every branch active (`eval_checkpoints.every_branch_active`).
  JAX's HEAR scene (`embed.Embedder`), `aasp_torch.AaSPEncoder.embed` and the transformers
  `AaSPModel` (extractor + forward for clips up to one window, `embed` for all) agree to 1e-5."""
  transformers = pytest.importorskip('transformers')

  cfg = pretrain.get_config('variant=tiny,target_length=256,stem=aape')
  m = cfg.model
  m.dtype, m.depth, m.width, m.num_heads, m.mlp_dim = 'float32', 2, 32, 2, 64
  m.aape.num_modes = 2
  model = pretrained.random_encoder(cfg, seed=4)
  model = dataclasses.replace(model, params=eval_checkpoints.every_branch_active(model.params, 4))
  exporter.write_export(
    tmp_path, model.config.model, model.preset, model.params, which='random', step=0, source='r'
  )
  wave, _ = clips.load_clip(
    os.path.join(REPO_ROOT, 'data', 'sonicpi', 'audio', 'arovane_beat_e.flac'), 16000
  )
  seconds = (0.2, 0.9, 2.56, 4.0, 6.0)
  waves, lengths = padded_batch([wave[: int(s * 16000)] for s in seconds])
  assert model.preset.target_length == 256
  want = embed.Embedder(model).scene_embeddings(waves, lengths)

  module = aasp_torch.AaSPEncoder.from_pretrained(tmp_path)
  got = module.embed(torch.from_numpy(waves), torch.from_numpy(lengths))['scene'].numpy()
  errors = {'aasp_torch embed': rel_err(got, want)}
  extractor = transformers.AutoFeatureExtractor.from_pretrained(tmp_path, trust_remote_code=True)
  hf = transformers.AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
  with torch.no_grad():
    short = [w[:n] for w, n in zip(waves[:3], lengths[:3])]  # up to one window: one forward
    scene = hf(**extractor(short, sampling_rate=16000, return_tensors='pt')).scene.numpy()
    errors['transformers forward (<= 1 window)'] = rel_err(scene, want[:3])
    long = hf.embed(torch.from_numpy(waves), torch.from_numpy(lengths))['scene'].numpy()
    errors['transformers embed'] = rel_err(long, want)
  print(f'0.2-6 s clips, relative errors against the JAX HEAR scene: {errors}')
  assert max(errors.values()) < TOLERANCE, errors
