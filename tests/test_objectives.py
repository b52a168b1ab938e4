"""Objective switches: MAE, EAT's loss scale / CLS reduction / FFN targets, the masked stem input
and the context metric, each checked against a numpy re-statement or the behaviour it claims."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_vit
import train_helpers
from aasp_jax import configuration, losses, masking
from aasp_jax.models.conv_stem import ConvPatchStem
from aasp_jax.models.vit import Encoder, stack_blocks
from aasp_jax.train import health, objective as objective_lib, step as step_lib
from configs import common, pretrain, quickstart


def rng(seed):
  return np.random.default_rng(seed)


def numpy_patches(x, pt, pf):
  """[B, T, F] -> [B, N, pt * pf] by slicing each patch out of the grid, time-major."""
  b, t, f = x.shape
  out = []
  for i in range(t // pt):
    for j in range(f // pf):
      out.append(x[:, i * pt : (i + 1) * pt, j * pf : (j + 1) * pf].reshape(b, -1))
  return np.stack(out, axis=1)


def random_indices(r, num_rows, num_tokens, k):
  return np.stack([r.choice(num_tokens, k, replace=False) for _ in range(num_rows)]).astype(
    np.int32
  )


# ------------------------------------------------------------------------------------------- losses


def test_patchify_matches_numpy_and_the_stem_token_order():
  pt, pf = 8, 4  # not square, so a swapped axis cannot pass
  x = rng(0).normal(size=(2, 32, 24)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(losses.patchify(x, pt, pf)), numpy_patches(x, pt, pf))
  # A conv stem whose kernel copies pixel p of its patch to channel p emits the patches themselves;
  # flattened as Encoder.embed flattens the grid, its token n is patch n.
  stem = ConvPatchStem(embed_dim=pt * pf, patch_t=pt, patch_f=pf)
  kernel = np.eye(pt * pf, dtype=np.float32).reshape(pt, pf, 1, pt * pf)
  grid = stem.apply({'params': {'proj': {'kernel': kernel, 'bias': np.zeros(pt * pf)}}}, x)
  np.testing.assert_allclose(
    np.asarray(grid).reshape(2, -1, pt * pf), losses.patchify(x, pt, pf), atol=1e-6
  )
  with pytest.raises(ValueError, match='tile'):
    losses.patchify(x, 5, 4)


def test_mae_targets_and_loss_match_numpy():
  r = rng(1)
  pt, pf, b, m, k = 8, 4, 2, 3, 10
  x = r.normal(2.0, 3.0, size=(b, 32, 24)).astype(np.float32)
  patches = numpy_patches(x.astype(np.float64), pt, pf)
  mean = patches.mean(-1, keepdims=True)
  var = patches.var(-1, ddof=1, keepdims=True)  # torch's Tensor.var, as Audio-MAE calls it
  want = (patches - mean) / np.sqrt(var + 1e-6)
  targets = losses.mae_targets(x, pt, pf)
  np.testing.assert_allclose(targets, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(losses.mae_targets(x, pt, pf, False), patches, rtol=1e-6)

  n = patches.shape[1]
  pred = r.normal(size=(b * m, k, pt * pf)).astype(np.float32)
  idx = random_indices(r, b * m, n, k)
  per_patch = [
    np.mean((pred[row, j] - want[row // m, idx[row, j]]) ** 2)
    for row in range(b * m)
    for j in range(k)
  ]
  got = losses.mae_loss(pred, targets, idx, m)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), np.mean(per_patch), rtol=1e-5)


def test_eat_loss_scale_and_summed_cls_match_numpy():
  r = rng(2)
  b, m, n, k, d = 2, 3, 12, 5, 16
  pred = r.normal(size=(b * m, k, d)).astype(np.float32)
  targets = r.normal(size=(b, n, d)).astype(np.float32)
  idx = random_indices(r, b * m, n, k)
  cls = r.normal(size=(b * m, d)).astype(np.float32)

  def token(e, scale):  # EAT's d2v_loss per token: sum_D e^2 * (1 / sqrt(D)); ours: mean_D e^2
    return np.sum(e**2) / math.sqrt(d) if scale == 'eat' else np.mean(e**2)

  for scale in losses.LOSS_SCALES:
    want = np.mean(
      [
        token(pred[row, j] - targets[row // m, idx[row, j]], scale)
        for row in range(b * m)
        for j in range(k)
      ]
    )
    got = losses.frame_loss(pred, targets, idx, m, scale)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, err_msg=scale)
    per_row = [token(cls[row] - targets[row // m].mean(0), scale) for row in range(b * m)]
    for reduction, reduce in (('mean', np.mean), ('sum', np.sum)):
      got = losses.utterance_loss(cls, targets, m, scale, reduction)
      np.testing.assert_allclose(float(got), reduce(per_row), rtol=1e-5, err_msg=reduction)
  with pytest.raises(ValueError, match='loss_scale'):
    losses.frame_loss(pred, targets, idx, m, 'sum')
  with pytest.raises(ValueError, match='utterance_reduction'):
    losses.utterance_loss(cls, targets, m, 'mean', 'max')


# ----------------------------------------------------------------------------------- FFN targets

T, F, P, D, DEPTH, HEADS = 32, 16, 8, 16, 2, 2


def small_encoder(scan_layers=False, remat=False):
  return Encoder(
    stem=ConvPatchStem(embed_dim=D, patch_t=P, patch_f=P),
    width=D,
    depth=DEPTH,
    num_heads=HEADS,
    mlp_dim=32,
    max_time_patches=16,
    scan_layers=scan_layers,
    remat=remat,
  )


@pytest.fixture(scope='module')
def ffn_setup():
  """(x, unrolled params, numpy FFN outputs [L, B, N, D], numpy block outputs [L, B, N, D])."""
  x = jnp.asarray(rng(3).normal(size=(2, T, F)), jnp.float32)
  enc = small_encoder()
  params = nn.meta.unbox(jax.jit(enc.init)(jax.random.key(0), x)['params'])
  # Non-zero biases, so every parameter of the MLP branch shows in the comparison.
  params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(5), a.shape), params)
  tokens, _ = jax.jit(functools.partial(enc.apply, method='embed'))({'params': params}, x)

  # Reference: the blocks in numpy from their own parameters, keeping norm2 -> MLP per block.
  p = numpy_vit.to_numpy(params)
  h = np.concatenate([np.broadcast_to(p['cls'], (2, 1, D)), np.asarray(tokens, np.float64)], 1)
  ffn_ref, res_ref = [], []
  for i in range(DEPTH):
    blk = p[f'blocks_{i}']
    ln1 = numpy_vit.layer_norm(h, blk['norm1'])
    h = h + numpy_vit.attention(ln1, ln1, blk['attn'], HEADS)
    mlp_in = numpy_vit.layer_norm(h, blk['norm2'])
    ffn = numpy_vit.dense_general(
      numpy_vit.gelu(numpy_vit.dense_general(mlp_in, blk['mlp']['fc1'])), blk['mlp']['fc2']
    )
    h = h + ffn
    ffn_ref.append(ffn[:, 1:])
    res_ref.append(h[:, 1:])
  return x, params, np.stack(ffn_ref), np.stack(res_ref)


@pytest.mark.parametrize(
  'scan_layers,remat', [(False, False), (False, True), (True, False), (True, True)]
)
def test_ffn_layers_are_the_mlp_branch_before_the_residual_add(ffn_setup, scan_layers, remat):
  x, params, ffn_ref, res_ref = ffn_setup
  model = small_encoder(scan_layers, remat)
  variables = {'params': stack_blocks(params, DEPTH) if scan_layers else params}

  @functools.partial(jax.jit, static_argnums=0)
  def layers(source, v):
    return model.apply(v, x, return_layers=True, layer_source=source)

  out_ffn, out_res = layers('ffn', variables), layers('residual', variables)
  np.testing.assert_allclose(out_ffn['layers'], ffn_ref, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(out_res['layers'], res_ref, atol=2e-5, rtol=1e-4)
  assert not np.allclose(out_ffn['layers'], out_res['layers'], atol=1e-2)
  # The source of the reported layers changes nothing else.
  np.testing.assert_array_equal(out_ffn['tokens'], out_res['tokens'])
  with pytest.raises(ValueError, match='layer_source'):
    layers('attn', variables)


# ------------------------------------------------------------------------- objective-level checks


def load(arg='', overrides=()):
  cfg = configuration.load_config(
    f'configs/pretrain.py:variant=tiny,target_length=64{"," + arg if arg else ""}',
    [*train_helpers.TINY, *overrides],
  )
  return cfg, objective_lib.AaSPObjective.from_config(cfg)


def numpy_pixel_mask(mask_n, grid, patch):
  out = np.zeros((grid[0] * patch[0], grid[1] * patch[1]), bool)
  for n in np.flatnonzero(mask_n):
    t, f = divmod(int(n), grid[1])
    out[t * patch[0] : (t + 1) * patch[0], f * patch[1] : (f + 1) * patch[1]] = True
  return out


def test_stem_input_masked_hides_masked_patches_from_visible_tokens():
  cfg, masked_obj = load(overrides=['objective.stem_input=masked'])  # the AaPE stem
  full_obj = dataclasses.replace(masked_obj, stem_input='full')
  b, m = cfg.global_batch, masked_obj.num_clones
  r = rng(4)
  x = jnp.asarray(r.normal(size=(b, 64, 128)), jnp.float32)
  params = nn.meta.unbox(jax.jit(masked_obj.encoder.init)(jax.random.key(0), x[:1])['params'])
  masks = masking.inverse_block_mask(jax.random.key(1), b * m, masked_obj.grid, 0.8, 5)
  pix0 = numpy_pixel_mask(np.asarray(masks.mask[0]), masked_obj.grid, masked_obj.patch)
  # Row 0's stem input is its clip with exactly its masked patches zeroed.
  masked_x = step_lib.masked_log_mel(masked_obj, x, masks.mask)
  np.testing.assert_array_equal(masked_x[0], np.where(pix0, 0.0, x[0]))
  np.testing.assert_array_equal(
    masked_x[m],
    np.where(
      numpy_pixel_mask(np.asarray(masks.mask[m]), masked_obj.grid, masked_obj.patch), 0.0, x[1]
    ),
  )

  # Perturb clip 0 inside row 0's masked patches only.
  x2 = x.at[0].add(jnp.where(pix0, 3.0 * jnp.asarray(r.normal(size=pix0.shape), jnp.float32), 0.0))
  tokens_masked = jax.jit(functools.partial(step_lib.student_tokens, masked_obj))
  tokens_full = jax.jit(functools.partial(step_lib.student_tokens, full_obj))
  # AaPE's gate starts at 0 (the plain, patch-local conv stem): both inputs then give the same
  # visible tokens, which checks the per-clone gather and positions.
  np.testing.assert_allclose(
    tokens_masked(params, x, masks), tokens_full(params, x, masks), atol=1e-5
  )
  params = dict(params, stem=dict(params['stem'], gate=jnp.ones_like(params['stem']['gate'])))
  np.testing.assert_array_equal(
    tokens_masked(params, x, masks)[0], tokens_masked(params, x2, masks)[0]
  )
  changed = jnp.abs(tokens_full(params, x, masks)[0] - tokens_full(params, x2, masks)[0]).max()
  assert float(changed) > 1e-3  # the 31-frame kernel (and the per-clip Lambda) see masked frames


def test_eat_switches_change_what_they_claim():
  cfg, base = load('stem=conv')
  params = nn.meta.unbox(jax.jit(base.init_params)(jax.random.key(0)))
  b, m, d = cfg.global_batch, base.num_clones, cfg.model.width
  x = jnp.asarray(rng(5).normal(size=(b, 64, 128)), jnp.float32)
  masks = masking.inverse_block_mask(jax.random.key(1), b * m, base.grid, 0.8, 5)

  targets = jax.jit(step_lib.teacher_forward, static_argnums=0)
  res, ffn = (
    targets(base, params['encoder'], x),
    targets(dataclasses.replace(base, target_layers='ffn'), params['encoder'], x),
  )
  assert not np.allclose(res, ffn, atol=1e-2)
  np.testing.assert_allclose(ffn.std(-1), 1.0, atol=1e-3)  # still layer-normalised

  def parts(obj):
    loss = jax.jit(functools.partial(step_lib.student_loss, obj))
    return loss(params, x, res, masks)[1]

  ref = parts(dataclasses.replace(base, contrastive_weight=0.0))
  eat = parts(
    dataclasses.replace(base, contrastive_weight=0.0, loss_scale='eat', utterance_reduction='sum')
  )
  # sum_D e^2 / sqrt(D) = sqrt(D) * mean_D e^2, and the sum over the R = B * M rows is R times
  # their mean.
  np.testing.assert_allclose(eat['frame_loss'], math.sqrt(d) * ref['frame_loss'], rtol=1e-5)
  np.testing.assert_allclose(
    eat['utterance_loss'], b * m * math.sqrt(d) * ref['utterance_loss'], rtol=1e-5
  )
  assert 'frame_loss_shuffled' not in ref


def test_mae_recipe_trains_without_a_teacher_and_logs_the_context_metric(monkeypatch):
  def no_teacher(*args):
    raise AssertionError('objective.kind=mae must not run the teacher')

  monkeypatch.setattr(step_lib, 'teacher_forward', no_teacher)
  cfg, objective, tx, schedule, _, state, batch = train_helpers.setup(
    'stem=conv,recipe=mae',
    ['objective.context_metric=true', 'optimizer.lr=0.1', 'optimizer.warmup_fraction=0.0'],
  )
  assert objective.kind == 'mae' and objective.contrastive_weight == 0.0
  pixels = cfg.model.patch_t * cfg.model.patch_f
  assert state.params['predictor']['out_proj']['kernel'].shape[-1] == pixels
  step = jax.jit(
    functools.partial(
      step_lib.train_step, objective=objective, tx=tx, schedule=schedule, opt_cfg=cfg.optimizer
    )
  )
  history = []
  for i in range(8):
    state, metrics = step(state, batch, jax.random.key(0))
    metrics = {k: float(v) for k, v in metrics.items()}
    health.check_metrics(metrics, i, cfg.objective)
    history.append(metrics)
  first = history[0]
  assert first['utterance_loss'] == 0.0 and first['contrastive_loss'] == 0.0
  np.testing.assert_allclose(first['loss'], first['frame_loss'], rtol=1e-6)
  # Normalised patches: every pixel position of the targets has a std near 1.
  assert 0.5 < first['target_std'] < 1.5
  assert (
    np.isfinite(first['frame_loss_shuffled'])
    and first['frame_loss_shuffled'] != first['frame_loss']
  )
  assert np.mean([h['frame_loss'] for h in history[-3:]]) < first['frame_loss']
  assert all(np.isfinite(h['loss']) for h in history)
  assert int(state.step) == 8
  with pytest.raises(ValueError, match='teacher_per_clone'):
    step_lib.train_step(
      state,
      batch,
      jax.random.key(0),
      objective=objective,
      tx=tx,
      schedule=schedule,
      opt_cfg=cfg.optimizer,
      teacher_per_clone=True,
    )


# ---------------------------------------------------------------------------------------- configs


def flat(cfg):
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, f'{prefix}{k}.')
      else:
        out[f'{prefix}{k}'] = v

  walk(cfg.to_dict(), '')
  return out


def changed(arg):
  base, new = flat(pretrain.get_config('variant=tiny')), flat(pretrain.get_config(arg))
  assert base.keys() == new.keys()
  return {k: new[k] for k in base if base[k] != new[k]}


def test_apply_recipe_sets_exactly_the_listed_fields():
  assert changed('variant=tiny,recipe=aasp') == {}
  # EAT is AaSP with exactly these switches (tests/test_eat_step.py proves the step).
  eat = {
    'model.stem': 'conv',
    'model.block_norm': 'post',
    'model.posemb': 'sincos_mae',
    'model.init': 'eat',
    'model.predictor.kind': 'cnn',
    'model.predictor.width': 0,
    'model.predictor.cnn_input_proj': False,
    'model.predictor.cnn_norm_affine': False,
    'model.predictor.cnn_norm_eps': 1e-5,
    'model.predictor.cnn_mask_fill': 'noise',
    'objective.contrastive_weight': 0.0,
    'objective.loss_scale': 'eat',
    'objective.utterance_reduction': 'eat',
    'objective.target_layers': 'ffn',
    'objective.mask_centres': 'eat',
    'optimizer.adam': 'fairseq',
    'optimizer.decay_params': 'all',
    'optimizer.warmup_fraction': 53_333 / 400_000,
  }
  assert changed('variant=tiny,recipe=eat') == eat
  # The recipe runs after the stem / predictor arguments, so it wins over them.
  assert changed('variant=tiny,stem=aape,predictor=cross_attention,recipe=eat') == eat
  assert changed('variant=tiny,recipe=mae') == {
    'model.predictor.kind': 'mae',
    'objective.kind': 'mae',
    'objective.contrastive_weight': 0.0,
  }
  with pytest.raises(ValueError, match='recipe'):
    common.apply_recipe(pretrain.get_config('variant=tiny'), 'data2vec')
  # The quick-start config passes its argument through, and the keys survive load and validate.
  assert quickstart.get_config('recipe=mae').objective.kind == 'mae'
  cfg = configuration.load_config(
    'configs/pretrain.py:variant=tiny,recipe=eat',
    ['objective.stem_input=masked', 'objective.context_metric=true'],
  )
  assert cfg.objective.stem_input == 'masked' and cfg.objective.context_metric


@pytest.mark.parametrize(
  'key', ['kind', 'loss_scale', 'utterance_reduction', 'target_layers', 'stem_input']
)
def test_bad_switch_values_fail_naming_the_key(key):
  cfg = configuration.load_config('configs/pretrain.py:variant=tiny', [f'objective.{key}=bogus'])
  with pytest.raises(ValueError, match=f'objective.{key}=.bogus.*choose one of'):
    objective_lib.AaSPObjective.from_config(cfg)
