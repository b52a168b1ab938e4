"""Pre-trained against random, honestly measured: linear-probe accuracy and effective rank of the
quick-start encoder after 0, 50, 100 and 200 steps of pre-training, over several pre-training seeds,
next to randomly initialised encoders of the same architecture.

  python benchmarks/probe_vs_steps.py                    # 3 seeds x 200 steps: CPU tens of minutes
  python benchmarks/probe_vs_steps.py --short            # 1 seed x 2 steps, 1 random encoder
  python benchmarks/probe_vs_steps.py --seeds 0,1,2 --steps 50,100,200 --out benchmarks/results/x

Protocol (nothing here is tuned on the test split):
  - Pre-training: configs/quickstart.py (the tiny encoder on the bundled CC0 Sonic Pi clips) with
    config.seed = each pre-training seed, total_steps = the largest step, a checkpoint at every
    step asked for. Each seed trains in its own workdir under --workdir (rerunning resumes).
  - Step 0 of a seed is the exact initialisation that seed's run started from (the trainer's
    init key, `split(key(seed))[0]`), so the curve of each seed starts at its own encoder.
  - Steps > 0 are the EMA teacher of the checkpoint (the encoder EAT evaluates).
  - Random baseline: `pretrained.random_encoder(config, seed)` for --random_seeds (not the seeds
    of any pre-training run).
  - The probe: the fixed split data/sonicpi/probe_train.csv / probe_test.csv (10 categories with
    at least 10 clips), clip embeddings [CLS, mean token] of the frozen encoder, and
    `linear_probe.probe` (standardised features, L2 multinomial logistic regression by L-BFGS, l2
    chosen by 5-fold CV on the train split only).
  - Effective rank (Roy & Vetterli 2007; RankMe): exp of the entropy of the normalised singular
    values of the centred train-split embedding matrix.
  - Mean and std over seeds; the std is the sample std (ddof = 1).

Outputs <out>.json (every measurement), <out>.md (the table) and <out>.png (accuracy and effective
rank vs steps, error bars = std over seeds, the random baseline as a band).
"""

import argparse
import json
import logging
import os
import sys
import time

import flax.linen as nn
import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from aasp_jax import configuration, losses
from aasp_jax.data import manifest
from aasp_jax.evaluate import embeddings as embeddings_lib
from aasp_jax.evaluate import linear_probe, pretrained
from aasp_jax.train import loop
from aasp_jax.train.objective import AaSPObjective

CONFIG = os.path.join(REPO, 'configs', 'quickstart.py')
SONICPI = os.path.join(REPO, 'data', 'sonicpi')
PROBE_TRAIN = os.path.join(SONICPI, 'probe_train.csv')
PROBE_TEST = os.path.join(SONICPI, 'probe_test.csv')


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--seeds', default='0,1,2', help='Pre-training seeds (config.seed).')
  parser.add_argument('--steps', default='50,100,200', help='Checkpoint steps probed (0 is added).')
  parser.add_argument('--random_seeds', default='100,101,102', help='Random-init baseline seeds.')
  parser.add_argument(
    '--out',
    default=os.path.join(REPO, 'benchmarks', 'results', 'probe_vs_steps'),
    help='Output path without extension (.json, .md and .png are written).',
  )
  parser.add_argument(
    '--workdir',
    default=None,
    help='Folder of the training runs (default: runs/probe_vs_steps, or runs/probe_vs_steps_short).',
  )
  parser.add_argument(
    '--short',
    action='store_true',
    help='Smoke mode: seed 0, 2 steps, 1 random encoder, one l2 and 2 CV folds.',
  )
  args = parser.parse_args(argv)
  if args.short:
    args.seeds, args.steps, args.random_seeds = '0', '2', '100'
    if args.out == parser.get_default('out'):
      args.out = os.path.join(REPO, 'runs', 'probe_vs_steps_short', 'probe_vs_steps')
  args.seeds = [int(s) for s in args.seeds.split(',')]
  args.steps = sorted({int(s) for s in args.steps.split(',')} - {0})
  args.random_seeds = [int(s) for s in args.random_seeds.split(',')]
  if not args.steps:
    parser.error('--steps needs at least one step > 0')
  args.workdir = args.workdir or os.path.join(
    REPO, 'runs', 'probe_vs_steps_short' if args.short else 'probe_vs_steps'
  )
  return args


