"""Tests of the pure SBLU maths (aasp_jax.models.sblu) against independent numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aasp_jax.models import sblu

NFFT = 8192
# (alpha, omega, K, delta): narrow and wide windows, both band edges, short and long kernels.
KERNEL_CASES = [
  (0.31, 0.5, 31, 1.0),
  (1.2, 2.9, 15, 1.0),
  (0.05, math.pi, 63, 0.7),
  (0.6, 0.2, 7, 1.5),
]


def _ref_kernel(alpha, omega, kernel_size, delta, window, phase):
  """The design doc's formula, transcribed in complex128 numpy."""
  half = (kernel_size - 1) // 2
  m = np.arange(-half, half + 1, dtype=np.float64)
  lam = alpha + 1j * omega
  scale = 2.0 * np.sinh(delta * lam / 2.0) / lam
  if window == 'two_sided':
    win = np.exp(-delta * alpha * np.abs(m))
  else:
    win = np.where(m >= 0, np.exp(-delta * alpha * m), 0.0)
  carrier = np.exp(1j * delta * omega * (m if phase == 'analytic' else np.abs(m)))
  return scale * win * carrier


def _response(h_k, nfft=NFFT):
  """|H(theta)| on theta = 2 pi k / nfft, with H(theta) = sum_m h[m] exp(-i theta m)."""
  half = (len(h_k) - 1) // 2
  # The FFT indexes taps from 0; index j holds m = j - half, so undo that delay on the phase.
  theta = 2 * np.pi * np.arange(nfft) / nfft
  return theta, np.fft.fft(np.asarray(h_k, np.complex128), nfft) * np.exp(1j * theta * half)


def _minus3db_width(mag):
  """Width (rad) of the contiguous region around the peak where |H| >= peak / sqrt(2)."""
  peak = int(np.argmax(mag))
  above = mag >= mag[peak] / np.sqrt(2)
  n = len(mag)
  count = 1
  for step in (1, -1):
    j = (peak + step) % n
    while above[j] and count < n:
      count += 1
      j = (j + step) % n
  return count * 2 * np.pi / n


@pytest.mark.parametrize('window', sblu.WINDOWS)
@pytest.mark.parametrize('phase', sblu.PHASES)
@pytest.mark.parametrize('alpha,omega,kernel_size,delta', KERNEL_CASES)
def test_kernel_matches_numpy_formula(alpha, omega, kernel_size, delta, window, phase):
  h = sblu.sblu_kernel(alpha, omega, kernel_size, delta, window, phase)
  assert h.dtype == jnp.complex64 and h.shape == (kernel_size,)
  ref = _ref_kernel(alpha, omega, kernel_size, delta, window, phase)
  np.testing.assert_allclose(np.asarray(h), ref, rtol=2e-5, atol=2e-6 * np.abs(ref).max())


def test_kernel_broadcasts_over_leading_dims():
  alpha = np.array([[0.4, 0.9, 1.3], [0.35, 0.5, 2.0]])
  omega = np.array([[0.3, 1.0, 3.0], [0.7, 2.2, 1.6]])
  h = np.asarray(sblu.sblu_kernel(alpha, omega, 15, window='one_sided'))
  assert h.shape == (2, 3, 15)
  for idx in np.ndindex(2, 3):
    ref = _ref_kernel(alpha[idx], omega[idx], 15, 1.0, 'one_sided', 'analytic')
    np.testing.assert_allclose(h[idx], ref, rtol=2e-5, atol=2e-6 * np.abs(ref).max())


