"""Train-step cost of AaSP: compile time, XLA memory, step time, clips/s, FLOPs/clip, MFU, and the
naive teacher-per-clone step measured next to it in the same run.

  python benchmarks/train_step.py --config configs/pretrain.py:variant=tiny,target_length=256 \
      --set global_batch=8 --set objective.num_clones=4 --peak_tflops 0.1
  python benchmarks/train_step.py --config configs/pretrain.py:variant=S,target_length=256 \
      --set global_batch=2 --set objective.num_clones=4 --steps 3 --warmup 1 --peak_tflops 0.1
  python benchmarks/train_step.py --config configs/pretrain.py:variant=B/16 --dtype bfloat16 \
      --peak_tflops 989 --steps 20     # e.g. one H100 (dense bf16 peak; the figure is yours)

The multi-mask step is `aasp_jax.train.step.train_step` (teacher once per clip, M clones per clip);
the naive step re-runs the teacher on the B * M repeated clips and compares every clone row with its
own targets, everything else identical (same masking, student, predictor, losses, optimizer, EMA,
shardings and donation). Both are AOT-compiled like `step.compile_step` and timed interleaved, one
step each in turn, so load on a shared machine hits both alike; times are medians.

FLOPs are the matmul and convolution FLOPs counted from the step's jaxpr (`aasp_jax.train.flops`).
MFU = achieved model FLOP/s / (peak_tflops * 1e12 * devices). The peak is the user's figure (the
dense peak of the chip for the compute dtype); nothing here checks it.
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aasp_jax import configuration, masking, sharding
from aasp_jax.train import flops
from aasp_jax.train import objective as objective_lib
from aasp_jax.train import optimizer
from aasp_jax.train import state as state_lib
from aasp_jax.train import step as step_lib

MIB = 2**20


# ----------------------------------------------------------------------------------------------
# Analytic model FLOPs (2 FLOPs per multiply-add; matmuls and attention only, plus the AaPE branch).


def encoder_blocks_flops(m, n_tokens: int) -> float:
  """Forward FLOPs of the transformer blocks over n patch tokens + CLS, for one sequence.

  Per block, with n' = n + 1, D = width, F = mlp_dim: QKV + output projections 2 n' 4 D^2, MLP
  2 n' 2 D F, attention scores and value mixing 2 * 2 n'^2 D.
  """
  d, n = m.width, n_tokens + 1
  return m.depth * (2 * n * (4 * d * d + 2 * d * m.mlp_dim) + 2 * 2 * n * n * d)


def stem_flops(m, t: int, f: int) -> float:
  """Forward FLOPs of the stem for one clip: the patch conv (2 N pt pf D), plus for AaPE the branch
  as in benchmarks/stem_cost.py: complex depthwise conv over T x F x modes with K taps (4 FLOPs a
  tap, real input x complex kernel), envelope (6 a sample and mode), projection to D. The Lambda
  encoder (rFFT + a small MLP) is left out."""
  n_tokens = (t // m.patch_t) * (f // m.patch_f)
  conv = 2 * n_tokens * m.patch_t * m.patch_f * m.width
  if m.stem != 'aape':
    return conv
  a = m.aape
  branch = 4 * t * f * a.num_modes * a.kernel_size + 6 * t * f * a.num_modes
  branch += 2 * n_tokens * (m.patch_f * a.num_modes) * m.width
  return conv + branch


def predictor_flops(m, n_visible: int, n_masked: int) -> float:
  """Forward FLOPs of the cross-attention predictor for one clone (NaN for other kinds).

  P = predictor width, r = mlp ratio: context projection 2 Nv D P; per block q/out projections
  2 * 2 Nm P^2, k/v projections 2 * 2 Nv P^2, scores + mixing 2 * 2 Nm Nv P, MLP 2 * 2 Nm P rP;
  output projection 2 Nm P D.
  """
  p = m.predictor
  if p.kind != 'cross_attention':
    return float('nan')
  w, nv, nm = p.width, n_visible, n_masked
  hidden = int(w * p.mlp_ratio)
  block = 4 * nm * w * w + 4 * nv * w * w + 4 * nm * nv * w + 4 * nm * w * hidden
  return 2 * nv * m.width * w + p.depth * block + 2 * nm * w * m.width


def analytic_flops_per_clip(cfg, objective) -> dict:
  """Model FLOPs per clip of one train step, by part.

  teacher  = stem(T, F) + blocks(N)                        forward only, once per clip
  student  = 3 * [stem(T, F) + M * blocks(Nv)]             forward + backward (x3); the stem runs
                                                           once per clip, each clone encodes Nv
  predictor= 3 * M * pred(Nv, Nm)                          forward + backward over Nm queries
  heads    = 3 * M * 2 (D H + H Z) + 3 * 2 (B M) M Z    projection head and the [R, R] InfoNCE
                                                           similarity (per clip: R * M * Z)
  naive teacher = M * teacher (the teacher re-run on every clone row).
  """
  m, o = cfg.model, cfg.objective
  t, f = objective.preset.target_length, objective.preset.num_mel_bins
  n = objective.num_tokens
  nv = masking.num_visible(n, o.mask_ratio)
  nm = n - nv
  clones = o.num_clones
  teacher = stem_flops(m, t, f) + encoder_blocks_flops(m, n)
  student = 3 * (stem_flops(m, t, f) + clones * encoder_blocks_flops(m, nv))
  pred = 3 * clones * predictor_flops(m, nv, nm)
  heads = 0.0
  if o.contrastive_weight > 0:
    proj = 2 * (m.width * o.projection_hidden + o.projection_hidden * o.projection_dim)
    rows = cfg.global_batch * clones
    heads = 3 * clones * proj + 3 * 2 * rows * clones * o.projection_dim
  total = teacher + student + pred + heads
  return {
    'teacher': teacher,
    'student': student,
    'predictor': pred,
    'heads': heads,
    'total': total,
    'naive_total': total + (clones - 1) * teacher,
    'n': n,
    'nv': nv,
    'nm': nm,
  }


# ----------------------------------------------------------------------------------------------


def memory_line(mem) -> str:
  if mem is None:
    return 'memory_analysis() unavailable on this backend'
  get = lambda name: getattr(mem, name, float('nan')) / MIB
  return (
    f'arguments {get("argument_size_in_bytes"):.1f} MiB, outputs {get("output_size_in_bytes"):.1f}'
    f' MiB, temps {get("temp_size_in_bytes"):.1f} MiB, aliased {get("alias_size_in_bytes"):.1f} '
    f'MiB, code {get("generated_code_size_in_bytes"):.1f} MiB'
  )


def synthetic_batch(cfg, objective, mesh):
  """Random waveforms of exactly target_length frames, sharded over the batch axes."""
  p = objective.preset
  samples = p.window_length + (p.target_length - 1) * p.frame_shift
  wave = 0.1 * jax.random.normal(jax.random.key(cfg.seed + 1), (cfg.global_batch, samples))
  batch = {
    'waveform': wave,
    'num_samples': jnp.full((cfg.global_batch,), samples, jnp.int32),
  }
  shard = lambda v: NamedSharding(mesh, P(sharding.BATCH_AXES, *([None] * (v.ndim - 1))))
  return {k: jax.device_put(v, shard(v)) for k, v in batch.items()}


def compile_timed(step_fn, objective, tx, schedule, cfg, mesh, shardings, batch):
  """AOT-compiles `step_fn` through `step.trace_step` / `compile_traced` (same shardings and
  donation for both designs); returns (compiled, memory analysis, seconds, global step FLOPs).

  The FLOPs are counted from the step's jaxpr (`flops.jaxpr_flops`): XLA's cost analysis counts a
  scanned block (`model.scan_layers`, the B/L default) once instead of `depth` times."""
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
  rules = cfg.logical_axis_rules
  t0 = time.perf_counter()
  traced = step_lib.trace_step(
    objective, tx, schedule, cfg.optimizer, mesh, rules, shardings, abstract, step_fn=step_fn
  )
  compiled, mem = step_lib.compile_traced(traced, mesh, rules)
  return compiled, mem, time.perf_counter() - t0, flops.jaxpr_flops(traced.jaxpr)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/pretrain.py:variant=tiny,target_length=256')
  parser.add_argument('--set', action='append', default=[], help='key=value override (repeated)')
  parser.add_argument(
    '--dtype', default=None, help='model.dtype override (default: float32 on CPU, else the config)'
  )
  parser.add_argument('--steps', type=int, default=5, help='timed steps per design')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps per design')
  parser.add_argument(
    '--peak_tflops', type=float, default=None, help='YOUR peak TFLOP/s per device for MFU'
  )
  parser.add_argument('--skip_naive', action='store_true', help='measure the multi-mask step only')
  args = parser.parse_args()

  backend = jax.default_backend()
  dtype = args.dtype or ('float32' if backend == 'cpu' else None)
  overrides = ([f'model.dtype={dtype}'] if dtype else []) + list(args.set)
  cfg = configuration.load_config(args.config, overrides)
  devices = jax.devices()
  objective = objective_lib.AaSPObjective.from_config(cfg)
  tx, schedule = optimizer.make_optimizer(cfg.optimizer, cfg.global_batch, cfg.total_steps)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  sharding.check_batch(cfg.global_batch, mesh)
  rules = cfg.logical_axis_rules
  abstract_state, shardings = state_lib.state_shardings(objective, tx, mesh, rules)
  num_params = configuration.count_params(abstract_state.params)
  num_encoder = configuration.count_params(abstract_state.params['encoder'])
  state = state_lib.init_state(objective, tx, jax.random.key(cfg.seed), mesh, rules)
  batch = synthetic_batch(cfg, objective, mesh)
  rng = jax.random.key(cfg.seed + 2)
  gb, clones = cfg.global_batch, cfg.objective.num_clones
  a = analytic_flops_per_clip(cfg, objective)

  print(
    f'backend {backend} ({devices[0].device_kind}) x {len(devices)}  mesh {dict(mesh.shape)}  '
    f'config {args.config} {" ".join(args.set)}'
  )
  print(
    f'model {cfg.model.variant} width {cfg.model.width} depth {cfg.model.depth} stem '
    f'{cfg.model.stem} predictor {cfg.model.predictor.kind}  compute {cfg.model.dtype}  params '
    f'{num_params / 1e6:.2f} M (encoder {num_encoder / 1e6:.2f} M)'
  )
  print(
    f'global batch {gb} clips x {clones} clones  tokens N={a["n"]} visible {a["nv"]} masked '
    f'{a["nm"]}  input {configuration.input_shape(cfg, gb)}'
  )

  designs = {'multi-mask': step_lib.train_step}
  if not args.skip_naive:
    designs['naive'] = functools.partial(step_lib.train_step, teacher_per_clone=True)
  compiled, step_flops = {}, {}
  for name, fn in designs.items():
    c, mem, seconds, step_flops[name] = compile_timed(
      fn, objective, tx, schedule, cfg, mesh, shardings, batch
    )
    compiled[name] = c
    print(f'[{name}] compile {seconds:.1f} s; memory_analysis: {memory_line(mem)}')

  # Warm-up, then interleaved timing (one step of each design in turn).
  def run(name, state):
    t0 = time.perf_counter()
    state, metrics = compiled[name](state, batch, rng)
    jax.block_until_ready((state, metrics))
    return state, metrics, time.perf_counter() - t0

  times = {name: [] for name in designs}
  metrics = {}
  for i in range(args.warmup + args.steps):
    for name in designs:
      state, metrics[name], seconds = run(name, state)
      if i >= args.warmup:
        times[name].append(seconds)
  for name in designs:
    loss = float(metrics[name]['loss'])
    print(f'[{name}] step times (s): {" ".join(f"{t:.3f}" for t in times[name])}  loss {loss:.4f}')

  peak = args.peak_tflops
  print(
    'analytic model GFLOPs per clip: teacher {:.3f}, student fwd+bwd {:.3f}, predictor fwd+bwd '
    '{:.3f}, heads {:.3f}; total {:.3f} (naive {:.3f})'.format(
      *(a[k] / 1e9 for k in ('teacher', 'student', 'predictor', 'heads', 'total', 'naive_total'))
    )
  )
  if peak:
    print(
      f'MFU peak: {peak:g} TFLOP/s per device x {len(devices)} devices (user-supplied figure, '
      'not checked)'
    )
  else:
    print('MFU: not computed (pass --peak_tflops, your per-device peak TFLOP/s)')
  # The on-device log-mel (Ozaki-split exact DFT matmuls) is counted but is no model FLOP: it is
  # counted alone and shown, and the MFU is also given with it taken out.
  frontend = flops.function_flops(objective.features, batch) / gb
  print(f'GFLOPs per clip of the on-device log-mel front end alone: {frontend / 1e9:.3f}')
  median = {}
  for name in designs:
    median[name] = statistics.median(times[name])
    counted_per_clip = step_flops[name] / gb  # the jaxpr is the global (unpartitioned) step
    analytic = a['total'] if name == 'multi-mask' else a['naive_total']
    line = (
      f'[{name}] median step {median[name] * 1e3:.1f} ms, {gb / median[name]:.2f} clips/s; '
      f'GFLOPs/clip counted {counted_per_clip / 1e9:.3f} (without front end '
      f'{(counted_per_clip - frontend) / 1e9:.3f}), analytic {analytic / 1e9:.3f} '
      f'(counted without front end / analytic {(counted_per_clip - frontend) / analytic:.3f})'
    )
    if peak:
      denom = peak * 1e12 * len(devices) * median[name] / gb
      line += (
        f'; MFU counted {counted_per_clip / denom:.2%} (without front end '
        f'{(counted_per_clip - frontend) / denom:.2%}), analytic {analytic / denom:.2%}'
      )
    print(line)
  if 'naive' in median:
    print(
      f'naive / multi-mask step time: {median["naive"] / median["multi-mask"]:.2f}x  '
      f'(analytic FLOP ratio {a["naive_total"] / a["total"]:.2f}x, M={clones})'
    )


if __name__ == '__main__':
  main()
