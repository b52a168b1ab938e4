"""Pure maths of the SBLU (Structured Bilateral Laplace Unit) used by the AaPE patch stem.

Everything here is a plain function of arrays (no Flax), so it can be tested against numpy directly
and reused by analysis tools:

- `lambda_bounds`: the admissible range of the decay alpha and frequency omega;
- `constrain_lambda` / `unconstrain_lambda`: the bounded parameterisation that maps unconstrained
  network outputs into that range, and its inverse (to set chosen frequencies in a model);
- `sblu_kernel`: the complex kernel h[m] = s(Lambda) exp(-Delta alpha |m|) exp(i Delta omega m);
- `frequency_response`: H(theta) of such kernels;
- `depthwise_conv_same`: the per-example, per-group 'same' convolution along time;
- `modulation_pooling_matrix`: the fixed rFFT-bin -> band pooling used by the Lambda encoder.

Convolution convention (used throughout): y[n] = sum_m h[m] u[n - m], a true convolution. Then the
frequency response is H(theta) = sum_m h[m] exp(-i theta m), which for the analytic phase peaks at
theta = Delta omega, and the one-sided window (h[m] = 0 for m < 0) is causal like an SSM. The review
of the paper quotes the unit as a correlation, sum_k h[k - c] u[n + k - c]; with the symmetric
two-sided window that only flips the sign of the analysed frequency, which the magnitude envelope
taken downstream does not see.
"""

import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

WINDOWS = ('two_sided', 'one_sided')
PHASES = ('analytic', 'literal')

# The window must have decayed to this fraction of its centre value at the kernel edge.
EDGE_DECAY = 0.01

# The bounded parameterisation keeps this relative margin from the ends of each range, so that
# alpha > alpha_min and omega > omega_low hold strictly even when a sigmoid saturates
# in float32 (sigmoid(-100) rounds to 0, which would put omega exactly on the excluded edge).
_MARGIN = 1e-5


def check_option(name: str, value, valid) -> None:
  """Raises ValueError naming the valid values unless `value` is one of them."""
  if value not in valid:
    raise ValueError(f'{name}={value!r} is not valid; expected one of {valid}.')


def check_kernel_size(kernel_size: int) -> None:
  """Raises ValueError unless `kernel_size` is a positive odd integer (the kernel is centred)."""
  if kernel_size < 1 or kernel_size % 2 != 1:
    raise ValueError(
      f'kernel_size must be a positive odd integer so the kernel has a centre tap; '
      f'got {kernel_size}.'
    )


def lambda_bounds(kernel_size: int, patch_t: int, delta=1.0) -> Tuple:
  """Returns (alpha_min, omega_low, omega_high) in the units that `sblu_kernel` takes.

  alpha_min makes the window decay to EDGE_DECAY (1%) at the kernel edge:
  exp(-delta * alpha_min * (K - 1) / 2) = 0.01. The frequency band is the alias-prone band of a
  stride-`patch_t` patchifier, (pi / patch_t, pi] rad/frame. The kernel sees alpha and omega only
  through the per-frame products delta*alpha and delta*omega, so all three bounds scale as 1/delta;
  at delta = 1 (the default) they are (ln(100) / ((K - 1) / 2), pi / patch_t, pi).

  Args:
    kernel_size: odd kernel length K.
    patch_t: the patch's time stride.
    delta: the step size Delta (a Python float or a traced scalar).
  """
  check_kernel_size(kernel_size)
  half = (kernel_size - 1) / 2
  # A one-tap kernel has no edge to decay to; any positive decay is admissible.
  alpha_min = -math.log(EDGE_DECAY) / (delta * max(half, 1.0))
  return alpha_min, math.pi / (patch_t * delta), math.pi / delta


def alpha_max(kernel_size: int, delta=1.0):
  """The largest decay the Lambda encoder may output: max(pi, 2 alpha_min) / delta.

  At delta*alpha = pi the taps fall by e^-pi (4%) per frame, so the kernel is already a near-delta
  with no frequency selectivity left. The bound is also what keeps the kernel finite: the design's
  s(Lambda) = 2 sinh(delta Lambda / 2) / Lambda grows like e^(delta alpha / 2) and overflows float32
  once delta*alpha passes ~178, which an unbounded softplus reaches on extreme inputs.
  """
  alpha_min_unit = lambda_bounds(kernel_size, 1)[0]
  return max(math.pi, 2.0 * alpha_min_unit) / delta