def test_frequency_response_matches_fft():
  h = sblu.sblu_kernel(0.5, 1.3, 31, window='one_sided')
  theta, ref = _response(h)
  pick = np.arange(0, NFFT, 97)
  got = np.asarray(sblu.frequency_response(h, theta[pick]))
  np.testing.assert_allclose(got, ref[pick], rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize('window', sblu.WINDOWS)
@pytest.mark.parametrize('omega', [0.25, 1.257, 2.07, 3.0])
def test_response_peaks_at_omega(window, omega):
  for alpha, kernel_size in ((0.31, 31), (0.8, 15), (0.1, 63)):
    theta, resp = _response(sblu.sblu_kernel(alpha, omega, kernel_size, window=window))
    peak = theta[np.argmax(np.abs(resp))]
    assert abs(peak - omega) <= 2 * np.pi / NFFT, (alpha, kernel_size, peak, omega)


@pytest.mark.parametrize('window', sblu.WINDOWS)
def test_minus3db_width_grows_with_alpha(window):
  alphas = [0.31, 0.5, 0.8, 1.2]
  widths = [
    _minus3db_width(np.abs(_response(sblu.sblu_kernel(a, 1.5, 31, window=window))[1]))
    for a in alphas
  ]
  print(f'{window}: -3 dB widths (rad) for alpha={alphas}: {np.round(widths, 3)}')
  assert np.all(np.diff(widths) > 0), widths
  # For alpha = 1.2 the K = 31 window is untruncated in practice (r^15 ~ 1e-8), so the width must
  # match the infinite window's closed form: |H|^2 falls by 2 where
  # 1 - 2 r cos(d) + r^2 = c (1 - r)^2, r = exp(-alpha), with c = sqrt(2) for the two-sided
  # window (|H| is r-Lorentzian, not its square root) and c = 2 for the one-sided one.
  r = math.exp(-alphas[-1])
  c = math.sqrt(2) if window == 'two_sided' else 2.0
  half_width = math.acos((1 + r * r - c * (1 - r) ** 2) / (2 * r))
  np.testing.assert_allclose(widths[-1], 2 * half_width, atol=2 * 2 * np.pi / NFFT)


def test_literal_phase_responds_at_both_signs():
  # exp(i omega |m|) with a symmetric window is an even function of m, so |H| is even in theta:
  # the formula as quoted cannot tell +omega from -omega, unlike the analytic phase.
  _, lit = _response(sblu.sblu_kernel(0.4, 1.2, 31, phase='literal'))
  _, ana = _response(sblu.sblu_kernel(0.4, 1.2, 31, phase='analytic'))
  k = int(round(1.2 / (2 * np.pi) * NFFT))
  mag_lit, mag_ana = np.abs(lit), np.abs(ana)
  np.testing.assert_allclose(mag_lit[k], mag_lit[-k], rtol=1e-4)
  assert mag_ana[-k] < 0.1 * mag_ana[k]


@pytest.mark.parametrize('window', sblu.WINDOWS)
@pytest.mark.parametrize('phase', sblu.PHASES)
def test_response_gradients_are_finite_nonzero_and_correct(window, phase):
  omega0, offset, kernel_size = 1.1, 0.15, 31

  def mag(alpha, omega):
    h = sblu.sblu_kernel(alpha, omega, kernel_size, window=window, phase=phase)
    return jnp.abs(sblu.frequency_response(h, omega0 + offset))

  def ref_mag(alpha, omega):
    h = _ref_kernel(alpha, omega, kernel_size, 1.0, window, phase)
    m = np.arange(len(h)) - (kernel_size - 1) // 2
    return np.abs(np.sum(h * np.exp(-1j * (omega0 + offset) * m)))

  for alpha in (0.31, 0.6, 1.2):
    g_alpha, g_omega = jax.grad(mag, argnums=(0, 1))(alpha, omega0)
    eps = 1e-5
    fd_alpha = (ref_mag(alpha + eps, omega0) - ref_mag(alpha - eps, omega0)) / (2 * eps)
    fd_omega = (ref_mag(alpha, omega0 + eps) - ref_mag(alpha, omega0 - eps)) / (2 * eps)
    scale = ref_mag(alpha, omega0)
    for got, want in ((g_alpha, fd_alpha), (g_omega, fd_omega)):
      assert np.isfinite(got)
      assert abs(got) > 1e-3 * scale, (alpha, got, scale)
      np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * scale)


def test_lambda_bounds():
  for kernel_size, delta in ((31, 1.0), (15, 1.0), (63, 0.5)):
    alpha_min, omega_low, omega_high = sblu.lambda_bounds(kernel_size, 16, delta)
    np.testing.assert_allclose(math.exp(-delta * alpha_min * (kernel_size - 1) / 2), 0.01)
    np.testing.assert_allclose((omega_low * delta, omega_high * delta), (math.pi / 16, math.pi))
  np.testing.assert_allclose(sblu.lambda_bounds(31, 16)[0], math.log(100) / 15)
  # The edge tap of a kernel at alpha_min is 1% of its centre tap.
  h = np.abs(np.asarray(sblu.sblu_kernel(sblu.lambda_bounds(31, 16)[0], 1.0, 31)))
  np.testing.assert_allclose(h[0] / h[15], 0.01, rtol=1e-4)


