"""The timm / Audio-MAE layout of the conv-stem encoder (aasp_jax/export/timm_layout.py).

The reference for the layout is a timm-style ViT written below with torch ops and timm's module
names (patch_embed.proj, blocks.N.attn.qkv, ...), loaded with load_state_dict(strict=True): the
names, the shapes and the forward pass must all agree with the JAX encoder. Patches are 16 x 8
(time x mel), so a swapped kernel axis fails on shape, not only on value.

Imports are checked against the original model: the timm-style ViT with random weights under the
original names and each kind of `pos_embed` (Audio-MAE's sin-cos, ours, a learned table), on a
real log-mel, must give the JAX encoder's CLS and tokens within 1e-5 relative.
"""

import argparse
import json
import math
import os
import subprocess

import jax
import numpy as np
import pytest

from aasp_jax import checkpointing, configuration
from aasp_jax.audio import decode, fbank_host, presets
from aasp_jax.evaluate import pretrained
from aasp_jax.export import safetensors_io, timm_layout
from aasp_jax.models import build, posemb, vit
from aasp_jax.models.conv_stem import ConvPatchStem

try:
  import torch
except ImportError:  # the JAX-side tests still run; the torch references are skipped
  torch = None

needs_torch = pytest.mark.skipif(
  torch is None, reason='PyTorch is not installed (pip install torch)'
)

TARGET_LENGTH, MEL = 64, 128
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = os.path.join(REPO_ROOT, 'data', 'sonicpi', 'audio', 'loop_amen.flac')


def _config(stem='conv', width=32, target_length=TARGET_LENGTH, patch_f=8):
  return configuration.load_config(
    f'configs/pretrain.py:variant=tiny,stem={stem},target_length={target_length}',
    [
      f'model.width={width}',
      'model.depth=2',
      'model.num_heads=4',
      f'model.mlp_dim={2 * width}',
      f'model.patch_f={patch_f}',
      'model.dtype=float32',
    ],
  )


def real_log_mel(target_length: int) -> np.ndarray:
  """[1, target_length, 128]: a Sonic Pi drum loop through the eat_audiomae front end."""
  preset = presets.get_preset('eat_audiomae', target_length=target_length)
  return fbank_host.features(decode.load_audio(CLIP, preset), preset)[None]


@pytest.fixture(scope='module')
def model():
  """A tiny conv-stem encoder whose parameters are all perturbed away from their init (biases and
  LayerNorm scales included, so a swapped q/k/v or weight/bias shows), and its timm state dict."""
  config = _config()
  base = pretrained.random_encoder(config, seed=0)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: (a + 0.1 * rng.standard_normal(a.shape)).astype(np.float32), base.params
  )
  state = timm_layout.to_timm(params, config.model, target_length=TARGET_LENGTH, num_mel_bins=MEL)
  x = rng.standard_normal((2, TARGET_LENGTH, MEL)).astype(np.float32)
  out = base.encoder.apply({'params': params}, x)
  return {
    'config': config,
    'encoder': base.encoder,
    'params': params,
    'state': state,
    'x': x,
    'out': jax.tree.map(np.asarray, out),
  }


# ----------------------------------------------------------------------------------------------
# An independent timm-style ViT (timm.models.vision_transformer's structure and names).