def training_config(seed: int, steps: list[int], short: bool):
  every = int(np.gcd.reduce(steps))
  overrides = [
    f'seed={seed}',
    f'total_steps={max(steps)}',
    f'checkpoint.every_steps={every}',
    f'checkpoint.keep={max(steps) // every + 1}',
    'checkpoint.async_save=false',
    f'logging.log_every_steps={1 if short else 10}',
  ]
  return configuration.load_config(CONFIG, overrides)


class ProbeData:
  """The fixed probe split: entries and class ids (the train manifest's vocabulary)."""

  def __init__(self):
    self.train = manifest.read_manifest(PROBE_TRAIN)
    self.test = manifest.read_manifest(PROBE_TEST)
    self.vocabulary = linear_probe.label_vocabulary(self.train, PROBE_TRAIN)
    self.train_y = linear_probe.class_ids(self.train, self.vocabulary, PROBE_TRAIN)
    self.test_y = linear_probe.class_ids(self.test, self.vocabulary, PROBE_TEST)


def measure(encoder, params, preset, data: ProbeData, batch_size: int, short: bool) -> dict:
  """Probe accuracy and effective rank of one frozen encoder."""
  embed = lambda entries: embeddings_lib.clip_embeddings(
    encoder, params, preset, entries, batch_size
  )
  start = time.perf_counter()
  train, test = embed(data.train), embed(data.test)
  grid = {'l2_grid': (1e-2,), 'folds': 2} if short else {}
  result = linear_probe.probe(
    train.embeddings,
    data.train_y[train.indices],
    test.embeddings,
    data.test_y[test.indices],
    len(data.vocabulary),
    **grid,
  )
  return {
    'accuracy': result.accuracy,
    'l2': result.l2,
    'train_accuracy': result.train_accuracy,
    'cv_accuracy': result.cv_accuracy[result.l2],
    'effective_rank': float(losses.effective_rank(train.embeddings)),
    'embedding_dim': int(train.embeddings.shape[1]),
    'train_clips': result.num_train,
    'test_clips': result.num_test,
    'skipped': train.num_skipped + test.num_skipped,
    'probe_seconds': time.perf_counter() - start,
  }


def initial_encoder(config, checkpoint_encoder: pretrained.Pretrained) -> dict:
  """The encoder parameters the trainer started from (the same key derivation as loop.train)."""
  init_rng, _ = jax.random.split(jax.random.key(config.seed))
  objective = AaSPObjective.from_config(config)
  params = jax.tree.map(np.asarray, nn.meta.unbox(objective.init_params(init_rng)['encoder']))
  shapes = lambda tree: jax.tree.map(np.shape, tree)
  if shapes(params) != shapes(checkpoint_encoder.params):
    raise RuntimeError('the initial encoder and the checkpointed one have different layouts')
  return params


class Results:
  """Every measurement so far, saved after each one so an interrupted study resumes."""

  def __init__(self, path: str):
    self.path = path
    self.data = {'pretrained': {}, 'random': {}, 'train_seconds': {}}
    if os.path.exists(path):
      with open(path) as f:
        self.data.update(json.load(f))

  def get(self, kind: str, key: str):
    return self.data[kind].get(key)

  def put(self, kind: str, key: str, value) -> None:
    self.data[kind][key] = value
    with open(self.path + '.tmp', 'w') as f:
      json.dump(self.data, f, indent=2)
    os.replace(self.path + '.tmp', self.path)


