"""Contrastive ablation: the effective rank (RankMe) of clip embeddings after pre-training the tiny
config with the multi-mask contrastive term at its default weight and at 0, same data and seed.

  python benchmarks/contrastive_ablation.py [--steps 300] [--data tests/fixtures/audio]

Data: real recordings (default: the committed CC0 fixtures) through the grain pipeline, random 0.65 s
crops. The rank is measured on 64 held crops (a different pipeline seed) from the teacher encoder's
CLS output (no masking), and also printed as the in-step metric averaged over the last 20 steps.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from aasp_jax import configuration, losses, sharding
from aasp_jax.data import pipeline
from aasp_jax.train import objective as objective_lib
from aasp_jax.train import optimizer, state as state_lib, step as step_lib

OVERRIDES = [
  'model.dtype=float32',
  'model.depth=2',
  'model.width=32',
  'model.num_heads=2',
  'model.mlp_dim=64',
  'model.aape.num_modes=2',
  'model.predictor.width=16',
  'model.predictor.num_heads=2',
  'objective.top_k_layers=2',
  'objective.num_clones=4',
  'objective.projection_hidden=16',
  'objective.projection_dim=8',
  'global_batch=8',
  'optimizer.lr=0.006',
  'mesh.data=1',
]


def run(data: str, steps: int, contrastive_weight: float, seed: int):
  cfg = configuration.load_config(
    'configs/pretrain.py:variant=tiny,target_length=64',
    [*OVERRIDES, f'total_steps={steps}', f'objective.contrastive_weight={contrastive_weight}'],
  )
  objective = objective_lib.AaSPObjective.from_config(cfg)
  tx, schedule = optimizer.make_optimizer(cfg.optimizer, cfg.global_batch, cfg.total_steps)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  rules = cfg.logical_axis_rules
  state = state_lib.init_state(objective, tx, jax.random.key(seed), mesh, rules)
  opts = pipeline.PipelineOptions(preset=objective.preset, batch_size=cfg.global_batch, seed=seed)
  batches = iter(pipeline.make_dataset(data, opts, 0, 1))
  batch = next(batches)
  keys = ('waveform', 'num_samples')
  _, shardings = state_lib.state_shardings(objective, tx, mesh, rules)
  abstract = {k: jax.ShapeDtypeStruct(batch[k].shape, batch[k].dtype) for k in keys}
  step, _ = step_lib.compile_step(
    objective, tx, schedule, cfg.optimizer, mesh, rules, shardings, abstract
  )
  history = []
  for _ in range(steps):
    state, metrics = step(state, {k: batch[k] for k in keys}, jax.random.key(seed))
    history.append({k: float(v) for k, v in metrics.items()})
    batch = next(batches)
  held = pipeline.PipelineOptions(
    preset=objective.preset, batch_size=8, seed=seed + 1000, num_epochs=None
  )
  held_it = iter(pipeline.make_dataset(data, held, 0, 1))
  embed = jax.jit(lambda p, b: objective.encoder.apply({'params': p}, objective.features(b))['cls'])
  cls = np.concatenate(
    [np.asarray(embed(state.teacher, {k: next(held_it)[k] for k in keys})) for _ in range(8)]
  )
  return {
    'held_rank': float(losses.effective_rank(jnp.asarray(cls))),
    'step_rank': float(np.mean([h['effective_rank'] for h in history[-20:]])),
    'loss': float(np.mean([h['loss'] for h in history[-20:]])),
    'frame_loss': float(np.mean([h['frame_loss'] for h in history[-20:]])),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--data', default='tests/fixtures/audio')
  parser.add_argument('--seeds', type=int, nargs='+', default=[0])
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()
  print(
    f'tiny config, {args.steps} steps, data {args.data}; held-out rank over 64 crops (width 32)'
  )
  print(
    f'{"contrastive_weight":>18s} {"seed":>4s} {"held rank":>9s} {"step rank":>9s} '
    f'{"frame loss":>10s}'
  )
  for seed in args.seeds:
    for weight in (1.0, 0.0):
      r = run(args.data, args.steps, weight, seed)
      print(
        f'{weight:18.1f} {seed:4d} {r["held_rank"]:9.2f} {r["step_rank"]:9.2f} '
        f'{r["frame_loss"]:10.3f}'
      )


if __name__ == '__main__':
  main()
