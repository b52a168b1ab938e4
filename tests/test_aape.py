"""Tests of the AaPE patch stem (aasp_jax.models.aape): wiring, init, ranges, and aliasing."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aasp_jax.models import aape
from aasp_jax.models import sblu
from aasp_jax.models.conv_stem import ConvPatchStem

# Small shapes for properties that do not need the full [1024, 128] log-mel.
SMALL = dict(embed_dim=16, num_modes=4, kernel_size=15, num_mod_bands=16, lambda_hidden=32)


# Test data and parameter edits are made in numpy: every eager jax op on a new shape compiles, and
# those compiles would dominate the runtime of this file.


def _x(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _perturb(params, scale, seed):
  """params + scale * N(0, 1) noise, leaf by leaf (moves weights off their init)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda v: np.asarray(v) + scale * rng.normal(size=v.shape).astype(v.dtype), params
  )


def _key(seed):
  # The 'rbg' generator: with jax_threefry_partitionable (set by aasp_jax) XLA:CPU takes seconds to
  # compile threefry for each init, which would dominate this file's runtime.
  return jax.random.key(seed, impl='rbg')


def _init_params(model, x, seed=0):
  # Jitted: op-by-op execution of a Flax module costs seconds on CPU, a compile much less.
  variables = jax.jit(model.init)(_key(seed), x)
  return nn.unbox(variables['params'])


def _apply_with_intermediates(model, params, x):
  @jax.jit
  def run(params, x):
    tokens, state = model.apply({'params': params}, x, mutable=['intermediates'])
    return tokens, {name: value[0] for name, value in state['intermediates'].items()}

  return run(params, x)


# ---------------------------------------------------------------------------------------------
# Init: AaPE starts as the plain stem.


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_gate_zero_equals_plain_stem(dtype):
  x = _x((2, 64, 32))
  model = aape.AaPE(**SMALL, dtype=dtype)
  params = _init_params(model, x, 3)
  stem = ConvPatchStem(SMALL['embed_dim'], dtype=dtype)
  run_aape = jax.jit(lambda p, x: model.apply({'params': p}, x))
  run_stem = jax.jit(lambda p, x: stem.apply({'params': p}, x))
  tokens = run_aape(params, x)
  plain = run_stem(params['conv_stem'], x)
  assert tokens.dtype == dtype and plain.dtype == dtype
  np.testing.assert_array_equal(np.asarray(tokens, np.float32), np.asarray(plain, np.float32))
  # The equality is the gate's doing: open it and the AaPE branch shows up.
  params['gate'] = np.ones(params['gate'].shape, np.float32)
  opened = np.asarray(run_aape(params, x), np.float32)
  assert np.abs(opened - np.asarray(plain, np.float32)).max() > 1e-2


def test_concat_fusion_starts_as_stem():
  x = _x((2, 64, 32))
  model = aape.AaPE(**SMALL, fusion='concat')
  params = _init_params(model, x, 3)
  tokens = jax.jit(model.apply)({'params': params}, x)
  plain = jax.jit(ConvPatchStem(SMALL['embed_dim']).apply)({'params': params['conv_stem']}, x)
  np.testing.assert_allclose(tokens, plain, rtol=1e-6, atol=1e-6)
  assert params['fusion_proj']['kernel'].shape == (2 * SMALL['embed_dim'], SMALL['embed_dim'])