def std(values) -> float:
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise(args, results: Results) -> dict:
  steps = [0] + args.steps
  rows = []
  for step in steps:
    per_seed = [results.get('pretrained', f'{s}/{step}') for s in args.seeds]
    acc = [m['accuracy'] for m in per_seed]
    rank = [m['effective_rank'] for m in per_seed]
    rows.append(
      {
        'step': step,
        'accuracy_per_seed': acc,
        'accuracy_mean': float(np.mean(acc)),
        'accuracy_std': std(acc),
        'effective_rank_per_seed': rank,
        'effective_rank_mean': float(np.mean(rank)),
        'effective_rank_std': std(rank),
        'l2_per_seed': [m['l2'] for m in per_seed],
      }
    )
  random = [results.get('random', str(s)) for s in args.random_seeds]
  random_acc = [m['accuracy'] for m in random]
  random_rank = [m['effective_rank'] for m in random]
  last = rows[-1]
  gain = last['accuracy_mean'] - float(np.mean(random_acc))
  paired = [a - b for a, b in zip(last['accuracy_per_seed'], rows[0]['accuracy_per_seed'])]
  any_run = results.get('pretrained', f'{args.seeds[0]}/{steps[-1]}')
  return {
    'protocol': {
      'config': os.path.relpath(CONFIG, REPO),
      'pretraining_seeds': args.seeds,
      'steps': steps,
      'random_seeds': args.random_seeds,
      'probe_train': os.path.relpath(PROBE_TRAIN, REPO),
      'probe_test': os.path.relpath(PROBE_TEST, REPO),
      'num_classes': None,
      'train_clips': any_run['train_clips'],
      'test_clips': any_run['test_clips'],
      'std': 'sample std over seeds (ddof=1)',
      'step_0': "each seed's own initialisation (the trainer's init key)",
      'encoder': 'EMA teacher for steps > 0',
      'short': args.short,
    },
    'rows': rows,
    'random': {
      'accuracy_per_seed': random_acc,
      'accuracy_mean': float(np.mean(random_acc)),
      'accuracy_std': std(random_acc),
      'effective_rank_per_seed': random_rank,
      'effective_rank_mean': float(np.mean(random_rank)),
      'effective_rank_std': std(random_rank),
    },
    'gain_at_last_step': {
      'accuracy_gain_over_random_mean': gain,
      'pretrained_std': last['accuracy_std'],
      'random_std': std(random_acc),
      # Mean +- std intervals that do not overlap; with 3 seeds per side, a weak criterion only.
      'exceeds_seed_spread': bool(gain > last['accuracy_std'] + std(random_acc)),
      'paired_gain_over_own_init': paired,
      'min_pretrained_above_max_random': bool(min(last['accuracy_per_seed']) > max(random_acc)),
      'one_test_clip_in_accuracy': 1.0 / any_run['test_clips'],
    },
    'train_seconds': results.data['train_seconds'],
    'measurements': {'pretrained': results.data['pretrained'], 'random': results.data['random']},
  }


def table(summary: dict) -> str:
  p, r, g = summary['protocol'], summary['random'], summary['gain_at_last_step']
  lines = [
    '# Linear probe vs pre-training steps (quick-start encoder, Sonic Pi 10 categories)',
    '',
    (
      f'Pre-training seeds {p["pretraining_seeds"]}; random-init seeds {p["random_seeds"]}; '
      f'{p["train_clips"]} train / {p["test_clips"]} test clips (one test clip = '
      f'{100 * g["one_test_clip_in_accuracy"]:.1f} accuracy points); mean ± sample std over seeds.'
    ),
    '',
    '| step | probe accuracy | per seed | effective rank | l2 chosen |',
    '|---:|---:|---|---:|---|',
  ]
  for row in summary['rows']:
    lines.append(
      f'| {row["step"]} | {row["accuracy_mean"]:.3f} ± {row["accuracy_std"]:.3f} | '
      + ', '.join(f'{a:.3f}' for a in row['accuracy_per_seed'])
      + f' | {row["effective_rank_mean"]:.2f} ± {row["effective_rank_std"]:.2f} | '
      + ', '.join(f'{v:g}' for v in row['l2_per_seed'])
      + ' |'
    )
  lines.append(
    f'| random init | {r["accuracy_mean"]:.3f} ± {r["accuracy_std"]:.3f} | '
    + ', '.join(f'{a:.3f}' for a in r['accuracy_per_seed'])
    + f' | {r["effective_rank_mean"]:.2f} ± {r["effective_rank_std"]:.2f} | |'
  )
  last = summary['rows'][-1]['step']
  lines += [
    '',
    (
      f'Gain at step {last} over the random baseline: {g["accuracy_gain_over_random_mean"]:+.3f} '
      f'(std {g["pretrained_std"]:.3f} pre-trained, {g["random_std"]:.3f} random); '
      f'exceeds the seed spread (mean ± std intervals apart): {g["exceeds_seed_spread"]}; '
      f'every pre-trained seed above every random encoder: {g["min_pretrained_above_max_random"]}.'
    ),
    'Paired gain of each seed over its own initialisation: '
    + ', '.join(f'{d:+.3f}' for d in g['paired_gain_over_own_init'])
    + '.',
    'Training wall time per seed (s): '
    + ', '.join(f'{k}: {v:.0f}' for k, v in summary['train_seconds'].items())
    + '.',
  ]
  return '\n'.join(lines) + '\n'


