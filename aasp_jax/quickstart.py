"""The Quick-start main job: pre-train a tiny AaSP encoder on the bundled real recordings, then
compare its linear-probe accuracy with randomly initialised encoders.

  python -m aasp_jax.quickstart                 # a few CPU minutes (what `make demo` runs)
  python -m aasp_jax.quickstart --short         # a few steps: checks the whole path (CI runs it)

It runs the same trainer as `aasp-pretrain` (checkpoints, resume, TensorBoard, metrics.jsonl), so
rerunning the command continues an interrupted run. The probe task is the 10 Sonic Pi categories
with at least 10 clips, on the fixed split in data/sonicpi (see its README).
"""

import json
import os
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

from aasp_jax import configuration
from aasp_jax.evaluate import linear_probe
from aasp_jax.train import loop, metrics_writer
from aasp_jax.train.objective import AaSPObjective

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = flags.DEFINE_string(
  'config', os.path.join(REPO, 'configs', 'quickstart.py'), 'path/to/config.py[:args]'
)
_SET = flags.DEFINE_multi_string('set', [], 'Config override key=value, e.g. total_steps=500.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Default: runs/quickstart (or _short).')
_SHORT = flags.DEFINE_bool(
  'short',
  False,
  'Train 2 steps and probe one random encoder with 2-fold CV: a fast end-to-end check.',
)
_RANDOM_SEEDS = flags.DEFINE_integer('random_seeds', 3, 'Random encoders in the baseline.')

SHORT_OVERRIDES = ('total_steps=2', 'logging.log_every_steps=1', 'checkpoint.every_steps=2')


def random_encoder_params(objective: AaSPObjective, seeds: list[jax.Array]) -> list:
  return [nn.meta.unbox(objective.init_params(key)['encoder']) for key in seeds]


def probe(objective: AaSPObjective, params, config) -> dict:
  # --short checks the path, not the number: one L2 value and 2 folds instead of 5 x 5 fits.
  short = {'l2_grid': (1e-2,), 'folds': 2} if _SHORT.value else {}
  return linear_probe.probe_encoder(
    objective.encoder,
    params,
    objective.preset,
    config.probe.train,
    config.probe.test,
    batch_size=config.probe.batch_size,
    **short,
  )


def summary_lines(result: dict) -> list[str]:
  random = result['random_accuracy']
  return [
    '',
    '=' * 72,
    f'AaSP quick start: {result["steps"]} steps of pre-training in {result["train_seconds"]:.0f} s '
    f'({result["total_seconds"]:.0f} s in all)',
    f'linear probe, Sonic Pi 10 categories ({result["test_clips"]} test clips, '
    f'{result["num_classes"]} classes, chance {1 / result["num_classes"]:.3f}):',
    f'  pre-trained encoder          accuracy {result["pretrained_accuracy"]:.3f}',
    f'  random encoders (n = {len(random)})     accuracy {np.mean(random):.3f} '
    f'± {np.std(random):.3f}  ({", ".join(f"{a:.3f}" for a in random)})',
    f'  clips skipped by the probe: {result["probe_skipped"]}',
    f'TensorBoard:   tensorboard --logdir {result["tensorboard"]}',
    f'loss curves:   {result["loss_png"]}',
    f'metrics:       {result["metrics_jsonl"]}',
    f'checkpoints:   {result["checkpoints"]}',
    f'this summary:  {result["summary_json"]}',
    '=' * 72,
  ]


def main(argv) -> None:
  del argv
  import logging

  logging.getLogger('absl').setLevel(logging.WARNING)  # orbax's per-thread checkpoint chatter
  overrides = list(_SET.value) + (list(SHORT_OVERRIDES) if _SHORT.value else [])
  config = configuration.load_config(_CONFIG.value, overrides)
  workdir = _WORKDIR.value or os.path.join(
    'runs', 'quickstart_short' if _SHORT.value else 'quickstart'
  )
  start = time.perf_counter()
  trained = loop.train(config, workdir)
  train_seconds = time.perf_counter() - start

  objective = AaSPObjective.from_config(config)
  pretrained = probe(objective, jax.device_get(trained.state.params['encoder']), config)
  # The baseline includes the very initialisation the pre-trained encoder started from.
  init_key = jax.random.split(jax.random.key(config.seed))[0]
  num_random = 1 if _SHORT.value else _RANDOM_SEEDS.value
  keys = [init_key] + [jax.random.key(1000 + i) for i in range(num_random - 1)]
  random = [probe(objective, p, config)['accuracy'] for p in random_encoder_params(objective, keys)]

  jsonl = os.path.join(workdir, metrics_writer.JSONL_NAME)
  result = {
    'steps': trained.step,
    'train_seconds': train_seconds,
    'total_seconds': time.perf_counter() - start,
    'pretrained_accuracy': pretrained['accuracy'],
    'random_accuracy': random,
    'num_classes': pretrained['num_classes'],
    'test_clips': pretrained['test_clips'],
    'probe_skipped': pretrained['skipped'],
    'final_metrics': trained.metrics,
    'tensorboard': os.path.join(workdir, metrics_writer.TENSORBOARD_DIR),
    'loss_png': metrics_writer.plot_loss_curves(jsonl, os.path.join(workdir, 'loss_curves.png')),
    'metrics_jsonl': jsonl,
    'checkpoints': os.path.join(workdir, 'checkpoints'),
    'summary_json': os.path.join(workdir, 'quickstart_result.json'),
  }
  with open(result['summary_json'], 'w') as f:
    json.dump(result, f, indent=2)
  print('\n'.join(summary_lines(result)))


if __name__ == '__main__':
  app.run(main)