@pytest.mark.parametrize('lambda_mode', aape.LAMBDA_MODES)
def test_init_frequencies_tile_the_alias_band(lambda_mode):
  num_modes, kernel_size = 8, 31
  x = _x((3, 64, 48)) * 5.0
  model = aape.AaPE(embed_dim=16, num_modes=num_modes, lambda_mode=lambda_mode)
  _, inter = _apply_with_intermediates(model, _init_params(model, x), x)
  alpha, omega = np.asarray(inter['alpha']), np.asarray(inter['omega'])
  assert alpha.shape == omega.shape == (3, 3, num_modes)
  alpha_min, low, high = sblu.lambda_bounds(kernel_size, 16)
  spacing = (high - low) / num_modes
  # Every clip and group starts from the same evenly spaced grid, whatever the input.
  want = low + spacing * (np.arange(num_modes) + 0.5)
  np.testing.assert_allclose(omega, np.broadcast_to(want, omega.shape), rtol=1e-5)
  np.testing.assert_allclose(np.diff(omega, axis=-1), spacing, rtol=1e-4)
  assert omega.min() < low + spacing and omega.max() > high - spacing
  np.testing.assert_allclose(alpha, alpha_min + spacing / 2, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Lambda encoder: bounded outputs for any input and any weights.


def _extreme_inputs(num_t, num_f):
  rng = np.random.default_rng(0)
  normal = rng.normal(size=(num_t, num_f))
  cases = {
    'normal': normal,
    'huge': 1e6 * normal,
    'huge_constant': np.full((num_t, num_f), 1e6),
    'tiny': 1e-20 * normal,
    'constant': np.full((num_t, num_f), 3.0),
    'zeros': np.zeros((num_t, num_f)),
    'negative': -1e3 * np.abs(normal) - 1e6,
    'square_wave': np.sign(np.sin(np.arange(num_t) * 2.5))[:, None] * np.ones(num_f),
  }
  return list(cases), np.stack(list(cases.values())).astype(np.float32)


@pytest.mark.parametrize('lambda_mode', aape.LAMBDA_MODES)
def test_lambda_encoder_outputs_stay_in_range(lambda_mode):
  chex.clear_trace_counter()
  names, x = _extreme_inputs(64, 32)
  kernel_size, num_modes = 31, 8
  encoder = aape.LambdaEncoder(
    num_modes=num_modes, kernel_size=kernel_size, lambda_mode=lambda_mode
  )
  params = _init_params(encoder, x)
  # Range must not depend on the weights being near init: try large random weights too.
  wild = _perturb(jax.tree.map(np.zeros_like, params), 5.0, 1)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(params, x):
    return encoder.apply({'params': params}, x)

  alpha_min, low, high = sblu.lambda_bounds(kernel_size, 16)
  for which, p in (('init', params), ('wild', wild)):
    alpha, omega = (np.asarray(a) for a in run(p, x))
    assert alpha.shape == omega.shape == (len(names), 2, num_modes)
    for i, name in enumerate(names):
      context = f'{lambda_mode}/{which}/{name}'
      assert np.all(np.isfinite(alpha[i])) and np.all(np.isfinite(omega[i])), context
      assert np.all(alpha[i] > np.float32(alpha_min)), context
      assert np.all(alpha[i] < np.float32(sblu.alpha_max(kernel_size))), context
      assert np.all(omega[i] > np.float32(low)), context
      assert np.all(omega[i] <= np.float32(high)), context
    if which == 'wild' and lambda_mode == 'adaptive':
      # The wild encoder does react to its input (so the range check above was not vacuous).
      assert np.ptp(omega[:, 0, 0]) > 1e-3


def test_fixed_mode_ignores_input_and_adaptive_does_not():
  x = np.stack([_x((64, 32), 1), 10.0 * np.sin(np.arange(64) * 2.0)[:, None] * np.ones(32)])
  for lambda_mode, should_differ in (('fixed', False), ('adaptive', True)):
    encoder = aape.LambdaEncoder(num_modes=4, kernel_size=15, lambda_mode=lambda_mode)
    params = _init_params(encoder, x)
    # Move the weights off init (where the adaptive output layer is zero).
    params = _perturb(params, 0.3, 2)
    _, omega = jax.jit(encoder.apply)({'params': params}, x)
    differs = not np.allclose(omega[0], omega[1])
    assert differs == should_differ, lambda_mode


# ---------------------------------------------------------------------------------------------
# Wiring: the sown features equal the pure-function pipeline, recomputed in numpy.


def test_features_match_reference_pipeline():
  batch, num_t, num_f, patch, num_modes, kernel_size = 2, 32, 32, 16, 2, 7
  x = _x((batch, num_t, num_f), 4) + 2.0
  model = aape.AaPE(
    embed_dim=8, num_modes=num_modes, kernel_size=kernel_size, num_mod_bands=8, lambda_hidden=8
  )
  params = _init_params(model, x)
  params = _perturb(params, 0.5, 5)
  _, inter = _apply_with_intermediates(model, params, x)
  alpha, omega = np.asarray(inter['alpha']), np.asarray(inter['omega'])
  mix = lambda v: np.asarray(v[..., 0]) + 1j * np.asarray(v[..., 1])
  gain_gn = mix(params['mix_in']) * mix(params['mix_out'])
  u = np.asarray(x, np.float64)
  u = u - u.mean(axis=1, keepdims=True)
  half = (kernel_size - 1) // 2
  env = np.zeros((batch, num_t, num_f, num_modes))
  for b in range(batch):
    for f in range(num_f):
      g = f // patch
      for j in range(num_modes):
        m = np.arange(-half, half + 1)
        lam = alpha[b, g, j] + 1j * omega[b, g, j]
        h = 2 * np.sinh(lam / 2) / lam * np.exp(-alpha[b, g, j] * np.abs(m))
        h = h * np.exp(1j * omega[b, g, j] * m) * gain_gn[g, j]
        env[b, :, f, j] = np.log1p(np.abs(np.convolve(u[b, :, f], h, 'same')))
  # Pool the patch's frames; channels are (bin within the group, mode), mode fastest.
  ref = env.reshape(batch, num_t // patch, patch, num_f // patch, patch * num_modes).mean(2)
  np.testing.assert_allclose(inter['features'], ref, rtol=2e-4, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Aliasing: AaPE sees the modulation that the stride-16 stem aliases, and is stable under shifts.

FRAME_RATE = 100.0
ALIAS_T, ALIAS_F, ALIAS_MARGIN = 512, 128, 16
FLOOR, DEPTH = -0.5, 0.2
# Group (16-bin band) -> amplitude-modulation rate in Hz; all far above the 3.125 Hz token Nyquist.
RATES = {1: 12.0, 3: 20.0, 5: 33.0}
INNER = slice(2, ALIAS_T // 16 - 2)


def _box_leakage(omega, patch=16):
  """|D(omega)| of the patch-mean (a length-16 box filter), relative to its DC gain of 1."""
  return abs(math.sin(patch * omega / 2) / (patch * math.sin(omega / 2)))


@pytest.fixture(scope='module')
def alias_inputs():
  """Clips 0..15: the same modulated log-mel delayed by s = 0..15 frames; clip 16: no modulation.

  The clips are windows of one longer signal (ALIAS_MARGIN frames of real content on each side),
  so a shift brings real content, not wrap-around or padding, into the clip. The only edge effects
  are the SBLU's zero 'same' padding ((K - 1) / 2 = 15 frames) and the content entering or leaving;
  both stay within the first and last 2 token rows, which the comparisons leave out (INNER).
  """
  n = np.arange(ALIAS_T + 2 * ALIAS_MARGIN)
  sig = np.full((len(n), ALIAS_F), FLOOR, np.float32)
  for g, hz in RATES.items():
    sig[:, 16 * g : 16 * (g + 1)] += DEPTH * np.sin(2 * np.pi * hz / FRAME_RATE * n + 0.3)[:, None]
  clips = [sig[ALIAS_MARGIN - s : ALIAS_MARGIN - s + ALIAS_T] for s in range(16)]
  clips.append(np.full((ALIAS_T, ALIAS_F), FLOOR, np.float32))
  return np.stack(clips)


@pytest.fixture(scope='module')
def tuned_aape(alias_inputs):
  """A fixed-Lambda AaPE whose modes in each modulated group sit at that group's rate."""
  num_modes, kernel_size = 4, 31
  model = aape.AaPE(embed_dim=32, num_modes=num_modes, kernel_size=kernel_size, lambda_mode='fixed')
  params = _init_params(model, alias_inputs[:1])
  alpha0, _ = aape.initial_lambda(num_modes, kernel_size, 16)
  z_omega = np.array(params['lambda_encoder']['z_omega'])
  for g, hz in RATES.items():
    omega = np.full(num_modes, 2 * np.pi * hz / FRAME_RATE)
    _, z_omega[g] = aape.unconstrain_lambda(alpha0, omega, kernel_size, 16)
  params['lambda_encoder']['z_omega'] = z_omega.astype(np.float32)
  _, inter = _apply_with_intermediates(model, params, alias_inputs)
  return alpha0[0], np.asarray(inter['features']), np.asarray(inter['omega'])


def test_aape_features_see_modulation_the_patch_mean_misses(alias_inputs, tuned_aape):
  alpha0, feats, omega = tuned_aape
  for g, hz in RATES.items():
    w = 2 * np.pi * hz / FRAME_RATE
    np.testing.assert_allclose(omega[0, g], w, rtol=1e-5)
    # What a conv stem's DC-like path keeps of the modulation: the band's stride-16 patch mean.
    box = alias_inputs[:, :, 16 * g : 16 * (g + 1)].reshape(17, ALIAS_T // 16, 256).mean(-1)
    box_gap = np.abs(box[0, INNER] - box[16, INNER]).max() / DEPTH
    leak = _box_leakage(w)
    # AaPE: the pooled envelope of the modulated band vs the same band unmodulated (same mean).
    # expm1 undoes log1p (the envelope is nearly flat within a patch), and dividing by the kernel's
    # peak gain puts it on the box filter's scale (box peak gain = 1): the fraction of the
    # modulation depth that reaches the representation.
    peak_gain = np.abs(np.fft.fft(np.asarray(sblu.sblu_kernel(alpha0, w, 31)), 4096)).max()
    env_gap = (np.expm1(feats[0, INNER, g]) - np.expm1(feats[16, INNER, g])).mean()
    visible = env_gap / (DEPTH * peak_gain)
    feat_gap = np.abs(feats[0, INNER, g] - feats[16, INNER, g]).mean()
    print(
      f'{hz:4.0f} Hz: box leakage analytic {leak:.4f}, measured max {box_gap:.4f}; '
      f'AaPE visible fraction {visible:.3f} (feature gap {feat_gap:.3f} in log1p units)'
    )
    assert box_gap <= leak + 1e-4 and box_gap > 0.9 * leak
    assert leak < 0.07
    # An analytic band-pass passes half of a real sinusoid's amplitude (its +omega half).
    assert 0.4 < visible < 0.6
    assert visible > 5 * leak
  # Bands without modulation give identical features with and without the others' modulation.
  for g in set(range(ALIAS_F // 16)) - set(RATES):
    np.testing.assert_allclose(feats[0, :, g], feats[16, :, g], atol=1e-5)


def test_aape_stable_under_subpatch_shifts_conv_stem_is_not(alias_inputs, tuned_aape):
  _, feats, _ = tuned_aape

  def rel_change(rep):
    # Change caused by the shift, relative to the modulation-driven part of the representation
    # (rep of the clip minus rep of the unmodulated clip), over interior token rows.
    base = rep[0, INNER] - rep[16, INNER]
    return np.array(
      [np.linalg.norm(rep[s, INNER] - rep[0, INNER]) / np.linalg.norm(base) for s in range(1, 16)]
    )

  aape_rel = rel_change(feats)
  print(
    f'AaPE features: relative change over shifts 1..15: mean {aape_rel.mean():.4f}, '
    f'max {aape_rel.max():.4f}'
  )
  assert aape_rel.max() < 0.02
  stem = ConvPatchStem(32)
  run = jax.jit(stem.apply)
  for seed in range(3):
    variables = jax.jit(stem.init)(_key(seed), alias_inputs[:1])
    conv_rel = rel_change(np.asarray(run(variables, alias_inputs)))
    print(
      f'conv stem seed {seed}: relative change over shifts 1..15: '
      f'mean {conv_rel.mean():.3f}, min {conv_rel.min():.3f}'
    )
    assert conv_rel.mean() > 0.2 and conv_rel.min() > 0.05


def test_adaptive_init_modes_cover_the_rates(alias_inputs):
  """With no tuning at all, the evenly spread init modes already pick up every rate."""
  num_modes = 8
  model = aape.AaPE(embed_dim=16, num_modes=num_modes)
  x = alias_inputs[np.array([0, 16])]
  params = _init_params(model, x)
  _, inter = _apply_with_intermediates(model, params, x)
  feats = np.asarray(inter['features'])
  alpha, omega = np.asarray(inter['alpha']), np.asarray(inter['omega'])
  for g, hz in RATES.items():
    gap = np.expm1(feats[0, INNER, g]) - np.expm1(feats[1, INNER, g])
    gap_n = gap.mean(0).reshape(16, num_modes).mean(0)
    best = int(np.argmax(gap_n))
    peak = np.abs(
      np.fft.fft(np.asarray(sblu.sblu_kernel(alpha[0, g, best], omega[0, g, best], 31)), 4096)
    ).max()
    visible = gap_n[best] / (DEPTH * peak)
    print(
      f'{hz:4.0f} Hz at init: best mode omega {omega[0, g, best]:.3f} rad/frame, '
      f'visible fraction {visible:.3f}'
    )
    assert visible > 0.3


# ---------------------------------------------------------------------------------------------
# Every option jits without retracing, in float32 and bfloat16, with finite outputs.

OPTION_CASES = [
  dict(),
  dict(window='one_sided', phase='literal'),
  dict(lambda_mode='fixed', fusion='concat'),
  dict(learn_delta=True, delta=0.8),
  dict(dtype=jnp.bfloat16),
  dict(dtype=jnp.bfloat16, window='one_sided', fusion='concat', lambda_mode='fixed'),
]


def _case_id(options):
  return ','.join(f'{k}={getattr(v, "__name__", v)}' for k, v in options.items()) or 'default'


@pytest.mark.parametrize('options', OPTION_CASES, ids=_case_id)
def test_options_jit_once_and_stay_finite(options):
  chex.clear_trace_counter()
  model = aape.AaPE(**{**SMALL, **options})
  dtype = options.get('dtype', jnp.float32)
  x = _x((2, 64, 32))
  params = _init_params(model, x)
  # Open the fusion so the AaPE branch (and its gradients) is part of the output.
  if 'gate' in params:
    params['gate'] = np.ones(params['gate'].shape, np.float32)
  else:
    params['fusion_proj'] = _perturb(params['fusion_proj'], 0.1, 1)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss_and_grad(params, x):
    def loss(params):
      tokens = model.apply({'params': params}, x)
      return jnp.mean(jnp.square(tokens.astype(jnp.float32))), tokens

    return jax.value_and_grad(loss, has_aux=True)(params)

  (_, tokens), _ = loss_and_grad(params, x)
  (_, tokens2), grads = loss_and_grad(params, 3.0 * x + 1.0)
  for t in (tokens, tokens2):
    chex.assert_shape(t, (2, 4, 2, SMALL['embed_dim']))
    assert t.dtype == dtype
    assert np.all(np.isfinite(np.asarray(t, np.float32)))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(np.asarray(g))), path
  # The analysis parameters learn: the SBLU mixing and the Lambda encoder get gradient.
  assert np.abs(np.asarray(grads['mix_in'])).max() > 0
  assert max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grads['lambda_encoder'])) > 0
  if options.get('learn_delta'):
    assert abs(float(grads['log_delta'])) > 0
    np.testing.assert_allclose(np.exp(params['log_delta']), 0.8, rtol=1e-6)


def test_gradients_finite_for_silent_input():
  model = aape.AaPE(**SMALL)
  x = np.zeros((1, 32, 32), np.float32)
  params = _init_params(model, x)
  params['gate'] = np.ones(params['gate'].shape, np.float32)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x))))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(np.asarray(g))), path


