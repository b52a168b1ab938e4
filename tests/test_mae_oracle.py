"""`recipe=mae` against Audio-MAE's own decoder and loss, re-stated in PyTorch (float64).

The oracle below is written from facebookresearch/AudioMAE at bd60e29 (each function cites the lines
it re-states; the timm 0.3.2 ViT `Block` that its global decoder imports is re-stated from that
release), not imported: it needs none of Audio-MAE's dependencies. Both sides get the same weights
(random values for every parameter of our decoder, copied into Audio-MAE's state-dict layout), the
same normalised log-mel of two real clips, two clones per clip and the same mask (drawn by
Audio-MAE's `random_masking` from a seeded torch generator and handed to us as `Masks`). Then the
decoder predictions, the normalised targets, the loss and its gradients with respect to every
decoder parameter and to the encoder output (CLS included) must agree, for both decoder modes.

Tolerances (errors are |ours - oracle| / |oracle| over whole tensors). The decoder runs in float64
on both sides (`jax.enable_x64` inside the test only), so its predictions agree to float64 rounding:
1e-12 (seen: 7e-16). `losses.mae_targets` / `mae_loss` compute in float32 by design
(aasp_jax/losses.py), so the targets, the loss and every gradient (whose cotangent is the float32
loss's) carry float32 rounding, 6e-8 per operation: 1e-6 (seen: at most 7e-8). The float32 decoder
is also held to the float64 oracle, at 1e-5 (seen: 4e-7 after 2 blocks).
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from aasp_jax import losses, masking  # noqa: E402
from aasp_jax.audio import decode, fbank_host, presets  # noqa: E402
from aasp_jax.models import build  # noqa: E402
from aasp_jax.models.mae_decoder import AudioMaeDecoder  # noqa: E402
from configs import pretrain  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PATCH = 16
GRID = (16, 8)  # 256 frames x 128 mel bins
CLIPS = ('loop_amen.flac', 'ambi_choir.flac')
CLONES = 2
MASK_RATIO = 0.8
ENC_WIDTH = 48
DEC = dict(width=64, depth=2, num_heads=4, out_dim=PATCH * PATCH)
LN_EPS = 1e-6  # Audio-MAE's norm_layer: partial(nn.LayerNorm, eps=1e-6), models_mae.py:434-439
WINDOW, SHIFT = (4, 4), (2, 0)  # models_mae.py:76-81 (no custom patch), 88-91

# ------------------------------------------------------------------- the oracle (Audio-MAE bd60e29)


def am_pos_embed(dim, grid_hw):
  """util/pos_embed.py:38-85, get_2d_sincos_pos_embed_flexible with cls_token=True: [1 + H*W, dim].

  Half of the channels encode the first meshgrid output (the width = frequency index), half the
  height = time index; a zero row for the CLS token."""

  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  gw, gh = np.meshgrid(
    np.arange(grid_hw[1], dtype=np.float32), np.arange(grid_hw[0], dtype=np.float32)
  )
  emb = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
  # models_mae.py:153-156 copies the table into a float32 parameter.
  return np.concatenate([np.zeros([1, dim]), emb], axis=0).astype(np.float32)


def am_patchify(imgs, p):
  """models_mae.py:179-210 (audio, no custom patch: 197-203): [N, 1, H, W] -> [N, h*w, p*p]."""
  n, _, hh, ww = imgs.shape
  h, w = hh // p, ww // p
  x = imgs.reshape(n, 1, h, p, w, p)
  x = torch.einsum('nchpwq->nhwpqc', x)
  return x.reshape(n, h * w, p * p)


def am_random_masking(n, length, mask_ratio, generator):
  """models_mae.py:225-250 (the ids only; torch.rand from a seeded generator): ids_keep, mask
  (1 = removed) and ids_restore."""
  len_keep = int(length * (1 - mask_ratio))
  noise = torch.rand(n, length, generator=generator)
  ids_shuffle = torch.argsort(noise, dim=1)
  ids_restore = torch.argsort(ids_shuffle, dim=1)
  mask = torch.ones([n, length], dtype=torch.float64)
  mask[:, :len_keep] = 0
  mask = torch.gather(mask, dim=1, index=ids_restore)
  return ids_shuffle[:, :len_keep], mask, ids_restore


def am_forward_loss(imgs, pred, mask, norm_pix_loss, p):
  """models_mae.py:401-417: the mean over pixels per patch, averaged over the removed patches."""
  target = am_patchify(imgs, p)
  if norm_pix_loss:
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # unbiased, torch's default
    target = (target - mean) / (var + 1.0e-6) ** 0.5
  loss = ((pred - target) ** 2).mean(dim=-1)
  return (loss * mask).sum() / mask.sum(), target


def _ln(x, w, name):
  return F.layer_norm(x, x.shape[-1:], w[f'{name}.weight'], w[f'{name}.bias'], LN_EPS)


def _mlp(x, w, name, act):
  """timm Mlp (and timm_patch/swin_transformer.py:12-33): fc1, activation, fc2 (no dropout)."""
  return F.linear(
    act(F.linear(x, w[f'{name}.fc1.weight'], w[f'{name}.fc1.bias'])),
    w[f'{name}.fc2.weight'],
    w[f'{name}.fc2.bias'],
  )


def am_vit_block(x, w, name, heads):
  """timm 0.3.2 vision_transformer.py Block + Attention (models_mae.py:112-114 builds them with
  qkv_bias=True): pre-norm; fused qkv split [3, heads, head_dim]; softmax(q k^T / sqrt(head_dim)).
  """
  b, n, c = x.shape
  h = _ln(x, w, f'{name}.norm1')
  qkv = F.linear(h, w[f'{name}.attn.qkv.weight'], w[f'{name}.attn.qkv.bias'])
  q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
  attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
  h = (attn @ v).transpose(1, 2).reshape(b, n, c)
  x = x + F.linear(h, w[f'{name}.attn.proj.weight'], w[f'{name}.attn.proj.bias'])
  return x + _mlp(_ln(x, w, f'{name}.norm2'), w, f'{name}.mlp', F.gelu)


def am_window_partition(x, ws):
  """timm_patch/swin_transformer.py:45-57."""
  b, h, wd, c = x.shape
  x = x.view(b, h // ws[0], ws[0], wd // ws[1], ws[1], c)
  return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws[0], ws[1], c)


def am_window_reverse(windows, ws, feat):
  """timm_patch/swin_transformer.py:59-73."""
  h, wd = feat
  b = int(windows.shape[0] / (h * wd / ws[0] / ws[1]))
  x = windows.view(b, h // ws[0], wd // ws[1], ws[0], ws[1], -1)
  return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, wd, -1)


def am_calc_window_shift(feat, window, shift):
  """timm_patch/swin_transformer.py:282-285."""
  ws = [f if f <= w else w for f, w in zip(feat, window)]
  ss = [0 if f <= w else s for f, w, s in zip(feat, ws, shift)]
  return tuple(ws), tuple(ss)


def am_attention_mask(feat, ws, ss):
  """timm_patch/swin_transformer.py:287-311: region ids after the roll, -100 across regions."""
  if not any(ss):
    return None
  h, wd = feat
  img_mask = torch.zeros((1, h, wd, 1), dtype=torch.float64)
  cnt = 0
  for hs in (slice(0, -ws[0]), slice(-ws[0], -ss[0]), slice(-ss[0], None)):
    for wsl in (slice(0, -ws[1]), slice(-ws[1], -ss[1]), slice(-ss[1], None)):
      img_mask[:, hs, wsl, :] = cnt
      cnt += 1
  mask_windows = am_window_partition(img_mask, ws).view(-1, ws[0] * ws[1])
  attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
  return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


def am_relative_bias(w, name, ws, heads):
  """timm_patch/swin_transformer.py:121-131 and 144-157: the meta-MLP (2 -> 384 -> heads, ReLU;
  its dropout 0.1 is off, as in eval mode) on log-spaced offsets, as [1, heads, area, area]."""
  coords = torch.stack(torch.meshgrid([torch.arange(ws[0]), torch.arange(ws[1])], indexing='ij'))
  coords = coords.flatten(1)
  rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).reshape(-1, 2).double()
  rel_log = torch.sign(rel) * torch.log(1.0 + rel.abs())
  bias = _mlp(rel_log, w, f'{name}.meta_mlp', F.relu)
  area = ws[0] * ws[1]
  return bias.transpose(1, 0).reshape(heads, area, area).unsqueeze(0)


def am_window_attention(x, w, name, ws, heads, mask):
  """timm_patch/swin_transformer.py:169-198: scaled cosine attention, temperature clamped at 0.01,
  plus the relative bias and the shift mask."""
  bw, length, c = x.shape
  qkv = F.linear(x, w[f'{name}.qkv.weight'], w[f'{name}.qkv.bias'])
  q, k, v = qkv.view(bw, length, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
  denom = torch.norm(q, dim=-1, keepdim=True) @ torch.norm(k, dim=-1, keepdim=True).transpose(
    -2, -1
  )
  attn = q @ k.transpose(-2, -1) / denom.clamp(min=1e-6)
  attn = attn / w[f'{name}.tau'].clamp(min=0.01).reshape(1, heads, 1, 1)
  attn = attn + am_relative_bias(w, name, ws, heads)
  if mask is not None:
    num_win = mask.shape[0]
    attn = attn.view(bw // num_win, num_win, heads, length, length) + mask.unsqueeze(1).unsqueeze(0)
    attn = attn.view(-1, heads, length, length)
  x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(bw, length, -1)
  return F.linear(x, w[f'{name}.proj.weight'], w[f'{name}.proj.bias'])


def am_swin_block(x, w, name, heads, feat, window, shift):
  """timm_patch/swin_transformer.py:214-376 (SwinTransformerBlock, extra_norm=False, no dropout):
  residual post-norm, x + norm1(shifted window attention), x + norm2(mlp)."""
  ws, ss = am_calc_window_shift(feat, window, shift)
  b, length, c = x.shape
  y = x.view(b, feat[0], feat[1], c)
  if any(ss):
    y = torch.roll(y, shifts=(-ss[0], -ss[1]), dims=(1, 2))
  y = am_window_partition(y, ws).view(-1, ws[0] * ws[1], c)
  y = am_window_attention(y, w, f'{name}.attn', ws, heads, am_attention_mask(feat, ws, ss))
  y = am_window_reverse(y.view(-1, ws[0], ws[1], c), ws, feat)
  if any(ss):
    y = torch.roll(y, shifts=(ss[0], ss[1]), dims=(1, 2))
  x = x + _ln(y.reshape(b, length, c), w, f'{name}.norm1')
  return x + _ln(_mlp(x, w, f'{name}.mlp', F.gelu), w, f'{name}.norm2')


def am_forward_decoder(x, ids_restore, w, decoder_mode, depth, heads, feat):
  """models_mae.py:358-399 (forward_decoder), with the blocks models_mae.py:82-114 builds: for
  decoder_mode=1, Swin blocks shifted by (2, 0) at odd indices; for 0, ViT blocks."""
  x = F.linear(x, w['decoder_embed.weight'], w['decoder_embed.bias'])
  mask_tokens = w['mask_token'].repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
  x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
  x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
  x = torch.cat([x[:, :1, :], x_], dim=1)
  x = x + w['decoder_pos_embed']
  if decoder_mode != 0:
    x = x[:, 1:, :]
  for i in range(depth):
    name = f'decoder_blocks.{i}'
    if decoder_mode == 1:
      x = am_swin_block(x, w, name, heads, feat, WINDOW, SHIFT if i % 2 else (0, 0))
    else:
      x = am_vit_block(x, w, name, heads)
  x = F.layer_norm(x, x.shape[-1:], w['decoder_norm.weight'], w['decoder_norm.bias'], LN_EPS)
  pred = F.linear(x, w['decoder_pred.weight'], w['decoder_pred.bias'])
  return pred if decoder_mode != 0 else pred[:, 1:, :]


# -------------------------------------------------- our parameters in Audio-MAE's state-dict layout

_QKV = ('query', 'key', 'value')


def _torch_name(path):
  """(Audio-MAE state-dict name, third of the fused qkv or None, transposed) of our leaf `path`."""
  *mods, leaf = path
  transposed = leaf == 'kernel'
  suffix = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}.get(leaf, leaf)
  if not mods:  # mask_token
    return leaf, None, False
  top = {'embed': 'decoder_embed', 'norm': 'decoder_norm', 'out_proj': 'decoder_pred'}
  if mods[0] in top:
    return f'{top[mods[0]]}.{suffix}', None, transposed
  block = 'decoder_blocks.' + mods[0].split('_')[1]
  rest = [m for m in mods[1:] if m != 'attn']  # the global block has no 'attn' submodule
  if not rest:  # tau
    return f'{block}.attn.{suffix}', None, False
  if rest[0] in _QKV:
    return f'{block}.attn.qkv.{suffix}', _QKV.index(rest[0]), transposed
  attn = {'out': 'attn.proj', 'meta_fc1': 'attn.meta_mlp.fc1', 'meta_fc2': 'attn.meta_mlp.fc2'}
  name = attn.get(rest[0], '.'.join(rest))  # else norm1, norm2, mlp.fc1, mlp.fc2
  return f'{block}.{name}.{suffix}', None, transposed


def _leaves(params):
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [(tuple(k.key for k in path), np.asarray(v)) for path, v in flat]


def to_audio_mae(params, pos_embed):
  """Our decoder parameters as Audio-MAE's float64 tensors (requires_grad), by state-dict name."""
  parts = {}
  for path, value in _leaves(params):
    name, third, transposed = _torch_name(path)
    parts.setdefault(name, {})[third] = value.T if transposed else value
  w = {}
  for name, by_third in parts.items():
    value = by_third[None] if None in by_third else np.concatenate([by_third[i] for i in range(3)])
    w[name] = torch.tensor(value, dtype=torch.float64, requires_grad=True)
  # A fixed table (pos_trainable=False), computed by the oracle, not copied from our side.
  w['decoder_pos_embed'] = torch.tensor(pos_embed[None], dtype=torch.float64)
  return w