def test_constrain_lambda_is_strictly_inside_and_invertible():
  alpha_min, omega_low, omega_high = sblu.lambda_bounds(31, 16)
  z = jnp.array([-1e30, -1e4, -50.0, -3.0, 0.0, 2.0, 50.0, 1e4, 1e30])
  alpha, omega = sblu.constrain_lambda(z, z, 31, 16)
  assert np.all(np.isfinite(alpha)) and np.all(np.isfinite(omega))
  assert np.all(alpha > np.float32(alpha_min))
  assert np.all(alpha < np.float32(sblu.alpha_max(31)))
  assert np.all(omega > np.float32(omega_low)) and np.all(omega <= np.float32(omega_high))
  want_alpha = np.array([0.4, 0.7, 1.3])
  want_omega = np.array([0.3, 1.5, 3.1])
  z_alpha, z_omega = sblu.unconstrain_lambda(want_alpha, want_omega, 31, 16)
  alpha, omega = sblu.constrain_lambda(z_alpha, z_omega, 31, 16)
  np.testing.assert_allclose(alpha, want_alpha, rtol=1e-5)
  np.testing.assert_allclose(omega, want_omega, rtol=1e-5)
  with pytest.raises(ValueError, match='omega inside'):
    sblu.unconstrain_lambda(0.5, 0.1, 31, 16)
  with pytest.raises(ValueError, match='alpha must lie inside'):
    sblu.unconstrain_lambda(4.0, 1.0, 31, 16)
  # Small kernels have alpha_min above pi; the upper bound stays above it.
  assert sblu.alpha_max(3) == 2 * sblu.lambda_bounds(3, 16)[0]


def _ref_conv_same(u_btf, h_bgnk):
  """y[b, n, f, j] = sum_m h[b, g(f), j, m] u[b, n - m, f], zero outside [0, T); explicit loops."""
  batch, num_t, num_f = u_btf.shape
  _, num_g, num_n, kernel_size = h_bgnk.shape
  half = (kernel_size - 1) // 2
  y = np.zeros((batch, num_t, num_f, num_n), np.complex128)
  for n in range(num_t):
    for i, m in enumerate(range(-half, half + 1)):
      if 0 <= n - m < num_t:
        u_bf = u_btf[:, n - m, :].astype(np.float64)
        h_bfn = np.repeat(h_bgnk[:, :, :, i], num_f // num_g, axis=1)
        y[:, n] += u_bf[:, :, None] * h_bfn
  return y


@pytest.mark.parametrize('num_t,kernel_size', [(40, 7), (20, 31)])
def test_depthwise_conv_same_matches_reference(num_t, kernel_size):
  rng = np.random.default_rng(0)
  batch, num_f, num_g, num_n = 2, 12, 3, 2
  u = rng.normal(size=(batch, num_t, num_f)).astype(np.float32)
  h = (
    rng.normal(size=(batch, num_g, num_n, kernel_size))
    + 1j * rng.normal(size=(batch, num_g, num_n, kernel_size))
  ).astype(np.complex64)
  y = np.asarray(jax.jit(sblu.depthwise_conv_same)(u, h))
  assert y.shape == (batch, num_t, num_f, num_n) and y.dtype == np.complex64
  ref = _ref_conv_same(u, h)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
  if kernel_size <= num_t:
    # And numpy's own 'same' convolution, for one (example, bin, mode).
    np.testing.assert_allclose(
      y[1, :, 5, 1], np.convolve(u[1, :, 5], h[1, 1, 1], 'same'), rtol=1e-4, atol=1e-4
    )


def test_modulation_pooling_matrix_covers_every_band():
  for num_t in (8, 16, 64, 1024, 1000):
    pool = sblu.modulation_pooling_matrix(num_t, 32)
    assert pool.shape == (num_t // 2, 32)
    assert np.all(pool >= 0)
    np.testing.assert_allclose(pool.sum(axis=0), 1.0, rtol=1e-5)
    assert np.all(pool.max(axis=0) > 0) and np.all(pool.max(axis=1) > 0)
  # A pure tone lands in the band whose centre is nearest its frequency.
  num_t = 1024
  pool = sblu.modulation_pooling_matrix(num_t, 32)
  k = 300
  band = int(np.argmax(pool[k - 1]))
  assert abs(np.pi * (band + 0.5) / 32 - 2 * np.pi * k / num_t) <= np.pi / 64


def test_errors():
  with pytest.raises(ValueError, match='odd'):
    sblu.sblu_kernel(0.5, 1.0, 30)
  with pytest.raises(ValueError, match='odd'):
    sblu.lambda_bounds(16, 16)
  with pytest.raises(ValueError, match="window='causal'.*two_sided"):
    sblu.sblu_kernel(0.5, 1.0, 31, window='causal')
  with pytest.raises(ValueError, match="phase='abs'.*analytic"):
    sblu.sblu_kernel(0.5, 1.0, 31, phase='abs')
  with pytest.raises(ValueError, match='not divisible'):
    sblu.depthwise_conv_same(jnp.zeros((1, 8, 10)), jnp.zeros((1, 3, 2, 5), jnp.complex64))
