"""EAT checkpoints into the JAX encoder (aasp_jax/export/eat_layout.py).

The reference is EAT's own forward, transcribed below in torch from EAT's code
(github.com/cwx-worst-one/EAT): models/mae.py (PatchEmbed_new, get_2d_sincos_pos_embed_flexible),
models/base.py (ModalitySpecificEncoder.contextualized_features: positions on the patch tokens,
the extra token, the context encoder), models/modules.py (BlockEncoder: its norm first when
layer_norm_first is False; AltBlock post-LN; AltAttention) and models/EAT_pretraining.py
(Data2VecMultiModel: top-level blocks, no final norm), and the Hugging Face release's eat_model.py
(EAT.encode, `pre_norm`). Random weights are saved under the ORIGINAL names (a fairseq checkpoint
with a pickled config, and a Hugging Face safetensors file with its config.json); the imported
encoder must give EAT's CLS and tokens within 1e-5 relative on a real log-mel.
"""

import enum
import json
import math
import os

import numpy as np
import pytest

from aasp_jax import configuration
from aasp_jax.audio import decode, fbank_host, presets
from aasp_jax.evaluate import embed, pretrained
from aasp_jax.export import eat_layout, safetensors_io, timm_layout
from aasp_jax.models import build

torch = pytest.importorskip('torch')
nn = torch.nn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = os.path.join(REPO_ROOT, 'data', 'sonicpi', 'audio', 'loop_amen.flac')
WIDTH, DEPTH, HEADS, PATCH, MEL, TARGET, MAX_LENGTH = 64, 2, 4, 16, 128, 128, 16
CONFIG = f'configs/pretrain.py:variant=tiny,stem=conv,target_length={TARGET}'


class Modality(enum.Enum):  # stands for EAT's enum that fairseq pickles into the checkpoint's cfg
  AUDIO = 1
  IMAGE = 2


# ----------------------------------------------------------------------------------------------
# EAT's encoder, transcribed


def eat_sincos(embed_dim, grid_size):
  """models/mae.py get_2d_sincos_pos_embed_flexible (float32, meshgrid(w, h): w goes first)."""

  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid_h = np.arange(grid_size[0], dtype=np.float32)
  grid_w = np.arange(grid_size[1], dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size[0], grid_size[1]])
  return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


class AltAttention(nn.Module):
  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=True)  # make_block: qkv_bias=True
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):  # timm's Mlp: fc1, GELU (exact), fc2
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(nn.functional.gelu(self.fc1(x)))


class AltBlock(nn.Module):
  """models/modules.py AltBlock with layer_norm_first=False (EAT), eval mode."""

  def __init__(self, dim, num_heads, eps):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=eps)
    self.attn = AltAttention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=eps)
    self.mlp = Mlp(dim, 4 * dim)

  def forward(self, x):
    x = x + self.attn(x)
    r = x = self.norm1(x)
    x = self.mlp(x)
    return self.norm2(r + x)