def _timm_style_vit(m, num_tokens):
  """timm's VisionTransformer forward for Audio-MAE: log-mel [B, T, F] fed as an image [B, 1, T, F].
  Built inside a function so that this file imports without torch."""
  nn = torch.nn

  class _Attention(nn.Module):
    def __init__(self, dim, heads):
      super().__init__()
      self.heads = heads
      self.qkv = nn.Linear(dim, 3 * dim)
      self.proj = nn.Linear(dim, dim)

    def forward(self, x):
      b, n, d = x.shape
      qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
      q, k, v = qkv[0], qkv[1], qkv[2]
      weights = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1)
      return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))

  class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
      super().__init__()
      self.fc1 = nn.Linear(dim, hidden)
      self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
      return self.fc2(nn.functional.gelu(self.fc1(x)))  # exact (erf) GELU, timm's default

  class _Block(nn.Module):
    def __init__(self, dim, heads, hidden):
      super().__init__()
      self.norm1 = nn.LayerNorm(dim, eps=1e-6)
      self.attn = _Attention(dim, heads)
      self.norm2 = nn.LayerNorm(dim, eps=1e-6)
      self.mlp = _Mlp(dim, hidden)

    def forward(self, x):
      x = x + self.attn(self.norm1(x))
      return x + self.mlp(self.norm2(x))

  class _PatchEmbed(nn.Module):
    def __init__(self, dim, patch):
      super().__init__()
      self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)

  class TimmStyleViT(nn.Module):
    def __init__(self, m, num_tokens):
      super().__init__()
      dim = m.width
      self.patch_embed = _PatchEmbed(dim, (m.patch_t, m.patch_f))
      self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
      self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_tokens, dim))
      self.blocks = nn.ModuleList(_Block(dim, m.num_heads, m.mlp_dim) for _ in range(m.depth))
      self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x_btf):
      x = self.patch_embed.proj(x_btf[:, None]).flatten(2).transpose(1, 2)
      x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
      for block in self.blocks:
        x = block(x)
      return self.norm(x)

  return TimmStyleViT(m, num_tokens)


def _reference(state, config, x):
  """(cls, tokens) of the timm-style ViT in float64 with `state` loaded strictly."""
  num_tokens = state['pos_embed'].shape[1] - 1
  vit = _timm_style_vit(config.model, num_tokens).double().eval()
  vit.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=True)
  with torch.no_grad():
    y = vit(torch.from_numpy(x).double()).numpy()
  return y[:, 0], y[:, 1:]


def _rel_err(got, want):
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


# ----------------------------------------------------------------------------------------------
# Round trip and parity


def test_round_trip_gives_identical_parameters_and_outputs(model):
  back = timm_layout.from_timm(model['state'], model['config'].model, num_mel_bins=MEL)
  got = jax.tree_util.tree_leaves_with_path(back.params)
  want = jax.tree_util.tree_leaves_with_path(model['params'])
  assert [p for p, _ in got] == [p for p, _ in want]
  for (path, a), (_, b) in zip(got, want):
    assert a.dtype == np.float32 and np.array_equal(a, b), jax.tree_util.keystr(path)
  assert back.ignored == []
  grid = f'{TARGET_LENGTH // 16}x{MEL // 8}'
  assert back.notes == [f"pos_embed ({grid} patches) equals the encoder's fixed sin-cos table."]
  out = model['encoder'].apply({'params': back.params}, model['x'])
  for key in ('cls', 'tokens'):
    assert np.array_equal(np.asarray(out[key]), model['out'][key])


@needs_torch
def test_patch_embedding_matches_a_torch_convolution(model):
  """patch_embed.proj.weight in a real torch Conv2d on [B, 1, T, F] == the flax conv stem."""
  m = model['config'].model
  stem = ConvPatchStem(embed_dim=m.width, patch_t=m.patch_t, patch_f=m.patch_f)
  want = np.asarray(stem.apply({'params': model['params']['stem']}, model['x']))  # [B, t, f, D]
  weight = torch.from_numpy(model['state']['patch_embed.proj.weight'])
  assert tuple(weight.shape) == (m.width, 1, m.patch_t, m.patch_f)
  y = torch.nn.functional.conv2d(
    torch.from_numpy(model['x'])[:, None],
    weight,
    torch.from_numpy(model['state']['patch_embed.proj.bias']),
    stride=(m.patch_t, m.patch_f),
  )
  np.testing.assert_allclose(y.permute(0, 2, 3, 1).numpy(), want, rtol=1e-5, atol=1e-5)


