"""Cost of the AaPE stem next to the plain conv stem and the whole encoder forward.

Prints XLA cost-analysis FLOPs, an analytic FLOP count, and CPU wall time (median of repeats) for:
the conv stem, the AaPE stem, and the encoder forward (with each stem); then AaPE's share.

  python benchmarks/stem_cost.py                      # B variant, 1024 x 128, batch 1
  python benchmarks/stem_cost.py --variant tiny --target_length 256
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from aasp_jax import configuration
from aasp_jax.models import build


def xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per program
    cost = cost[0]
  return float(cost.get('flops', float('nan')))


def median_seconds(fn, args, repeats: int) -> float:
  jitted = jax.jit(fn)
  jax.block_until_ready(jitted(*args))  # compile outside the timing
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def analytic_encoder_flops(m, n_tokens: int) -> float:
  """2 FLOPs per multiply-add: QKV/out projections, MLP, attention scores and mixing, patch conv."""
  d, n = m.width, n_tokens + 1
  per_block = 2 * n * (4 * d * d + 2 * d * m.mlp_dim) + 2 * 2 * n * n * d
  stem = 2 * n_tokens * m.patch_t * m.patch_f * d
  return m.depth * per_block + stem


def analytic_aape_branch_flops(m, t: int, f: int) -> float:
  """Per-example complex conv (real input x complex kernel: 4 FLOPs a tap), envelope, projection."""
  a = m.aape
  conv = 4 * t * f * a.num_modes * a.kernel_size
  envelope = 6 * t * f * a.num_modes
  proj = 2 * (t // m.patch_t) * (f // m.patch_f) * (m.patch_f * a.num_modes) * m.width
  return conv + envelope + proj


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='B/16')
  parser.add_argument('--target_length', type=int, default=1024)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--dtype', default='float32', help='compute dtype (bf16 is slow on CPU)')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()

  results = {}
  for stem in ('conv', 'aape'):
    cfg = configuration.load_config(
      f'configs/pretrain.py:variant={args.variant},stem={stem},target_length={args.target_length}',
      # Unrolled blocks: XLA's cost analysis counts a scanned block once, not `depth` times.
      [f'model.dtype={args.dtype}', 'model.scan_layers=False'],
    )
    shape = configuration.input_shape(cfg, args.batch)
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    stem_module = build.build_stem(cfg.model)
    encoder = build.build_encoder(cfg.model)
    stem_vars = jax.jit(stem_module.init)(jax.random.key(1), x)
    enc_vars = jax.jit(encoder.init)(jax.random.key(1), x)
    stem_fn = lambda v, x, s=stem_module: s.apply(v, x)
    enc_fn = lambda v, x, e=encoder: e.apply(v, x)['tokens']
    results[stem] = dict(
      stem_flops=xla_flops(stem_fn, stem_vars, x),
      enc_flops=xla_flops(enc_fn, enc_vars, x),
      stem_s=median_seconds(stem_fn, (stem_vars, x), args.repeats),
      enc_s=median_seconds(enc_fn, (enc_vars, x), args.repeats),
    )
  m = cfg.model
  t, f = shape[1], shape[2]
  n_tokens = (t // m.patch_t) * (f // m.patch_f)
  enc_analytic = args.batch * analytic_encoder_flops(m, n_tokens)
  aape_analytic = args.batch * analytic_aape_branch_flops(m, t, f)

  print(
    f'device: {jax.devices()[0].device_kind}  variant {args.variant}  input {shape}  '
    f'compute {args.dtype}  (median of {args.repeats})'
  )
  print(f'{"part":34s} {"XLA GFLOPs":>11s} {"analytic GFLOPs":>16s} {"CPU ms":>9s}')
  rows = [
    (
      'conv stem',
      results['conv']['stem_flops'],
      args.batch * 2 * n_tokens * 256 * m.width,
      results['conv']['stem_s'],
    ),
    (
      'AaPE stem (conv + AaPE branch)',
      results['aape']['stem_flops'],
      args.batch * 2 * n_tokens * 256 * m.width + aape_analytic,
      results['aape']['stem_s'],
    ),
    (
      'encoder forward, conv stem',
      results['conv']['enc_flops'],
      enc_analytic,
      results['conv']['enc_s'],
    ),
    (
      'encoder forward, AaPE stem',
      results['aape']['enc_flops'],
      enc_analytic + aape_analytic,
      results['aape']['enc_s'],
    ),
  ]
  for name, xla, analytic, sec in rows:
    print(f'{name:34s} {xla / 1e9:11.3f} {analytic / 1e9:16.3f} {sec * 1e3:9.2f}')
  branch_flops = results['aape']['stem_flops'] - results['conv']['stem_flops']
  branch_s = results['aape']['stem_s'] - results['conv']['stem_s']
  print(
    f'AaPE branch / encoder forward (conv stem): FLOPs {branch_flops / results["conv"]["enc_flops"]:.3%}'
    f' (XLA), {aape_analytic / enc_analytic:.3%} (analytic); CPU time '
    f'{branch_s / results["conv"]["enc_s"]:.3%}'
  )
  print(
    f'whole AaPE stem / encoder forward (AaPE stem): FLOPs '
    f'{results["aape"]["stem_flops"] / results["aape"]["enc_flops"]:.3%}; CPU time '
    f'{results["aape"]["stem_s"] / results["aape"]["enc_s"]:.3%}   (target < 5%)'
  )


if __name__ == '__main__':
  main()
