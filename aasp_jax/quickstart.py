"""The Quick-start main job: pre-train a tiny encoder on the bundled real recordings, then score it
with the shared probe protocol against its own initialisation, other random encoders and log-mel
statistics, on both bundled probe tasks.

  python -m aasp_jax.quickstart                 # a few CPU minutes (what `make demo` runs)
  python -m aasp_jax.quickstart --short         # a few steps: checks the whole path (CI runs it)

It runs the same trainer as `aasp-pretrain` (checkpoints, resume, TensorBoard, metrics.jsonl, the
online probe), so rerunning the command continues an interrupted run. The probe tasks and the
protocol are `aasp_jax/evaluate/protocol.py`'s (3 x 5-fold group k-fold, ridge and kNN); every row
is printed with its standard error, and the gain over the run's own initialisation is called a
gain only beyond 3 standard errors of its paired per-fold differences.
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from aasp_jax import configuration
from aasp_jax.evaluate import pretrained, protocol
from aasp_jax.train import loop, metrics_writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = flags.DEFINE_string(
  'config', os.path.join(REPO, 'configs', 'quickstart.py'), 'path/to/config.py[:args]'
)
_SET = flags.DEFINE_multi_string('set', [], 'Config override key=value, e.g. total_steps=500.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Default: runs/quickstart (or _short).')
_SHORT = flags.DEFINE_bool(
  'short',
  False,
  'Train 2 steps and probe only the run and its initialisation: a fast end-to-end check.',
)
_RANDOM_SEEDS = flags.DEFINE_integer('random_seeds', 3, 'Random encoders in the baseline.')

SHORT_OVERRIDES = ('total_steps=2', 'logging.log_every_steps=1', 'checkpoint.every_steps=2')


def probe_all(config, teacher_params, short: bool) -> dict:
  """Every row of the summary, per task: the pre-trained encoder (EMA teacher), its own
  initialisation, other random encoders and the log-mel statistics, all through the protocol."""
  feature = protocol.HEADLINE_FEATURE
  init = pretrained.initial_encoder(config)
  randoms = [pretrained.random_encoder(config, 1000 + i) for i in range(_RANDOM_SEEDS.value - 1)]
  out = {}
  for path in loop.probe_task_paths(config):
    task = protocol.ProbeTask.from_manifest(path)

    def score(params):
      return protocol.score_encoder(task, init.encoder, params, init.preset, [feature])[feature]

    mel = protocol.score_features(task, protocol.mel_statistics(init.preset, task.entries))
    out[task.name] = {
      'num_clips': len(task.entries),
      'num_classes': task.num_classes,
      'num_groups': int(len(np.unique(task.groups))),
      'pretrained': score(teacher_params),
      'initialisation': score(init.params),
      'random': [score(r.params) for r in ([] if short else randoms)],
      'mel_stats': mel['mel_stats'],
    }
  return out


def _row(name: str, scores: dict) -> str:
  parts = [f'{c} {s.accuracy:.3f} ± {s.se:.3f}' for c, s in scores.items()]
  return f'  {name:<30}' + '   '.join(parts)


def summary_lines(result: dict, probes: dict) -> list[str]:
  lines = [
    '',
    '=' * 78,
    f'AaSP quick start: {result["steps"]} steps of pre-training in {result["train_seconds"]:.0f} s '
    f'({result["total_seconds"]:.0f} s in all)',
    f'probe protocol (aasp_jax/evaluate/protocol.py): {protocol.REPEATS} x {protocol.FOLDS}-fold '
    f'group k-fold, feature "{protocol.HEADLINE_FEATURE}", accuracy ± SE over folds',
  ]
  for task, p in probes.items():
    lines.append(
      f'{task}: {p["num_clips"]} clips, {p["num_classes"]} classes, {p["num_groups"]} sources'
    )
    lines.append(_row('pre-trained encoder (EMA)', p['pretrained']))
    lines.append(_row('its own initialisation', p['initialisation']))
    if p['random']:
      for classifier in protocol.CLASSIFIERS:
        acc = [r[classifier].accuracy for r in p['random']]
        acc.append(p['initialisation'][classifier].accuracy)
        se = np.std(acc, ddof=1) / np.sqrt(len(acc))
        lines.append(
          f'  {"random encoders (n = " + str(len(acc)) + ")":<30}{classifier} '
          f'{np.mean(acc):.3f} ± {se:.3f} over seeds ({", ".join(f"{a:.3f}" for a in acc)})'
        )
    lines.append(_row('log-mel statistics', p['mel_stats']))
    for classifier in protocol.CLASSIFIERS:
      gain, se = protocol.fold_gain(p['pretrained'][classifier], p['initialisation'][classifier])
      lines.append(
        f'  gain over own init, {classifier:<7}   {gain:+.3f} ± {se:.3f} (paired over folds): '
        f'{protocol.verdict(gain, se)}'
      )
  lines += [
    'One short run on one seed cannot show a small gain; the several-seed study with its',
    'budgets, baselines and ablations is benchmarks/learning.py (figures: benchmarks/RESULTS.md).',
    f'TensorBoard:   tensorboard --logdir {result["tensorboard"]}',
    f'curves (PNG):  {result["loss_png"]}',
    f'metrics:       {result["metrics_jsonl"]}',
    f'checkpoints:   {result["checkpoints"]}',
    f'this summary:  {result["summary_json"]}',
    '=' * 78,
  ]
  return lines


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
  probes = probe_all(config, jax.device_get(trained.state.teacher), _SHORT.value)

  jsonl = os.path.join(workdir, metrics_writer.JSONL_NAME)
  result = {
    'steps': trained.step,
    'train_seconds': train_seconds,
    'total_seconds': time.perf_counter() - start,
    'final_metrics': trained.metrics,
    'tensorboard': os.path.join(workdir, metrics_writer.TENSORBOARD_DIR),
    'loss_png': metrics_writer.plot_loss_curves(jsonl, os.path.join(workdir, 'loss_curves.png')),
    'metrics_jsonl': jsonl,
    'checkpoints': os.path.join(workdir, 'checkpoints'),
    'summary_json': os.path.join(workdir, 'quickstart_result.json'),
  }
  with open(result['summary_json'], 'w') as f:
    json.dump(
      {
        **result,
        'probes': {
          task: {
            k: (
              [{c: s.to_json() for c, s in r.items()} for r in v]
              if k == 'random'
              else {c: s.to_json() for c, s in v.items()}
              if isinstance(v, dict)
              else v
            )
            for k, v in p.items()
          }
          for task, p in probes.items()
        },
      },
      f,
      indent=2,
    )
  print('\n'.join(summary_lines(result, probes)))


if __name__ == '__main__':
  app.run(main)