def constrain_lambda(z_alpha, z_omega, kernel_size: int, patch_t: int, delta=1.0):
  """Maps unconstrained outputs to alpha in (alpha_min, alpha_max) and omega in (omega_low, omega_high).

  alpha = a_lo + (a_hi - a_lo) sigmoid(z_alpha) and
  omega = omega_low + (omega_high - omega_low) (margin + (1 - 2 margin) sigmoid(z_omega)), with
  a_lo = alpha_min (1 + margin), a_hi = alpha_max (1 - margin): affine in a sigmoid (so gradients
  are never clipped) and strictly inside both ranges, whatever the input.
  """
  alpha_min, omega_low, omega_high = lambda_bounds(kernel_size, patch_t, delta)
  a_lo, a_hi = alpha_min * (1.0 + _MARGIN), alpha_max(kernel_size, delta) * (1.0 - _MARGIN)
  z_alpha = jnp.asarray(z_alpha, jnp.float32)
  z_omega = jnp.asarray(z_omega, jnp.float32)
  alpha = a_lo + (a_hi - a_lo) * jax.nn.sigmoid(z_alpha)
  frac = _MARGIN + (1.0 - 2.0 * _MARGIN) * jax.nn.sigmoid(z_omega)
  omega = omega_low + (omega_high - omega_low) * frac
  return alpha, omega


def unconstrain_lambda(alpha, omega, kernel_size: int, patch_t: int, delta=1.0):
  """Inverse of `constrain_lambda` (numpy, float64): the raw values that give (alpha, omega)."""
  alpha_min, omega_low, omega_high = lambda_bounds(kernel_size, patch_t, float(delta))
  a_lo = alpha_min * (1.0 + _MARGIN)
  a_hi = alpha_max(kernel_size, float(delta)) * (1.0 - _MARGIN)
  sig_a = (np.asarray(alpha, np.float64) - a_lo) / (a_hi - a_lo)
  frac = (np.asarray(omega, np.float64) - omega_low) / (omega_high - omega_low)
  sig = (frac - _MARGIN) / (1.0 - 2.0 * _MARGIN)
  if np.any(sig_a <= 0) or np.any(sig_a >= 1) or np.any(sig <= 0) or np.any(sig >= 1):
    raise ValueError(
      f'alpha must lie inside ({a_lo:.4g}, {a_hi:.4g}) and omega inside '
      f'({omega_low:.4g}, {omega_high:.4g}).'
    )
  z_alpha = np.log(sig_a) - np.log1p(-sig_a)
  z_omega = np.log(sig) - np.log1p(-sig)
  return z_alpha, z_omega


def sblu_kernel(
  alpha,
  omega,
  kernel_size: int,
  delta=1.0,
  window: str = 'two_sided',
  phase: str = 'analytic',
):
  """The SBLU kernel h[..., K] (complex64) for decays `alpha` and frequencies `omega` [...].

  h[m] = s(Lambda) w[m] exp(i Delta omega m), m = -(K-1)/2 .. (K-1)/2 (index m + (K-1)/2),
  Lambda = alpha + i omega, s(Lambda) = 2 sinh(Delta Lambda / 2) / Lambda (the symmetric
  discretisation factor). The window w is exp(-Delta alpha |m|) for 'two_sided', and
  exp(-Delta alpha m) for m >= 0, 0 for m < 0 for 'one_sided' (causal, as in an SSM). 'literal'
  phase uses exp(i Delta omega |m|), the formula as quoted by the v1 review; 'analytic' uses
  exp(i Delta omega m), whose response is one-sided in frequency. alpha must be positive.
  Computed in float32/complex64 whatever the input dtype.
  """
  check_kernel_size(kernel_size)
  check_option('window', window, WINDOWS)
  check_option('phase', phase, PHASES)
  alpha = jnp.asarray(alpha, jnp.float32)[..., None]
  omega = jnp.asarray(omega, jnp.float32)[..., None]
  half = (kernel_size - 1) // 2
  m = jnp.arange(-half, half + 1, dtype=jnp.float32)
  if window == 'two_sided':
    decay = jnp.exp(-delta * alpha * jnp.abs(m))
  else:
    # exp of the clipped index keeps the unused m < 0 branch finite, so its gradient is 0, not NaN.
    decay = jnp.where(m >= 0, jnp.exp(-delta * alpha * jnp.maximum(m, 0.0)), 0.0)
  m_phase = m if phase == 'analytic' else jnp.abs(m)
  angle = delta * omega * m_phase
  carrier = jax.lax.complex(jnp.cos(angle), jnp.sin(angle))
  lam = jax.lax.complex(alpha, omega)
  scale = 2.0 * jnp.sinh(delta * lam / 2.0) / lam
  return (scale * decay * carrier).astype(jnp.complex64)