def test_errors():
  with pytest.raises(ValueError, match='T must be a multiple of patch_t'):
    aape.AaPE(**SMALL).init(_key(0), np.zeros((1, 40, 32)))
  with pytest.raises(ValueError, match='F=40'):
    aape.AaPE(**SMALL).init(_key(0), np.zeros((1, 32, 40)))
  with pytest.raises(ValueError, match='odd'):
    aape.AaPE(embed_dim=8, kernel_size=30)
  bad = dict(window='causal', phase='abs', lambda_mode='learned', fusion='add')
  for name, value in bad.items():
    with pytest.raises(ValueError, match=f"AaPE.{name}='{value}' is not valid; expected one of"):
      aape.AaPE(embed_dim=8, **{name: value})
  with pytest.raises(ValueError, match='delta must be positive'):
    aape.AaPE(embed_dim=8, delta=0.0)
  with pytest.raises(ValueError, match="LambdaEncoder.lambda_mode='fixd' is not valid"):
    aape.LambdaEncoder(lambda_mode='fixd')


def test_extreme_parameters_keep_the_tokens_finite():
  """Large Lambda-encoder weights saturate alpha at alpha_max instead of overflowing s(Lambda)."""
  model = aape.AaPE(embed_dim=32, num_modes=2)
  x = jnp.asarray(_x((2, 64, 32), 3))
  variables = model.init(jax.random.key(0, impl='rbg'), x)
  wild = jax.tree.map(lambda a: a + 1.0, variables)  # alpha ~ 2e3 before it was bounded
  tokens, state = model.apply(wild, x + 1.0, mutable=['intermediates'])
  assert np.all(np.isfinite(np.asarray(tokens)))
  alpha = np.asarray(state['intermediates']['alpha'][0])
  np.testing.assert_array_less(alpha, sblu.alpha_max(31))