class PatchEmbedNew(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.proj = nn.Conv2d(1, dim, kernel_size=PATCH, stride=PATCH)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class FixedPositionalEncoder(nn.Module):
  def __init__(self, dim):
    super().__init__()
    table = eat_sincos(dim, (MAX_LENGTH, MEL // PATCH))
    self.positions = nn.Parameter(torch.from_numpy(table).float()[None], requires_grad=False)


class BlockEncoder(nn.Module):  # the context encoder: prenet_depth=0 blocks and its norm
  def __init__(self, dim, eps):
    super().__init__()
    self.blocks = nn.ModuleList()
    self.norm = nn.LayerNorm(dim, eps=eps)


class ImageEncoder(nn.Module):
  def __init__(self, dim, eps):
    super().__init__()
    self.local_encoder = PatchEmbedNew(dim)
    self.fixed_positional_encoder = FixedPositionalEncoder(dim)
    self.context_encoder = BlockEncoder(dim, eps)
    self.extra_tokens = nn.Parameter(torch.zeros(1, 1, dim))
    self.decoder = nn.Sequential(nn.Conv2d(dim, 8, 3, padding=1), nn.Linear(8, dim))  # ignored

  def forward(self, source):
    x = self.local_encoder(source)
    x = x + self.fixed_positional_encoder.positions[:, : x.size(1), :]
    x = torch.cat([self.extra_tokens.expand(x.size(0), -1, -1), x], dim=1)
    return self.context_encoder.norm(x)  # BlockEncoder.forward: norm, dropout (eval), no blocks


class Data2VecMultiModel(nn.Module):
  """The fairseq release's names: modality_encoders.IMAGE.* and top-level blocks (no final norm)."""

  def __init__(self, eps=1e-6):
    super().__init__()
    self.modality_encoders = nn.ModuleDict({'IMAGE': ImageEncoder(WIDTH, eps)})
    self.blocks = nn.ModuleList(AltBlock(WIDTH, HEADS, eps) for _ in range(DEPTH))

  def forward(self, source):  # extract_features(mask=False, remove_extra_tokens=False)['x']
    x = self.modality_encoders['IMAGE'](source)
    for blk in self.blocks:
      x = blk(x)
    return x


class EAT(nn.Module):
  """The Hugging Face release's eat_model.py EAT (wrapped as EATModel.model)."""

  def __init__(self, eps=1e-6):
    super().__init__()
    self.local_encoder = PatchEmbedNew(WIDTH)
    self.extra_tokens = nn.Parameter(torch.zeros(1, 1, WIDTH))
    self.fixed_positional_encoder = FixedPositionalEncoder(WIDTH)
    self.blocks = nn.ModuleList(AltBlock(WIDTH, HEADS, eps) for _ in range(DEPTH))
    self.pre_norm = nn.LayerNorm(WIDTH, eps=eps)
    self.fc_norm = nn.LayerNorm(WIDTH)  # the fine-tuned release's head: ignored
    self.head = nn.Linear(WIDTH, 5)

  def forward(self, x):  # EAT.encode
    x = self.local_encoder(x)
    x = x + self.fixed_positional_encoder.positions[:, : x.size(1), :]
    x = torch.cat((self.extra_tokens.expand(x.shape[0], -1, -1), x), dim=1)
    x = self.pre_norm(x)
    for blk in self.blocks:
      x = blk(x)
    return x


class EATModel(nn.Module):
  def __init__(self, eps=1e-6):
    super().__init__()
    self.model = EAT(eps)


def randomised(module, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if not name.endswith('positions'):
        p.add_(0.1 * torch.randn_like(p))
  return module


def real_log_mel():
  preset = presets.get_preset('eat_audiomae', target_length=TARGET)
  return fbank_host.features(decode.load_audio(CLIP, preset), preset)[None]


def reference(module, x):
  """(cls, tokens) of EAT's forward in float64."""
  module = module.double().eval()
  with torch.no_grad():
    y = module(torch.from_numpy(x).double()[:, None]).numpy()  # [B, 1, T, F] as EAT feeds it
  return y[:, 0], y[:, 1:]


def rel_err(got, want):
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def jax_outputs(overrides, params, x):
  config = configuration.load_config(CONFIG, ['model.dtype=float32'])
  config = timm_layout.apply_model_overrides(config, overrides)
  out = build.build_encoder(config.model).apply({'params': params}, x)
  return out['cls'], out['tokens']


@pytest.fixture(scope='module')
def x():
  return real_log_mel()


@pytest.fixture(scope='module')
def fairseq_checkpoint(tmp_path_factory):
  """(path, model, teacher model): a fairseq-style EAT pre-training checkpoint."""
  student, teacher = randomised(Data2VecMultiModel(), 0), randomised(Data2VecMultiModel(), 1)
  state = {
    'cfg': {'model': {'num_heads': HEADS, 'norm_eps': 1e-6, 'modality': Modality.IMAGE}},
    'model': dict(student.state_dict(), _ema=dict(teacher.state_dict())),
    'optimizer_history': [{'num_updates': 400000}],
  }
  path = tmp_path_factory.mktemp('eat') / 'EAT-base_epoch30_pretrain.pt'
  torch.save(state, path)
  return str(path), student, teacher


# ----------------------------------------------------------------------------------------------
# Parity with EAT


def test_fairseq_checkpoint_computes_what_eat_computes(fairseq_checkpoint, x):
  path, student, _ = fairseq_checkpoint
  with pytest.raises(timm_layout.TimmLayoutError, match='weights_only'):
    timm_layout.load_state_dict_file(path)  # its pickled config needs opaque_objects
  imported = eat_layout.read_eat(path)
  assert imported.release == 'fairseq'
  assert imported.model_overrides == {
    'stem': 'conv',
    'width': WIDTH,
    'depth': DEPTH,
    'num_heads': HEADS,
    'mlp_dim': 4 * WIDTH,
    'patch_t': PATCH,
    'patch_f': PATCH,
    'posemb': 'sincos_mae',
    'block_norm': 'post',
    'norm_eps': 1e-6,
    'max_time_patches': MAX_LENGTH,
  }
  assert imported.ignored and all('.decoder.' in n for n in imported.ignored)
  assert any('_ema' in n and 'not imported' in n for n in imported.notes)
  cls, tokens = jax_outputs(imported.model_overrides, imported.params, x)
  want_cls, want_tokens = reference(student, x)
  errors = [rel_err(cls, want_cls), rel_err(tokens, want_tokens)]
  assert max(errors) < 1e-5, errors


def test_hugging_face_release_computes_what_eat_computes(tmp_path, x):
  model = randomised(EATModel(eps=1e-5), 2)
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  safetensors_io.save(tmp_path / 'model.safetensors', tensors)
  config = {'model_type': 'eat', 'embed_dim': WIDTH, 'num_heads': HEADS, 'norm_eps': 1e-5}
  (tmp_path / 'config.json').write_text(json.dumps(config))
  overrides, params = eat_layout.load_eat(str(tmp_path / 'model.safetensors'))
  assert overrides['norm_eps'] == 1e-5 and overrides['block_norm'] == 'post'
  assert overrides['posemb'] == 'sincos_mae' and overrides['max_time_patches'] == MAX_LENGTH
  imported = eat_layout.read_eat(str(tmp_path / 'model.safetensors'))
  assert imported.release == 'hf'
  assert imported.ignored == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
  cls, tokens = jax_outputs(overrides, params, x)
  want_cls, want_tokens = reference(model.model, x)
  errors = [rel_err(cls, want_cls), rel_err(tokens, want_tokens)]
  assert max(errors) < 1e-5, errors


def test_teacher_and_a_learned_table(fairseq_checkpoint, x):
  """which='teacher' reads _ema; a position table that is no sin-cos is kept as a table."""
  path, _, teacher = fairseq_checkpoint
  imported = eat_layout.read_eat(path, which='teacher')
  np.testing.assert_array_equal(
    imported.params['blocks_1']['norm2']['scale'], teacher.blocks[1].norm2.weight.detach().numpy()
  )
  state = {k: v.detach().numpy() for k, v in teacher.state_dict().items()}
  name = 'modality_encoders.IMAGE.fixed_positional_encoder.positions'
  state[name] = state[name] + np.random.default_rng(0).normal(0, 0.3, state[name].shape)
  teacher.modality_encoders['IMAGE'].fixed_positional_encoder.positions.data = torch.from_numpy(
    state[name]
  )
  learned = eat_layout.from_eat(state, num_heads=HEADS)
  assert learned.model_overrides['posemb'] == 'learned'
  assert learned.params['posemb'].shape == (MAX_LENGTH, MEL // PATCH, WIDTH)
  cls, tokens = jax_outputs(learned.model_overrides, learned.params, x)
  want_cls, want_tokens = reference(teacher, x)
  assert rel_err(cls, want_cls) < 1e-5 and rel_err(tokens, want_tokens) < 1e-5
  with pytest.raises(ValueError, match='which'):
    eat_layout.read_eat(path, which='ema')


def test_unsupported_and_foreign_checkpoints_fail_clearly(fairseq_checkpoint):
  _, student, _ = fairseq_checkpoint
  state = {k: v.detach().numpy() for k, v in student.state_dict().items()}
  with pytest.raises(eat_layout.EatLayoutError, match='timm_layout.load_timm'):
    eat_layout.from_eat({'patch_embed.proj.weight': np.zeros((4, 1, 16, 16))})
  pre_ln = {k: v for k, v in state.items() if 'context_encoder.norm' not in k}
  with pytest.raises(eat_layout.EatLayoutError, match='pre-LN'):
    eat_layout.from_eat(dict(pre_ln, **{'norm.weight': np.ones(WIDTH)}))
  prenet = dict(state, **{'modality_encoders.IMAGE.context_encoder.blocks.0.norm1.weight': 0})
  with pytest.raises(eat_layout.EatLayoutError, match='prenet_depth'):
    eat_layout.from_eat(prenet)
  partial = {k: v for k, v in state.items() if k != 'blocks.1.attn.qkv.bias'}
  with pytest.raises(eat_layout.EatLayoutError, match=r"'blocks\.1\.attn\.qkv\.bias'"):
    eat_layout.from_eat(partial)


# ----------------------------------------------------------------------------------------------
# The fine-tuning entry point


def test_command_line_writes_a_checkpoint_that_loads_and_embeds(fairseq_checkpoint, tmp_path, x):
  path, student, _ = fairseq_checkpoint
  workdir = tmp_path / 'eat_run'
  argv = ['--weights', path, '--workdir', str(workdir), '--config', CONFIG]
  assert eat_layout.main(argv + ['--set', 'model.dtype=float32']) == 0
  loaded = pretrained.load_pretrained(str(workdir))  # restored and checked against the checksums
  m = loaded.config.model
  assert (m.posemb, m.block_norm, m.max_time_patches) == ('sincos_mae', 'post', MAX_LENGTH)
  assert m.norm_eps == 1e-6
  out = loaded.encoder.apply({'params': loaded.params}, x)
  want_cls, want_tokens = reference(student, x)
  assert rel_err(out['cls'], want_cls) < 1e-5 and rel_err(out['tokens'], want_tokens) < 1e-5
  # Embeds: the scene embedding (CLS) of the clip's first window, from the waveform.
  preset = loaded.preset
  wave = decode.load_audio(CLIP, preset)[: 400 + 160 * (TARGET - 1)]
  scene = embed.Embedder(loaded, pooling='cls').scene_embeddings(wave[None])
  assert scene.shape == (1, WIDTH) and math.isfinite(float(np.sum(scene)))
  assert rel_err(scene[0], want_cls[0]) < 1e-3  # device vs host log-mel (float32)
  assert eat_layout.main(argv) == 1  # the workdir already holds a checkpoint: refused, one line
  # Post-LN has no place in timm's ViT: aasp-export --timm refuses before writing anything.
  from aasp_jax.export import cli as export_cli

  with pytest.raises(SystemExit) as exit_info:
    export_cli.main([str(workdir), str(tmp_path / 'out'), '--timm'])
  assert exit_info.value.code == 2 and not (tmp_path / 'out').exists()
  # The export says where the weights came from, not "pre-trained with AaSP".
  assert loaded.origin == 'EAT weights `EAT-base_epoch30_pretrain.pt`'
  assert export_cli.main([str(workdir), str(tmp_path / 'out')]) == 0
  card = (tmp_path / 'out' / 'README.md').read_text()
  assert 'imported from EAT weights `EAT-base_epoch30_pretrain.pt`' in card.replace('\n', ' ')
  assert 'pre-trained with AaSP' not in card.replace('\n', ' ')