def frequency_response(h_k, theta):
  """H(theta) = sum_m h[m] exp(-i theta m) of kernels h [..., K] at angles theta [...] (complex)."""
  kernel_size = h_k.shape[-1]
  half = (kernel_size - 1) // 2
  m = jnp.arange(-half, half + 1, dtype=jnp.float32)
  angle = -jnp.asarray(theta, jnp.float32)[..., None] * m
  return jnp.sum(h_k * jax.lax.complex(jnp.cos(angle), jnp.sin(angle)), axis=-1)


def depthwise_conv_same(u_btf, h_bgnk):
  """Per-example, per-group 'same' convolution along time.

  Args:
    u_btf: real subband time series [B, T, F].
    h_bgnk: complex kernels [B, G, N, K] (K odd); bin f uses group g = f // (F // G).

  Returns:
    y_btfn: complex64 [B, T, F, N], y[b, n, f, j] = sum_m h[b, g(f), j, m] u[b, n - m, f] with
    u = 0 outside [0, T) (zero 'same' padding of (K - 1)/2 frames on both sides).
  """
  batch, num_t, num_f = u_btf.shape
  _, num_g, num_n, kernel_size = h_bgnk.shape
  check_kernel_size(kernel_size)
  if num_f % num_g:
    raise ValueError(f'F={num_f} is not divisible by the number of kernel groups G={num_g}.')
  per_group = num_f // num_g
  half = (kernel_size - 1) // 2
  u_pad = jnp.pad(u_btf.astype(jnp.float32), ((0, 0), (half, half), (0, 0)))
  # With u_pad[j] = u[j - half], u[n - m] = u_pad[n + k] for k = half - m, so window k pairs with
  # the kernel tap m = half - k: the kernel is read reversed. Static slices, no gather.
  u_btkgp = jnp.stack([u_pad[:, k : k + num_t] for k in range(kernel_size)], axis=2)
  u_btkgp = u_btkgp.reshape(batch, num_t, kernel_size, num_g, per_group)
  h_rev = h_bgnk[..., ::-1]
  # Real input times complex kernel = two real contractions; stacking them makes one matmul per
  # (example, group). HIGHEST precision stops TPUs from rounding the float32 operands to bf16.
  h_bgck = jnp.concatenate([jnp.real(h_rev), jnp.imag(h_rev)], axis=2)
  y_btgpc = jnp.einsum('btkgp,bgck->btgpc', u_btkgp, h_bgck, precision=jax.lax.Precision.HIGHEST)
  y_btgpn = jax.lax.complex(y_btgpc[..., :num_n], y_btgpc[..., num_n:])
  return y_btgpn.reshape(batch, num_t, num_f, num_n)


def modulation_pooling_matrix(num_t: int, num_bands: int) -> np.ndarray:
  """Fixed [num_t // 2, num_bands] matrix pooling the non-DC rFFT bins of a length-T series.

  Bands are evenly spaced over (0, pi]; each band averages nearby bins with triangular weights whose
  half-width is the larger of the band spacing and the bin spacing, so every band receives at
  least one bin for any T (short clips have fewer bins than bands). Columns sum to 1. DC is left out
  because the level of a subband is the conv stem's job; the Lambda encoder looks at modulation.
  """
  if num_t < 2:
    raise ValueError(f'need at least 2 frames for a modulation spectrum; got T={num_t}.')
  theta_k = 2.0 * np.pi * np.arange(1, num_t // 2 + 1) / num_t
  theta_b = np.pi * (np.arange(num_bands) + 0.5) / num_bands
  width = max(np.pi / num_bands, 2.0 * np.pi / num_t)
  weights = np.maximum(0.0, 1.0 - np.abs(theta_k[:, None] - theta_b[None, :]) / width)
  return (weights / weights.sum(axis=0, keepdims=True)).astype(np.float32)