# ---------------------------------------------------------------------------------------------
# The Lambda encoder against a float64 numpy re-statement, on inputs whose modulation bins are
# zero in exact arithmetic.


def _lambda_encoder_f64(params, x_btf, *, patch_f, kernel_size, patch_t, num_bands, floor):
  """LambdaEncoder('adaptive') in float64 numpy, from its docstring and design section 3: the
  group mean series, first frame then mean removed, |rFFT| / T of bins 1..T/2, log with the floor
  1e-6 + floor * rms / sqrt(T), triangular band pooling, LayerNorm (eps 1e-6), tanh-GELU MLP with
  the group embedding, then sblu.constrain_lambda's affine maps of sigmoids."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x_btf, np.float64)
  batch, num_t, num_f = x.shape
  u = x.reshape(batch, num_t, num_f // patch_f, patch_f).mean(-1)
  u = u - u[:, :1]
  u = u - u.mean(axis=1, keepdims=True)
  spec = np.abs(np.fft.rfft(u, axis=1)[:, 1 : num_t // 2 + 1]) / num_t
  white = np.sqrt((u * u).mean(axis=1, keepdims=True) / num_t)
  logmag = np.log(spec + 1e-6 + floor * white)  # (the module's log1p(|X| / floor) is this
  # minus log(floor), a shift per clip and group that the LayerNorm removes)
  h = np.einsum('bkg,kc->bgc', logmag, aape.modulation_pooling_matrix(num_t, num_bands))
  h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
  h = h * p['norm']['scale'] + p['norm']['bias']
  a = h @ p['hidden']['kernel'] + p['hidden']['bias'] + p['group_embedding']
  a = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
  z = a @ p['out']['kernel'] + p['out']['bias']
  n = z.shape[-1] // 2
  sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
  alpha_min, low, high = sblu.lambda_bounds(kernel_size, patch_t)
  a_lo, a_hi = alpha_min * (1 + sblu._MARGIN), sblu.alpha_max(kernel_size) * (1 - sblu._MARGIN)
  frac = sblu._MARGIN + (1 - 2 * sblu._MARGIN) * sig(z[..., n:])
  return a_lo + (a_hi - a_lo) * sig(z[..., :n]), low + (high - low) * frac


def test_lambda_encoder_is_well_conditioned_on_periodic_and_constant_inputs():
  """A series periodic over the window has zero modulation bins, and a constant one has only
  zeros: in float32 those bins are rounding noise whose value depends on the order of the sums
  (JAX's rFFT, torch's or ONNX's matmul DFT). With the relative floor (SPECTRUM_FLOOR, 40 dB
  under white noise of the group's power) JAX's float32 result stays within 5e-5 of the float64
  re-statement (seen: 1.7e-5); without it (the floor of checkpoints saved before it) the same
  inputs are read ten times worse (seen: 1.7e-4). Weights moved off init (N(0, 0.1) noise, a
  trained model's distance) make the encoder react to its input."""
  kind = dict(num_modes=4, kernel_size=15, num_mod_bands=16, lambda_hidden=32)
  x = _x((3, 128, 32), seed=5)
  x[0] = np.tile(x[0, :32], (4, 1))  # period 32 frames: 3 of every 4 bins are zero
  x[1] = np.tile(x[1, :64], (2, 1))
  x[2, :, :16] = 0.7  # group 0 constant, group 1 noise
  errors = {}
  for floor in (aape.SPECTRUM_FLOOR, 0.0):
    encoder = aape.LambdaEncoder(**kind, spectrum_floor=floor)
    params = _perturb(_init_params(encoder, x), 0.1, 3)
    got = jax.jit(encoder.apply)({'params': params}, x)
    want = _lambda_encoder_f64(
      params, x, patch_f=16, kernel_size=15, patch_t=16, num_bands=16, floor=floor
    )
    errors[floor] = max(
      float(np.max(np.abs(np.asarray(g, np.float64) - w)) / np.max(np.abs(w)))
      for g, w in zip(got, want)
    )
    if floor:
      assert np.ptp(want[1]) > 0.01  # the encoder reacts to its input
  print(f'Lambda encoder relative errors against float64, by floor: {errors}')
  assert errors[aape.SPECTRUM_FLOOR] < 5e-5, errors
  assert errors[0.0] > 5e-5, errors
