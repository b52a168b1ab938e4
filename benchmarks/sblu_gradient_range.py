"""Measures how far from a kernel's frequency the gradient w.r.t. that frequency stays usable.

The paper motivates the SBLU's two-sided window by saying that gradients w.r.t. the frequency
parameter stay usable over a wider range of frequencies than with a one-sided (SSM-style) window.
This script measures it; it does not assume the answer.

For a kernel h(alpha, omega) (`sblu.sblu_kernel`, analytic phase) and a probe frequency theta, it
computes g(d) = d|H(theta)|/d omega at omega = omega0, theta = omega0 + d, over a grid of offsets d
in (-pi, pi], with jax.grad. A gradient that helps a frequency move towards content at theta must
have the sign of d (raising omega raises |H(theta)| when theta is above omega) and be large enough.
Per window, alpha and K it prints:

- g_max: the largest |g|, and g_max / |H|_peak (scale-free: the two windows' gains differ);
- w10: the total measure (rad) of offsets where |g| >= 10% of that window's own g_max;
- w10c: the same with a common reference, after equalising the kernels' gains: offsets where
  |g| / |H|_peak >= 10% of the two-sided kernel's max(|g| / |H|_peak) (same alpha and K);
- reach10: the offset where the main lobe of |g| falls below 10% of g_max (mean of both sides);
- capture: how far out, from the main lobe's peak, the gradient keeps the sign of d and
  |g| >= 1% of g_max (the range from which following the gradient pulls omega to the content;
  the smaller of the two sides);
- bias: the offset d where g changes sign near 0. s(Lambda) = 2 sinh(Lambda/2)/Lambda also depends
  on omega, so gradient ascent on |H(theta)| settles at omega = theta - bias, not at theta;
- |g|/g_max at a few offsets.

At equal alpha the one-sided window is about 1.5x less selective (wider -3 dB band), so a last
section repeats the comparison at equal -3 dB width, lowering the one-sided alpha to match.

Run: python benchmarks/sblu_gradient_range.py   (seconds on a CPU)
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from aasp_jax.models import sblu

ALPHAS = (0.31, 0.6, 1.2)
KERNEL_SIZES = (15, 31, 63)
OFFSETS_SHOWN = (0.05, 0.1, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0)


@functools.partial(jax.jit, static_argnames=('kernel_size', 'window'))
def _response_and_gradient(alpha, omega0, thetas, kernel_size, window):
  def mag(omega, theta):
    h = sblu.sblu_kernel(alpha, omega, kernel_size, window=window)
    return jnp.abs(sblu.frequency_response(h, theta))

  return mag(omega0, omega0), jax.vmap(jax.grad(mag), in_axes=(None, 0))(omega0, thetas)


def gradient_curve(alpha, omega0, kernel_size, window, offsets):
  """(|H(omega0)|, g(d) = d|H(omega0 + d)| / d omega at omega0) for each offset d."""
  peak, g = _response_and_gradient(
    jnp.float32(alpha),
    jnp.float32(omega0),
    jnp.asarray(omega0 + offsets, jnp.float32),
    kernel_size,
    window,
  )
  return float(peak), np.asarray(g)


def _outward(offsets, side):
  """Indices of the offsets on one side of 0, ordered from d = 0 outwards."""
  idx = np.where(np.sign(offsets) == side)[0]
  return idx if side > 0 else idx[::-1]


def summarise(offsets, g, threshold=0.1, capture_floor=0.01):
  """The range measures described in the module docstring, plus the fixed-point bias."""
  step = offsets[1] - offsets[0]
  mag = np.abs(g)
  g_max = mag.max()
  w10 = float(np.sum(mag >= threshold * g_max) * step)
  reaches, captures = [], []
  for side in (1, -1):
    idx = _outward(offsets, side)
    start = int(np.argmax(mag[idx]))  # the main lobe's peak on this side
    j = start
    while j + 1 < len(idx) and mag[idx[j + 1]] >= threshold * g_max:
      j += 1
    reaches.append(abs(offsets[idx[j]]))
    # From the main-lobe peak outwards, the gradient must keep the sign of d and stay above the
    # floor.
    good = (np.sign(g[idx]) == side) & (mag[idx] >= capture_floor * g_max)
    bad = np.where(~good[start:])[0]
    captures.append(abs(offsets[idx[start + bad[0]]]) if len(bad) else np.pi)
  # Where g changes sign near d = 0: the omega that gradient ascent on |H(theta)| settles at is
  # theta - bias, not theta (s(Lambda) depends on omega too).
  near = np.abs(offsets) < 0.5
  crossing = np.where(near[:-1] & near[1:] & (np.sign(g[:-1]) != np.sign(g[1:])))[0]
  bias = float(offsets[crossing[0]] + step / 2) if len(crossing) else float('nan')
  return g_max, w10, float(np.mean(reaches)), float(min(captures)), bias


def minus3db_width(alpha, kernel_size, window, nfft=1 << 14):
  """-3 dB width (rad) of |H| (the same for every omega, so it is taken at omega = pi / 2)."""
  h = np.asarray(sblu.sblu_kernel(alpha, np.pi / 2, kernel_size, window=window))
  mag = np.abs(np.fft.fft(h, nfft))
  return float(np.sum(mag >= mag.max() / np.sqrt(2)) * 2 * np.pi / nfft)


def matched_one_sided_alpha(alpha, kernel_size, smallest=1e-3):
  """The one-sided alpha with the two-sided window's -3 dB width at `alpha`, or None if a
  one-sided kernel of this length cannot be that narrow (its truncation sets a minimum width)."""
  target = minus3db_width(alpha, kernel_size, 'two_sided')
  if minus3db_width(smallest, kernel_size, 'one_sided') > target:
    return None
  low, high = smallest, alpha
  for _ in range(30):
    mid = 0.5 * (low + high)
    if minus3db_width(mid, kernel_size, 'one_sided') < target:
      low = mid
    else:
      high = mid
  return 0.5 * (low + high)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--omega0', type=float, default=np.pi / 2, help='kernel frequency, rad/frame')
  parser.add_argument('--points', type=int, default=4001, help='offset grid size over (-pi, pi]')
  args = parser.parse_args()
  offsets = np.linspace(-np.pi, np.pi, args.points)
  offsets = offsets[offsets != 0.0]

  print(
    f'omega0 = {args.omega0:.4f} rad/frame, analytic phase, delta = 1; '
    f'offsets d = theta - omega0 over (-pi, pi], {len(offsets)} points'
  )
  print(
    'alpha_min(K) (1% at the kernel edge): '
    + ', '.join(f'K={k}: {sblu.lambda_bounds(k, 16)[0]:.3f}' for k in KERNEL_SIZES)
  )
  print()
  header = (
    f'{"K":>3} {"alpha":>5} {"window":>9} | {"|H|pk":>6} {"g_max":>8} {"g/|H|":>6} '
    f'{"w10":>5} {"w10c":>5} {"reach10":>7} {"capture":>7} {"bias":>6} | '
    + ' '.join(f'{d:>5}' for d in OFFSETS_SHOWN)
  )
  print('columns after "|": |g|/g_max at offset d = +value (mean of +d and -d)')
  print(header)
  print('-' * len(header))
  rows = []
  for kernel_size in KERNEL_SIZES:
    alpha_min = sblu.lambda_bounds(kernel_size, 16)[0]
    for alpha in ALPHAS:
      reference = None  # two_sided's max(|g| / |H|_peak); WINDOWS lists two_sided first
      for window in sblu.WINDOWS:
        peak, g = gradient_curve(alpha, args.omega0, kernel_size, window, offsets)
        g_max, w10, reach10, capture, bias = summarise(offsets, g)
        reference = g_max / peak if reference is None else reference
        w10c = float(np.sum(np.abs(g) / peak >= 0.1 * reference) * (offsets[1] - offsets[0]))
        shown = []
        for d in OFFSETS_SHOWN:
          at = [np.abs(g[np.argmin(np.abs(offsets - s * d))]) for s in (1, -1)]
          shown.append(np.mean(at) / g_max)
        flag = '*' if alpha < alpha_min else ' '
        print(
          f'{kernel_size:>3} {alpha:>4.2f}{flag} {window:>9} | {peak:6.2f} {g_max:8.2f} '
          f'{g_max / peak:6.2f} {w10:5.2f} {w10c:5.2f} {reach10:7.2f} {capture:7.2f} '
          f'{bias:6.3f} | ' + ' '.join(f'{v:5.3f}' for v in shown)
        )
        rows.append((kernel_size, alpha, window, w10, reach10, capture, w10c))
    print()
  print('* alpha below alpha_min(K): the window is truncated at the kernel edge (> 1% left).')
  print()
  print('Summary (two_sided vs one_sided):')
  for kernel_size in KERNEL_SIZES:
    for alpha in ALPHAS:
      two, one = (r for r in rows if r[0] == kernel_size and r[1] == alpha)
      print(
        f'  K={kernel_size:>2} alpha={alpha:.2f}: w10 {two[3]:.2f} vs {one[3]:.2f} rad, '
        f'w10c {two[6]:.2f} vs {one[6]:.2f}, reach10 {two[4]:.2f} vs {one[4]:.2f}, '
        f'capture {two[5]:.2f} vs {one[5]:.2f}'
      )
  print()
  # At equal alpha the one-sided window is ~1.5x less selective, so also compare at equal -3 dB
  # width: the one-sided alpha is lowered until its main lobe is as narrow as the two-sided one's.
  print('Equal -3 dB width (one-sided alpha matched to the two-sided width):')
  for kernel_size in KERNEL_SIZES:
    for alpha in ALPHAS:
      alpha_one = matched_one_sided_alpha(alpha, kernel_size)
      width = minus3db_width(alpha, kernel_size, 'two_sided')
      if alpha_one is None:
        print(
          f'  K={kernel_size:>2} width {width:.2f} rad (alpha {alpha:.2f}): no one-sided '
          f'K={kernel_size} kernel is that narrow'
        )
        continue
      stats = {}
      for window, a in (('two_sided', alpha), ('one_sided', alpha_one)):
        _, g = gradient_curve(a, args.omega0, kernel_size, window, offsets)
        stats[window] = summarise(offsets, g)
      two, one = stats['two_sided'], stats['one_sided']
      print(
        f'  K={kernel_size:>2} width {width:.2f} rad (alpha {alpha:.2f} vs {alpha_one:.3f}): '
        f'w10 {two[1]:.2f} vs {one[1]:.2f}, reach10 {two[2]:.2f} vs {one[2]:.2f}, '
        f'capture {two[3]:.2f} vs {one[3]:.2f}'
      )


if __name__ == '__main__':
  main()