@needs_torch
def test_timm_layout_in_a_timm_style_torch_vit_matches_jax(model):
  cls, tokens = _reference(model['state'], model['config'], model['x'])
  assert _rel_err(model['out']['cls'], cls) < 1e-4
  assert _rel_err(model['out']['tokens'], tokens) < 1e-4


# timm cannot be installed next to the test extra's CPU torch: PyPI's torchvision wheels (which timm
# needs) are CUDA builds linked against libtorch_cuda, and `pip install timm` replaces the CPU torch.
# So timm runs in an environment of its own: `make timm-env` builds .venv-timm (torch, torchvision
# and timm from PyPI, ~5.5 GB, ~2 min); AASP_TIMM_PYTHON names another interpreter with timm.
TIMM_PYTHON = os.environ.get('AASP_TIMM_PYTHON') or os.path.join(
  REPO_ROOT, '.venv-timm', 'bin', 'python'
)
TIMM_SKIP_REASON = (
  'timm is not importable here (it cannot be installed next to the CPU torch of the test extra: '
  "PyPI's torchvision is a CUDA build) and no timm environment was found at "
  f'{TIMM_PYTHON}: run `make timm-env` (or set AASP_TIMM_PYTHON) to run this test in its own '
  'environment'
)


def _timm_forward(kwargs: dict, state: dict, x: np.ndarray, tmp_path) -> np.ndarray:
  """timm's own VisionTransformer(**kwargs) with `state` loaded strictly: forward_features(x)."""
  try:
    from timm.models import vision_transformer
  except ImportError:
    vision_transformer = None
  if vision_transformer is not None and torch is not None:
    kw = dict(kwargs, img_size=tuple(kwargs['img_size']), patch_size=tuple(kwargs['patch_size']))
    vit_model = vision_transformer.VisionTransformer(**kw).eval()
    vit_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    with torch.no_grad():
      return vit_model.forward_features(torch.from_numpy(x)[:, None]).double().numpy()
  if not os.path.isfile(TIMM_PYTHON):
    pytest.skip(TIMM_SKIP_REASON)
  with open(tmp_path / 'kwargs.json', 'w') as f:
    json.dump(kwargs, f)
  safetensors_io.save(str(tmp_path / 'state.safetensors'), state, {'format': 'pt'})
  np.save(tmp_path / 'x.npy', x)
  child = os.path.join(REPO_ROOT, 'tests', 'timm_child.py')
  done = subprocess.run(
    [TIMM_PYTHON, child, str(tmp_path)], capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return np.load(tmp_path / 'out.npy')


def test_timm_vision_transformer_loads_the_layout(model, tmp_path):
  """timm's own VisionTransformer, built from the recorded constructor arguments, loads the file
  strictly and agrees (in this environment if it has timm, else in the timm environment)."""
  m = model['config'].model
  kwargs = json.loads(json.dumps(timm_layout.timm_constructor_args(m, TARGET_LENGTH, MEL)))
  y = _timm_forward(kwargs, model['state'], model['x'], tmp_path)
  assert _rel_err(model['out']['cls'], y[:, 0]) < 1e-4
  assert _rel_err(model['out']['tokens'], y[:, 1:]) < 1e-4


# ----------------------------------------------------------------------------------------------
# Positions on import


def _audiomae_table(dim, n_time, n_freq):
  """Audio-MAE's get_2d_sincos_pos_embed_flexible, transcribed: meshgrid(w, h) puts the width
  (frequency) coordinate in the first half of each vector."""

  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid = np.stack(np.meshgrid(np.arange(n_freq), np.arange(n_time)), axis=0)  # [2, T, F]
  emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
  return np.concatenate([np.zeros((1, dim)), emb], axis=0)[None].astype(np.float32)


@needs_torch
def test_non_zero_cls_position_is_folded_into_cls(model):
  """timm adds pos_embed's first row to the CLS token; the import must give the same outputs."""
  state = dict(model['state'])
  pos = state['pos_embed'].copy()
  pos[0, 0] = np.random.default_rng(1).standard_normal(pos.shape[-1])
  state['pos_embed'] = pos
  imported = timm_layout.from_timm(state, model['config'].model, num_mel_bins=MEL)
  assert any('folded into cls' in n for n in imported.notes)
  out = model['encoder'].apply({'params': imported.params}, model['x'])
  cls, tokens = _reference(state, model['config'], model['x'])
  assert _rel_err(out['cls'], cls) < 1e-4 and _rel_err(out['tokens'], tokens) < 1e-4


def test_audiomae_and_learned_pos_embed_are_recognised(model):
  m = model['config'].model
  state = dict(model['state'])
  state['pos_embed'] = _audiomae_table(m.width, TARGET_LENGTH // m.patch_t, MEL // m.patch_f)
  imported = timm_layout.from_timm(state, m, num_mel_bins=MEL)
  assert len(imported.notes) == 1 and "Audio-MAE's sin-cos table" in imported.notes[0]
  assert imported.model_overrides == {'posemb': 'sincos_mae', 'block_norm': 'pre'}
  assert 'posemb' not in imported.params
  # A table computed in float32 (EAT's, up to 768 time patches) is still the sin-cos table.
  state['pos_embed'] = state['pos_embed'] + 5e-5
  assert timm_layout.from_timm(state, m, num_mel_bins=MEL).model_overrides['posemb'] == 'sincos_mae'
  state['pos_embed'] = state['pos_embed'] + 0.5
  imported = timm_layout.from_timm(state, m, num_mel_bins=MEL)
  assert 'no sin-cos table' in imported.notes[-1]
  assert imported.model_overrides == {
    'posemb': 'learned',
    'block_norm': 'pre',
    'max_time_patches': TARGET_LENGTH // m.patch_t,
  }
  table = imported.params['posemb']
  np.testing.assert_array_equal(table.reshape(-1, m.width), state['pos_embed'][0, 1:])
  state['pos_embed'] = state['pos_embed'][:, :-3]
  with pytest.raises(timm_layout.TimmLayoutError, match='patch grid|fill a'):
    timm_layout.from_timm(state, m, num_mel_bins=MEL)


def _original_timm_state(m, kind, n_time, n_freq):
  """A timm-style ViT's state dict with random weights (every LayerNorm and bias perturbed) and a
  `kind` pos_embed: Audio-MAE's table, ours, or a learned one with a non-zero CLS row."""
  torch.manual_seed(0)
  vit = _timm_style_vit(m, n_time * n_freq)
  with torch.no_grad():
    for p in vit.parameters():
      p.add_(0.1 * torch.randn_like(p))
  state = {k: v.detach().numpy().astype(np.float32) for k, v in vit.state_dict().items()}
  if kind == 'sincos_mae':
    state['pos_embed'] = _audiomae_table(m.width, n_time, n_freq)
  elif kind == 'sincos':
    table = posemb.sincos_table(m.width, n_time, n_freq).reshape(-1, m.width)
    state['pos_embed'] = np.concatenate([np.zeros((1, m.width)), table])[None].astype(np.float32)
  else:
    state['pos_embed'] = (
      0.5 * np.random.default_rng(3).standard_normal((1, 1 + n_time * n_freq, m.width))
    ).astype(np.float32)
  return state


@needs_torch
@pytest.mark.parametrize('kind', ['sincos_mae', 'sincos', 'learned'])
def test_import_computes_what_the_original_model_computes(kind):
  """Audio-MAE (16x16 patches, width 64) on a real log-mel: the imported encoder equals the
  original timm-style model, and exporting it again gives a file the original reads the same."""
  config = _config(width=64, target_length=128, patch_f=16)
  m = config.model
  x = real_log_mel(128)
  state = _original_timm_state(m, kind, 128 // 16, MEL // 16)
  want_cls, want_tokens = _reference(state, config, x)
  imported = timm_layout.from_timm(state, m, num_mel_bins=MEL)
  assert imported.model_overrides['posemb'] == kind
  assert imported.ignored == []
  config = timm_layout.apply_model_overrides(config, imported.model_overrides)
  encoder = build.build_encoder(config.model)
  out = encoder.apply({'params': imported.params}, x)
  errors = [_rel_err(out['cls'], want_cls), _rel_err(out['tokens'], want_tokens)]
  assert max(errors) < 1e-5, errors
  exported = timm_layout.to_timm(imported.params, config.model, target_length=128, num_mel_bins=MEL)
  cls, tokens = _reference(exported, config, x)
  assert _rel_err(cls, want_cls) < 1e-5 and _rel_err(tokens, want_tokens) < 1e-5
  if kind != 'learned':  # a fixed table is exported as computed, with the CLS row folded into cls
    np.testing.assert_allclose(exported['pos_embed'][0, 1:], state['pos_embed'][0, 1:], atol=1e-6)


def test_timm_constructor_args_describe_the_layout(model):
  m = model['config'].model
  kwargs = timm_layout.timm_constructor_args(m, TARGET_LENGTH, MEL)
  assert json.loads(json.dumps(kwargs)) == kwargs
  assert kwargs['img_size'] == [TARGET_LENGTH, MEL] and kwargs['patch_size'] == [16, 8]
  assert (kwargs['embed_dim'], kwargs['depth'], kwargs['num_heads']) == (32, 2, 4)
  assert kwargs['mlp_ratio'] == 2.0 and kwargs['in_chans'] == 1 and kwargs['num_classes'] == 0
  assert kwargs['class_token'] and not kwargs['no_embed_class'] and not kwargs['fc_norm']
  post = dict(m.to_dict(), block_norm='post')
  for fn in (
    lambda cfg: timm_layout.timm_constructor_args(cfg, TARGET_LENGTH, MEL),
    lambda cfg: timm_layout.to_timm(model['params'], cfg),
  ):
    with pytest.raises(timm_layout.TimmLayoutError, match='pre-LN'):
      fn(post)
    with pytest.raises(timm_layout.TimmLayoutError, match='eps=1e-6'):
      fn(dict(m.to_dict(), norm_eps=1e-5))


# ----------------------------------------------------------------------------------------------
# Files: .pt and .safetensors with wrappers, extra tensors, errors


def _extras(width):
  rng = np.random.default_rng(2)
  return {
    'decoder_pred.weight': rng.standard_normal((16, width)).astype(np.float32),
    'mask_token': rng.standard_normal((1, 1, width)).astype(np.float32),
  }


def _assert_same_params(got, want):
  got = jax.tree_util.tree_leaves_with_path(got)
  want = jax.tree_util.tree_leaves_with_path(want)
  assert [p for p, _ in got] == [p for p, _ in want]
  for (path, a), (_, b) in zip(got, want):
    assert np.array_equal(a, b), jax.tree_util.keystr(path)


@needs_torch
def test_pt_file_with_model_wrapper_and_module_prefix_loads(model, tmp_path, caplog):
  m = model['config'].model
  tensors = dict(model['state'], **_extras(m.width))
  path = tmp_path / 'checkpoint-799.pth'
  state_dict = {f'module.{k}': torch.from_numpy(v) for k, v in tensors.items()}
  torch.save({'model': state_dict, 'epoch': 799}, path)
  with caplog.at_level('INFO', logger='aasp_jax.export.timm_layout'):
    imported = timm_layout.load_timm(str(path), m, num_mel_bins=MEL)
  assert imported.ignored == ['decoder_pred.weight', 'mask_token']
  assert 'ignored 2 tensor(s)' in caplog.text and 'decoder_pred.weight' in caplog.text
  _assert_same_params(imported.params, model['params'])


def test_safetensors_file_with_encoder_prefix_loads(model, tmp_path):
  m = model['config'].model
  tensors = dict(model['state'], **_extras(m.width))
  path = tmp_path / 'weights.safetensors'
  safetensors_io.save(path, {f'model.encoder.{k}': v for k, v in tensors.items()})
  loaded = timm_layout.load_state_dict_file(str(path))
  assert sorted(loaded) == sorted(tensors)
  imported = timm_layout.from_timm(loaded, m, num_mel_bins=MEL)
  assert imported.ignored == ['decoder_pred.weight', 'mask_token']
  _assert_same_params(imported.params, model['params'])


def test_save_timm_writes_a_tagged_safetensors_file(model, tmp_path):
  path = tmp_path / 'timm_model.safetensors'
  timm_layout.save_timm(
    path, model['params'], model['config'].model, target_length=TARGET_LENGTH, num_mel_bins=MEL
  )
  tensors, metadata = safetensors_io.load(path)
  assert metadata == timm_layout.LAYOUT_METADATA
  assert sorted(tensors) == sorted(model['state'])
  assert all(np.array_equal(tensors[k], v) for k, v in model['state'].items())


@needs_torch
def test_pt_file_with_pickled_objects_is_refused_with_a_hint(model, tmp_path):
  """Audio-MAE saves its argparse args next to the weights: refused by default, read with
  opaque_objects=True (the args become inert stand-in classes; the command line does that)."""
  path = tmp_path / 'with_args.pth'
  state_dict = {k: torch.from_numpy(v) for k, v in model['state'].items()}
  torch.save({'model': state_dict, 'args': argparse.Namespace(lr=1e-3)}, path)
  with pytest.raises(timm_layout.TimmLayoutError, match='weights_only=True') as e:
    timm_layout.load_state_dict_file(str(path))
  assert str(path) in str(e.value) and 'opaque_objects=True' in str(e.value)
  imported = timm_layout.load_timm(str(path), model['config'].model, opaque_objects=True)
  _assert_same_params(imported.params, model['params'])


def test_mis_shaped_tensor_is_named_with_its_expected_shape(model):
  m = model['config'].model
  state = dict(model['state'])
  state['blocks.1.mlp.fc1.weight'] = np.zeros((m.mlp_dim, m.width + 1), np.float32)
  with pytest.raises(timm_layout.TimmLayoutError) as e:
    timm_layout.from_timm(state, m)
  message = str(e.value)
  assert "'blocks.1.mlp.fc1.weight'" in message
  assert f'[{m.mlp_dim}, {m.width + 1}]' in message and f'[{m.mlp_dim}, {m.width}]' in message


def test_missing_tensor_is_named_with_its_expected_shape(model):
  m = model['config'].model
  state = {k: v for k, v in model['state'].items() if k != 'blocks.0.attn.qkv.bias'}
  with pytest.raises(timm_layout.TimmLayoutError, match=r"'blocks\.0\.attn\.qkv\.bias'") as e:
    timm_layout.from_timm(state, m)
  assert f'[{3 * m.width}]' in str(e.value) and 'missing' in str(e.value)


def test_aape_stem_is_refused_both_ways(model):
  aape = _config('aape').model
  with pytest.raises(timm_layout.TimmLayoutError, match='AaPE'):
    timm_layout.to_timm(model['params'], aape)
  with pytest.raises(timm_layout.TimmLayoutError, match="stem is 'aape'"):
    timm_layout.from_timm(model['state'], aape)


def test_unknown_file_type_and_missing_file_fail_clearly(tmp_path):
  path = tmp_path / 'weights.npz'
  path.write_bytes(b'x')
  with pytest.raises(timm_layout.TimmLayoutError, match='.safetensors, .pt or .pth'):
    timm_layout.load_state_dict_file(str(path))
  with pytest.raises(FileNotFoundError, match='nope.pt'):
    timm_layout.load_state_dict_file(str(tmp_path / 'nope.pt'))


# ----------------------------------------------------------------------------------------------
# Imported weights as a checkpoint (the fine-tuning entry point)


def test_imported_weights_become_a_checkpoint_that_load_pretrained_reads(model, tmp_path):
  """Scanned-layout config (as ViT-B's) and a learned table: the checkpoint stacks the blocks and
  saves the overridden config and the checksums; the loader unstacks and verifies."""
  config = _config()
  with config.unlocked():
    config.model.scan_layers = True
  state = dict(model['state'], pos_embed=model['state']['pos_embed'] + 0.25)
  imported = timm_layout.from_timm(state, config.model, num_mel_bins=MEL)
  assert imported.model_overrides['posemb'] == 'learned'
  workdir = tmp_path / 'imported_run'
  step_dir = timm_layout.write_encoder_checkpoint(
    str(workdir), config, imported.params, model_overrides=imported.model_overrides
  )
  assert step_dir == str(workdir / 'checkpoints' / '0')
  tree = jax.tree.map(np.asarray, vit.stack_blocks(imported.params, 2))
  contents = checkpointing.read_step(
    step_dir, lambda saved: {'train': {'teacher': jax.tree.map(np.zeros_like, tree)}}, partial=True
  )
  assert contents.verified and contents.config['model']['posemb'] == 'learned'
  for which in ('teacher', 'student'):
    loaded = pretrained.load_pretrained(str(workdir), which=which)
    _assert_same_params(loaded.params, imported.params)
    assert loaded.preset.target_length == TARGET_LENGTH
    assert loaded.config.model.max_time_patches == TARGET_LENGTH // 16
  out = loaded.encoder.apply({'params': loaded.params}, model['x'])
  if torch is not None:  # the checkpoint computes what the original (learned table) model does
    cls, tokens = _reference(state, loaded.config, model['x'])
    assert _rel_err(out['cls'], cls) < 1e-4 and _rel_err(out['tokens'], tokens) < 1e-4
  with pytest.raises(FileExistsError, match='already holds checkpoints'):
    timm_layout.write_encoder_checkpoint(str(workdir), config, imported.params)


def test_checkpoint_of_params_that_do_not_fit_the_config_is_refused(model, tmp_path):
  config = _config()
  params = jax.tree.map(lambda a: a, model['params'])
  params['blocks_1']['mlp']['fc2']['kernel'] = np.zeros((8, 32), np.float32)
  with pytest.raises(
    timm_layout.TimmLayoutError, match=r"'blocks_1\.mlp\.fc2\.kernel'.*\[64, 32\]"
  ):
    timm_layout.write_encoder_checkpoint(str(tmp_path / 'run'), config, params)
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_a_damaged_imported_checkpoint_is_caught_on_load(model, tmp_path):
  """Imported weights carry the trainer's checksums: one bit of one stored value flipped (the
  files stay well-formed, so only the checksum can tell) and load_pretrained refuses the
  checkpoint, naming the array."""
  import tensorstore as ts

  config = _config()
  imported = timm_layout.from_timm(model['state'], config.model, num_mel_bins=MEL)
  step_dir = timm_layout.write_encoder_checkpoint(
    str(tmp_path / 'run'), config, imported.params, model_overrides=imported.model_overrides,
    origin='timm weights (test)',
  )
  pretrained.load_pretrained(str(tmp_path / 'run'))  # intact: verified and read
  spec = {
    'driver': 'zarr',
    'kvstore': {'driver': 'ocdbt', 'base': f'file://{step_dir}/state/', 'path': 'train.teacher.cls/'},
  }
  store = ts.open(spec).result()
  words = store.read().result().view(np.uint32).copy()
  words.reshape(-1)[3] ^= np.uint32(1 << 2)
  store.write(words.view(np.float32)).result()
  with pytest.raises(checkpointing.NoUsableCheckpoint, match='array train.teacher.cls: checksum'):
    pretrained.load_pretrained(str(tmp_path / 'run'))
  with pytest.raises(checkpointing.NoUsableCheckpoint, match='import the weights again'):
    pretrained.load_pretrained(str(tmp_path / 'run'))
