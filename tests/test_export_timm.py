"""The timm / Audio-MAE layout of the conv-stem encoder (aasp_jax/export/timm_layout.py).

The reference for the layout is a timm-style ViT written below with torch ops and timm's module
names (patch_embed.proj, blocks.N.attn.qkv, ...), loaded with load_state_dict(strict=True): the
names, the shapes and the forward pass must all agree with the JAX encoder. Patches are 16 x 8
(time x mel), so a swapped kernel axis fails on shape, not only on value.
"""

import argparse
import functools
import math

import jax
import numpy as np
import pytest

from aasp_jax import configuration
from aasp_jax.evaluate import pretrained
from aasp_jax.export import safetensors_io, timm_layout
from aasp_jax.models.conv_stem import ConvPatchStem

try:
  import torch
except ImportError:  # the JAX-side tests still run; the torch references are skipped
  torch = None

needs_torch = pytest.mark.skipif(
  torch is None, reason='PyTorch is not installed (pip install torch)'
)

TARGET_LENGTH, MEL = 64, 128


def _config(stem='conv'):
  return configuration.load_config(
    f'configs/pretrain.py:variant=tiny,stem={stem},target_length={TARGET_LENGTH}',
    [
      'model.width=32',
      'model.depth=2',
      'model.num_heads=4',
      'model.mlp_dim=64',
      'model.patch_f=8',
      'model.dtype=float32',
    ],
  )


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


@needs_torch
def test_timm_vision_transformer_loads_the_layout(model):
  """With timm installed: timm's own VisionTransformer loads the file strictly and agrees."""
  vision_transformer = pytest.importorskip('timm.models.vision_transformer')
  m = model['config'].model
  vit = vision_transformer.VisionTransformer(
    img_size=(TARGET_LENGTH, MEL),
    patch_size=(m.patch_t, m.patch_f),
    in_chans=1,
    num_classes=0,
    embed_dim=m.width,
    depth=m.depth,
    num_heads=m.num_heads,
    mlp_ratio=m.mlp_dim / m.width,
    qkv_bias=True,
    norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
  ).eval()
  vit.load_state_dict({k: torch.from_numpy(v) for k, v in model['state'].items()}, strict=True)
  with torch.no_grad():
    y = vit.forward_features(torch.from_numpy(model['x'])[:, None]).double().numpy()
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


def test_audiomae_and_learned_pos_embed_are_recognised_and_ignored(model):
  m = model['config'].model
  state = dict(model['state'])
  state['pos_embed'] = _audiomae_table(m.width, TARGET_LENGTH // m.patch_t, MEL // m.patch_f)
  notes = timm_layout.from_timm(state, m, num_mel_bins=MEL).notes
  assert len(notes) == 1 and "Audio-MAE's sin-cos table" in notes[0] and 'ignored' in notes[0]
  state['pos_embed'] = state['pos_embed'] + 0.5
  [note] = timm_layout.from_timm(state, m, num_mel_bins=MEL).notes[-1:]
  assert 'differs from the fixed sin-cos table' in note and 'ignored' in note


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
  path = tmp_path / 'with_args.pth'
  state_dict = {k: torch.from_numpy(v) for k, v in model['state'].items()}
  torch.save({'model': state_dict, 'args': argparse.Namespace(lr=1e-3)}, path)
  with pytest.raises(timm_layout.TimmLayoutError, match='weights_only=True') as e:
    timm_layout.load_state_dict_file(str(path))
  assert str(path) in str(e.value)


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
  """Scanned-layout config (as ViT-B's): the checkpoint stacks the blocks, the loader unstacks."""
  config = _config()
  with config.unlocked():
    config.model.scan_layers = True
  imported = timm_layout.from_timm(model['state'], config.model, num_mel_bins=MEL)
  workdir = tmp_path / 'imported_run'
  step_dir = timm_layout.write_encoder_checkpoint(str(workdir), config, imported.params)
  assert step_dir == str(workdir / 'checkpoints' / '0')
  for which in ('teacher', 'student'):
    loaded = pretrained.load_pretrained(str(workdir), which=which)
    _assert_same_params(loaded.params, model['params'])
    assert loaded.preset.target_length == TARGET_LENGTH
  out = loaded.encoder.apply({'params': loaded.params}, model['x'])
  assert np.array_equal(np.asarray(out['tokens']), model['out']['tokens'])
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