def from_audio_mae(grads, params):
  """Audio-MAE's gradients by state-dict name, back in our parameter tree's layout."""

  def one(path, value):
    name, third, transposed = _torch_name(tuple(k.key for k in path))
    g = grads[name].numpy()
    if third is not None:
      g = np.split(g, 3)[third]
    return g.T if transposed else g

  return jax.tree_util.tree_map_with_path(one, params)


def rel_err(got, want, floor=1e-30):
  """|got - want| / max(|want|, floor), Frobenius norms."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), floor))


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope='module')
def case():
  """Two real clips' normalised log-mel, Audio-MAE's masks for their clones, encoder outputs."""
  preset = presets.get_preset('eat_audiomae', target_length=GRID[0] * PATCH)
  x_btf = np.stack(
    [
      fbank_host.features(decode.load_audio(f'{REPO_ROOT}/data/sonicpi/audio/{c}', preset), preset)
      for c in CLIPS
    ]
  ).astype(np.float64)
  rows, length = len(CLIPS) * CLONES, GRID[0] * GRID[1]
  gen = torch.Generator().manual_seed(0)
  ids_keep, mask, ids_restore = am_random_masking(rows, length, MASK_RATIO, gen)
  visible = np.sort(ids_keep.numpy(), axis=1)
  masked = np.stack([np.flatnonzero(m) for m in mask.numpy()])  # ascending
  masks = masking.Masks(
    jnp.asarray(visible, jnp.int32), jnp.asarray(masked, jnp.int32), jnp.asarray(mask.numpy() > 0)
  )
  rng = np.random.default_rng(1)
  # Audio-MAE's encoder output: CLS, then the visible tokens in ids_keep (shuffled) order.
  enc_am = rng.standard_normal((rows, 1 + visible.shape[1], ENC_WIDTH))
  order = np.argsort(ids_keep.numpy(), axis=1)  # ids_keep[order] is ascending = our visible order
  enc_ours = np.take_along_axis(enc_am[:, 1:], order[:, :, None], axis=1)
  return dict(
    x_btf=x_btf,
    imgs_rows=np.repeat(x_btf, CLONES, axis=0)[:, None],
    masks=masks,
    mask=mask,
    ids_restore=ids_restore,
    enc_am=enc_am,
    enc_ours=enc_ours,
    cls=enc_am[:, 0],
    order=order,
  )


def random_params(decoder, case, seed):
  """Random float64 values for every decoder parameter (the tree `init` builds): kernels
  N(0, 1 / fan_in), LayerNorm scales and temperatures 1 + 0.1 N(0, 1), biases and the mask token
  0.1 N(0, 1), so no weight is at a special value (zero bias, unit scale) that could hide a swap."""
  m = case['masks']
  shapes = jax.eval_shape(
    lambda: decoder.init(
      jax.random.key(0), jnp.asarray(case['enc_ours']), m.visible_idx, m.masked_idx, GRID
    )
  )
  rng = np.random.default_rng(seed)

  def draw(path, a):
    noise = rng.standard_normal(a.shape)
    leaf = path[-1].key
    if leaf == 'kernel':
      return noise / np.sqrt(a.shape[0])
    return 1.0 + 0.1 * noise if leaf in ('scale', 'tau') else 0.1 * noise

  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes['params']))


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize('norm_pix_loss', [True, False])
def test_targets_and_loss_are_forward_loss(case, norm_pix_loss):
  rng = np.random.default_rng(2)
  rows, length = case['mask'].shape
  pred_full = rng.standard_normal((rows, length, PATCH * PATCH))
  want, target = am_forward_loss(
    torch.tensor(case['imgs_rows']), torch.tensor(pred_full), case['mask'], norm_pix_loss, PATCH
  )
  ours = losses.mae_targets(jnp.asarray(case['x_btf'], jnp.float32), PATCH, PATCH, norm_pix_loss)
  assert rel_err(np.repeat(ours, CLONES, axis=0), target.numpy()) < 1e-6
  masked = np.asarray(case['masks'].masked_idx)
  got = losses.mae_loss(
    jnp.asarray(np.take_along_axis(pred_full, masked[:, :, None], axis=1), jnp.float32),
    ours,
    case['masks'].masked_idx,
    CLONES,
  )
  assert abs(float(got) - want.item()) < 1e-6 * want.item()


@pytest.mark.parametrize('attention,decoder_mode', [('local', 1), ('global', 0)])
def test_decoder_loss_and_gradients_are_audio_mae(case, attention, decoder_mode):
  m = case['masks']
  with jax.enable_x64(True):
    decoder = AudioMaeDecoder(
      **DEC, attention=attention, dtype=jnp.float64, param_dtype=jnp.float64
    )
    params = random_params(decoder, case, seed=3 + decoder_mode)

    def loss_fn(p, enc, cls):
      pred = decoder.apply({'params': p}, enc, m.visible_idx, m.masked_idx, GRID, cls_rd=cls)
      targets = losses.mae_targets(jnp.asarray(case['x_btf']), PATCH, PATCH, True)
      return losses.mae_loss(pred, targets, m.masked_idx, CLONES), pred

    (loss, pred), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True))(
      params, jnp.asarray(case['enc_ours']), jnp.asarray(case['cls'])
    )
    assert pred.dtype == jnp.float64
  w = to_audio_mae(params, am_pos_embed(DEC['width'], GRID))
  enc = torch.tensor(case['enc_am'], requires_grad=True)
  pred_am = am_forward_decoder(
    enc, case['ids_restore'], w, decoder_mode, DEC['depth'], DEC['num_heads'], GRID
  )
  loss_am, _ = am_forward_loss(torch.tensor(case['imgs_rows']), pred_am, case['mask'], True, PATCH)
  loss_am.backward()

  masked = np.asarray(m.masked_idx)
  pred_am_masked = np.take_along_axis(pred_am.detach().numpy(), masked[:, :, None], axis=1)
  assert rel_err(pred, pred_am_masked) < 1e-12
  assert abs(float(loss) - loss_am.item()) < 1e-6 * loss_am.item()
  want = from_audio_mae({k: v.grad for k, v in w.items() if v.grad is not None}, params)
  # Relative to each gradient's norm, floored at 1e-9 of the whole gradient's: the meta-MLP's output
  # bias shifts a head's logits uniformly, which softmax ignores, so its gradient is 0 in exact
  # arithmetic (both sides give ~1e-18).
  floor = 1e-9 * np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(want)))
  errs = jax.tree.map(lambda g, ref: rel_err(g, ref, floor), grads[0], want)
  bad = {
    jax.tree_util.keystr(k): e for k, e in jax.tree_util.tree_leaves_with_path(errs) if e > 1e-6
  }
  assert not bad, bad
  g_enc = enc.grad.numpy()
  assert rel_err(grads[1], np.take_along_axis(g_enc[:, 1:], case['order'][:, :, None], 1)) < 1e-6
  if decoder_mode == 0:
    assert rel_err(grads[2], g_enc[:, 0]) < 1e-6
  else:  # decoder_mode=1 drops the CLS before its blocks: it gets no gradient on either side
    assert not np.any(np.asarray(grads[2])) and not np.any(g_enc[:, 0])

  # The float32 decoder (how it trains) against the float64 oracle; x64 ended with its context.
  assert jnp.asarray(1.0).dtype == jnp.float32
  params32 = jax.tree.map(lambda a: a.astype(np.float32), params)
  pred32 = jax.jit(
    lambda p: AudioMaeDecoder(**DEC, attention=attention).apply(
      {'params': p},
      jnp.asarray(case['enc_ours'], jnp.float32),
      m.visible_idx,
      m.masked_idx,
      GRID,
      cls_rd=jnp.asarray(case['cls'], jnp.float32),
    )
  )(params32)
  assert rel_err(pred32, pred_am_masked) < 1e-5


def test_meta_mlp_dropout_runs_only_when_asked(case):
  """Audio-MAE trains with dropout 0.1 on its meta-MLP; here only with deterministic=False."""
  m = case['masks']
  decoder = AudioMaeDecoder(**DEC, attention='local')
  params = jax.tree.map(lambda a: a.astype(np.float32), random_params(decoder, case, seed=5))
  args = (jnp.asarray(case['enc_ours'][:1], jnp.float32), m.visible_idx[:1], m.masked_idx[:1], GRID)

  @jax.jit
  def run(p):
    drop = lambda k: decoder.apply(  # noqa: E731
      {'params': p}, *args, deterministic=False, rngs={'dropout': jax.random.key(k)}
    )
    return decoder.apply({'params': p}, *args), drop(0), drop(0), drop(1)

  plain, a, same, other = run(params)
  assert not np.allclose(a, plain) and not np.allclose(a, other)
  np.testing.assert_array_equal(a, same)


def test_refusals(case):
  m = case['masks']
  enc = jnp.asarray(case['enc_ours'][:1], jnp.float32)
  # Only init may leave out the CLS of the global decoder (it attends to it); the check comes first.
  with pytest.raises(ValueError, match='CLS'):
    AudioMaeDecoder(**DEC, attention='global').apply(
      {'params': {}}, enc, m.visible_idx[:1], m.masked_idx[:1], GRID
    )
  # 6 time patches: 4-patch windows do not tile them (Audio-MAE's reshape would fail as well).
  idx = jnp.arange(48, dtype=jnp.int32)[None]
  with pytest.raises(ValueError, match='tile'):
    jax.eval_shape(
      lambda: AudioMaeDecoder(**DEC).init(
        jax.random.key(0), enc[:, :8], idx[:, :8], idx[:, 8:], (6, 8)
      )
    )


def test_recipe_mae_builds_audio_mae_audioset_decoder():
  """recipe=mae on ViT-B/16: the decoder Audio-MAE pre-trained AudioSet with (decoder_mode=1,
  width 512, 16 blocks, 16 heads, MLP ratio 4), reconstructing 16x16 patches."""
  from aasp_jax.train.objective import AaSPObjective

  cfg = pretrain.get_config('variant=B/16,recipe=mae')
  decoder = build.build_predictor(cfg.model)
  assert isinstance(decoder, AudioMaeDecoder)
  assert (
    decoder.attention,
    decoder.width,
    decoder.depth,
    decoder.num_heads,
    decoder.mlp_ratio,
  ) == ('local', 512, 16, 16, 4.0)
  assert (decoder.window, decoder.shift, decoder.meta_hidden) == (WINDOW, SHIFT, 384)
  assert AaSPObjective.from_config(cfg).predictor.out_dim == PATCH * PATCH