def plot(summary: dict, path: str) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  steps = [row['step'] for row in summary['rows']]
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, label in (
    (axes[0], 'accuracy', 'linear-probe test accuracy'),
    (axes[1], 'effective_rank', 'effective rank (train embeddings)'),
  ):
    per_seed = np.array([row[f'{key}_per_seed'] for row in summary['rows']])
    for column in per_seed.T:
      ax.plot(steps, column, color='tab:blue', alpha=0.25, lw=1)
    means = [row[f'{key}_mean'] for row in summary['rows']]
    stds = [row[f'{key}_std'] for row in summary['rows']]
    ax.errorbar(
      steps, means, yerr=stds, color='tab:blue', marker='o', capsize=4, label='pre-trained'
    )
    r_mean, r_std = summary['random'][f'{key}_mean'], summary['random'][f'{key}_std']
    ax.axhline(r_mean, color='tab:red', ls='--', label='random init (mean ± std)')
    ax.axhspan(r_mean - r_std, r_mean + r_std, color='tab:red', alpha=0.15)
    ax.set_xlabel('pre-training step')
    ax.set_ylabel(label)
    ax.set_xticks(steps)
    ax.grid(alpha=0.3)
  axes[0].legend(loc='best')
  n = len(summary['protocol']['pretraining_seeds'])
  fig.suptitle(f'Quick-start encoder on Sonic Pi: {n} pre-training seeds, error bars = std')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)  # orbax's per-thread checkpoint chatter
  os.makedirs(args.workdir, exist_ok=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  results = Results(os.path.join(args.workdir, 'measurements.json'))
  data = ProbeData()
  start = time.perf_counter()

  def log(message):
    print(f'[{time.perf_counter() - start:7.0f} s] {message}', flush=True)

  for seed in args.seeds:
    config = training_config(seed, args.steps, args.short)
    workdir = os.path.join(args.workdir, f'seed{seed}')
    if results.get('train_seconds', str(seed)) is None:
      t0 = time.perf_counter()
      loop.train(config, workdir)
      results.put('train_seconds', str(seed), time.perf_counter() - t0)
      log(f'seed {seed}: {max(args.steps)} steps trained')
    for step in [0] + args.steps:
      key = f'{seed}/{step}'
      if results.get('pretrained', key) is not None:
        continue
      model = pretrained.load_pretrained(workdir, which='teacher', step=step or args.steps[0])
      params = initial_encoder(config, model) if step == 0 else model.params
      m = measure(model.encoder, params, model.preset, data, config.probe.batch_size, args.short)
      results.put('pretrained', key, m)
      log(f'seed {seed} step {step}: accuracy {m["accuracy"]:.3f} rank {m["effective_rank"]:.2f}')
  config = training_config(args.seeds[0], args.steps, args.short)
  for seed in args.random_seeds:
    if results.get('random', str(seed)) is not None:
      continue
    model = pretrained.random_encoder(config, seed)
    m = measure(
      model.encoder, model.params, model.preset, data, config.probe.batch_size, args.short
    )
    results.put('random', str(seed), m)
    log(f'random seed {seed}: accuracy {m["accuracy"]:.3f} rank {m["effective_rank"]:.2f}')

  summary = summarise(args, results)
  summary['protocol']['num_classes'] = len(data.vocabulary)
  summary['study_seconds_this_invocation'] = time.perf_counter() - start
  with open(args.out + '.json', 'w') as f:
    json.dump(summary, f, indent=2)
  text = table(summary)
  with open(args.out + '.md', 'w') as f:
    f.write(text)
  plot(summary, args.out + '.png')
  print(text)
  print(f'wrote {args.out}.json, .md and .png')
  return summary


if __name__ == '__main__':
  main()
