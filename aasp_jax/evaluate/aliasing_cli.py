"""The `aasp-aliasing` command: the aliasing-stability study of one or more checkpoints, side by side.

  aasp-aliasing --checkpoint runs/aape --checkpoint runs/conv --audio data/sonicpi/audio \
      --out aliasing_report --max_clips 64 --shifts 1-15

For each checkpoint (see `aasp_jax.evaluate.aliasing`): the mean and std cosine similarity of
clip embeddings under sub-patch time shifts of the input, the modulation-rate probe's accuracies,
and the AaPE stem's estimated frequencies and decays. Writes, in OUT:

- aliasing.json: every number, with the options, the clips measured and the clips skipped per reason;
- aliasing.md: the table of shift s vs cosine per checkpoint and the probe accuracies (also printed);
- stability.png: cosine vs shift, one line per checkpoint;
- lambda_<label>.png: AaPE's omega (in Hz of modulation) and alpha per frequency group, mean and
  spread over the measured clips (not written for a conv-stem checkpoint: the JSON says so);
- mask_<label>.png: one clip's log-mel with the patches masked by the checkpoint's pre-training
  mask generator (`aasp_jax.masking.inverse_block_mask` with its mask_ratio and block size).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time

import jax
import numpy as np

from aasp_jax import masking
from aasp_jax.evaluate import aliasing, pretrained

_logger = logging.getLogger(__name__)

_REPORT_JSON = 'aliasing.json'
_REPORT_MD = 'aliasing.md'


def parse_shifts(text: str) -> tuple[int, ...]:
  """'1-15', '1,2,4,8' or '1-4,8' -> sorted distinct shifts in frames."""
  shifts = set()
  for part in text.split(','):
    part = part.strip()
    match = re.fullmatch(r'(\d+)(?:-(\d+))?', part)
    if not match:
      raise argparse.ArgumentTypeError(
        f'--shifts {text!r}: give frame counts and ranges such as 1-15 or 1,2,4,8'
      )
    low, high = int(match.group(1)), int(match.group(2) or match.group(1))
    if high < low:
      raise argparse.ArgumentTypeError(f'--shifts {text!r}: range {part} runs backwards')
    shifts.update(range(low, high + 1))
  return tuple(sorted(shifts))


def _rates(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'--rates {text!r}: give comma-separated Hz values') from None


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='aasp-aliasing', description=__doc__.split('\n\n')[0])
  parser.add_argument(
    '--checkpoint',
    action='append',
    required=True,
    help='training workdir, checkpoints/ folder or step folder; repeat to compare',
  )
  parser.add_argument('--audio', required=True, help='folder of audio, or a .csv/.tsv/.jsonl file')
  parser.add_argument('--out', required=True, help='folder for the report and the plots')
  parser.add_argument('--max_clips', type=int, default=64, help='clips measured per checkpoint')
  parser.add_argument('--shifts', type=parse_shifts, default=parse_shifts('1-15'), help='frames')
  parser.add_argument('--which', choices=pretrained.WHICH, default='teacher', help='which encoder')
  parser.add_argument('--pooling', choices=aliasing.POOLINGS, default='cls_mean')
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument(
    '--rates',
    type=_rates,
    default=aliasing.DEFAULT_RATES_HZ,
    help='modulation rates (Hz) of the probe classes',
  )
  parser.add_argument('--probe_train', type=int, default=24, help='train clips per probe class')
  parser.add_argument('--probe_test', type=int, default=12, help='test clips per probe class')
  parser.add_argument('--probe_folds', type=int, default=5, help='CV folds choosing the probe l2')
  parser.add_argument('--seed', type=int, default=0, help='seeds the probe clips and the mask')
  return parser


def checkpoint_labels(paths) -> list[str]:
  """Short distinct labels: the workdir's name (a step folder adds '@step'), made unique."""
  labels = []
  for path in paths:
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if parts[-1].isdigit() and len(parts) >= 3 and parts[-2] == 'checkpoints':
      label = f'{parts[-3]}@{parts[-1]}'
    elif parts[-1] == 'checkpoints' and len(parts) >= 2:
      label = parts[-2]
    else:
      label = parts[-1]
    base, n = label, 2
    while label in labels:
      label, n = f'{base}#{n}', n + 1
    labels.append(label)
  return labels


def _file_label(label: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', label)


# ---------------------------------------------------------------------------------------------
# Plots


def _pyplot():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def plot_stability(results: list[dict], path: str) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in results:
    shift = r['shift']
    s = np.array([0, *shift['shifts']])
    mean = np.array([1.0, *shift['mean']])
    std = np.array([0.0, *shift['std']])
    line = ax.plot(s, mean, marker='o', label=f'{r["label"]} ({r["stem"]}, {shift["clips"]} clips)')
    ax.fill_between(s, mean - std, mean + std, color=line[0].get_color(), alpha=0.15)
  ax.set_xlabel(f'shift s (frames; a patch is {results[0]["patch_t"]})')
  ax.set_ylabel('cosine to the unshifted embedding')
  ax.set_title('Embedding stability under sub-patch time shifts (mean ± std)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_lambda(label: str, omega_hz: np.ndarray, alpha: np.ndarray, nyquist_hz: dict, path: str):
  """omega (Hz) and alpha [clips, G, N] per group: per-mode mean, with min-max and std spread."""
  plt = _pyplot()
  num_g, num_n = omega_hz.shape[1:]
  groups = np.arange(num_g)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, values, name in (
    (axes[0], omega_hz, 'omega (Hz of modulation)'),
    (axes[1], alpha, 'alpha'),
  ):
    for j in range(num_n):
      v = values[:, :, j]
      offset = (j - (num_n - 1) / 2) * 0.8 / max(num_n, 1)
      ax.errorbar(groups + offset, v.mean(0), yerr=v.std(0), fmt='o', capsize=3, label=f'mode {j}')
      ax.vlines(groups + offset, v.min(0), v.max(0), alpha=0.3)
    ax.set_xlabel('frequency group (low to high mel)')
    ax.set_ylabel(name)
    ax.set_xticks(groups)
    ax.ticklabel_format(axis='y', useOffset=False)
    ax.grid(alpha=0.3)
  axes[0].axhline(nyquist_hz['token'], color='k', ls='--', lw=1, label='token Nyquist')
  axes[0].axhline(nyquist_hz['frame'], color='gray', ls=':', lw=1, label='frame Nyquist')
  axes[0].legend(fontsize=8)
  fig.suptitle(f'{label}: AaPE estimates over {omega_hz.shape[0]} clips (mean ± std, min-max)')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_mask(label: str, window_tf: np.ndarray, mask_tf: np.ndarray, patch: tuple, path: str):
  """The log-mel [T, F] with the masked patches (mask [n_time, n_freq]) shaded."""
  from matplotlib.patches import Rectangle

  plt = _pyplot()
  patch_t, patch_f = patch
  fig, ax = plt.subplots(figsize=(min(14, max(7, window_tf.shape[0] / 40)), 4.5))
  ax.imshow(window_tf.T, origin='lower', aspect='auto', cmap='magma', interpolation='nearest')
  # Masked patches are greyed out and hatched; the visible ones (what the student sees) stay clear.
  for t, f in zip(*np.nonzero(mask_tf)):
    ax.add_patch(
      Rectangle(
        (t * patch_t - 0.5, f * patch_f - 0.5), patch_t, patch_f, facecolor='white', alpha=0.55,
        edgecolor='gray', hatch='//', linewidth=0.3,
      )
    )  # fmt: skip
  ax.set_title(
    f'{label}: log-mel and a pre-training mask ({mask_tf.mean():.0%} of patches masked, greyed)',
    fontsize=10,
  )
  ax.set_xlabel('frame')
  ax.set_ylabel('mel bin')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The study


def study_checkpoint(model, label: str, entries, args, out: str) -> dict:
  """Every measurement of one checkpoint, its plots written to `out`; a JSON-ready dict."""
  m = model.config.model
  shift = aliasing.shift_stability(
    model,
    entries,
    args.shifts,
    max_clips=args.max_clips,
    batch_size=args.batch_size,
    pooling=args.pooling,
  )
  probe = aliasing.modulation_probe(
    model,
    args.rates,
    train_per_class=args.probe_train,
    test_per_class=args.probe_test,
    seed=args.seed,
    batch_size=args.batch_size,
    pooling=args.pooling,
    folds=args.probe_folds,
  )
  result = {
    'label': label,
    'source': model.source,
    'step': model.step,
    'which': model.which,
    'stem': m.stem,
    'patch_t': m.patch_t,
    'target_length': model.preset.target_length,
    'shift': {
      'shifts': list(shift.shifts),
      'mean': shift.mean.tolist(),
      'std': shift.std.tolist(),
      'clips': len(shift.clip_ids),
      'examined': shift.examined,
      'skipped': shift.skipped,
      'min_clip_seconds': shift.segment_seconds,
      'clip_ids': list(shift.clip_ids),
    },
    'modulation_probe': probe,
    'plots': {},
  }
  file_label = _file_label(label)
  if shift.omega is None:
    result['lambda'] = {'skipped': f'stem {m.stem!r} has no AaPE: no alpha/omega to show'}
  else:
    delta = aliasing.aape_delta(model)
    omega_hz = aliasing.omega_to_hz(shift.omega, delta, model.preset)
    result['lambda'] = {
      'delta': delta,
      'clips': int(shift.omega.shape[0]),
      'omega_hz_mean': omega_hz.mean(0).tolist(),
      'omega_hz_std': omega_hz.std(0).tolist(),
      'alpha_mean': shift.alpha.mean(0).tolist(),
      'alpha_std': shift.alpha.std(0).tolist(),
    }
    name = f'lambda_{file_label}.png'
    nyquist = {
      'token': aliasing.token_nyquist_hz(model.preset, m.patch_t),
      'frame': aliasing.frames_per_second(model.preset) / 2.0,
    }
    plot_lambda(label, omega_hz, shift.alpha, nyquist, os.path.join(out, name))
    result['plots']['lambda'] = name
  o = model.config.objective
  grid = (model.preset.target_length // m.patch_t, model.preset.num_mel_bins // m.patch_f)
  masks = masking.inverse_block_mask(
    jax.random.key(args.seed), 1, grid, o.mask_ratio, o.mask_block_size
  )
  mask_tf = np.asarray(masks.mask[0]).reshape(grid)
  name = f'mask_{file_label}.png'
  plot_mask(label, shift.example_window, mask_tf, (m.patch_t, m.patch_f), os.path.join(out, name))
  result['plots']['mask'] = name
  result['mask'] = {
    'clip_id': shift.clip_ids[0],
    'mask_ratio': o.mask_ratio,
    'block_size': o.mask_block_size,
    'masked_fraction': float(mask_tf.mean()),
  }
  return result


def _fmt(value) -> str:
  return (
    '-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.3f}'
  )


def markdown_table(results: list[dict]) -> str:
  """The shift table (s vs mean ± std cosine per checkpoint) and the probe accuracies."""
  labels = [f'{r["label"]} ({r["stem"]})' for r in results]
  lines = ['| shift s (frames) | ' + ' | '.join(labels) + ' |']
  lines.append('|---:|' + '---:|' * len(results))
  shifts = sorted({s for r in results for s in r['shift']['shifts']})
  for s in shifts:
    cells = []
    for r in results:
      sh = r['shift']
      if s in sh['shifts']:
        i = sh['shifts'].index(s)
        cells.append(f'{sh["mean"][i]:.4f} ± {sh["std"][i]:.4f}')
      else:
        cells.append('-')
    lines.append(f'| {s} | ' + ' | '.join(cells) + ' |')
  lines.append('| clips measured / examined | ' + ' | '.join(
    f'{r["shift"]["clips"]} / {r["shift"]["examined"]}' for r in results
  ) + ' |')  # fmt: skip
  lines.append('')
  probe = results[0]['modulation_probe']
  nyq = probe['token_nyquist_hz']
  rates = probe['rates_hz']
  lines.append(
    f'Modulation-rate probe: rates {rates} Hz (token Nyquist {nyq:g} Hz), '
    f'{probe["train_per_class"]} train / {probe["test_per_class"]} test clips per class of '
    f'{probe["clip_seconds"]:.3f} s, chance {probe["chance"]:.3f}.'
  )
  lines.append('')
  lines.append('| probe accuracy | ' + ' | '.join(labels) + ' |')
  lines.append('|---|' + '---:|' * len(results))
  rows = (
    ('all classes', 'accuracy'),
    (f'classes below {nyq:g} Hz', 'accuracy_below'),
    (f'classes above {nyq:g} Hz', 'accuracy_above'),
    (f'probe on classes above {nyq:g} Hz only', 'accuracy_above_only'),
  )
  for name, key in rows:
    cells = [_fmt(r['modulation_probe'][key]) for r in results]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def run_study(args) -> dict:
  for path in args.checkpoint:
    # Fail on a bad checkpoint before any audio is read.
    pretrained.find_checkpoint(path)
  entries = aliasing.read_entries(args.audio)
  os.makedirs(args.out, exist_ok=True)
  labels = checkpoint_labels(args.checkpoint)
  results = []
  started = time.time()
  for path, label in zip(args.checkpoint, labels, strict=True):
    model = pretrained.load_pretrained(path, which=args.which)
    _logger.info('Aliasing study of %s (%s)', label, model.source)
    results.append(study_checkpoint(model, label, entries, args, args.out))
  plot_stability(results, os.path.join(args.out, 'stability.png'))
  report = {
    'audio': os.path.abspath(args.audio),
    'entries': len(entries),
    'options': {
      'max_clips': args.max_clips,
      'shifts': list(args.shifts),
      'which': args.which,
      'pooling': args.pooling,
      'rates_hz': list(args.rates),
      'probe_train': args.probe_train,
      'probe_test': args.probe_test,
      'probe_folds': args.probe_folds,
      'seed': args.seed,
    },
    'checkpoints': results,
    'plots': {'stability': 'stability.png'},
    'seconds': time.time() - started,
  }
  table = markdown_table(results)
  with open(os.path.join(args.out, _REPORT_JSON), 'w') as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(args.out, _REPORT_MD), 'w') as f:
    f.write('# Aliasing stability\n\n' + table)
    for r in results:
      if 'skipped' in r['lambda']:
        f.write(f'\n{r["label"]}: {r["lambda"]["skipped"]}.\n')
  print(table)
  return report


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.max_clips < 1 or args.batch_size < 1:
    raise SystemExit('aasp-aliasing: --max_clips and --batch_size must be at least 1')
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  try:
    run_study(args)
  except (FileNotFoundError, NotADirectoryError, ValueError) as e:
    print(f'aasp-aliasing: error: {e}', file=sys.stderr)
    return 1
  return 0


def run() -> None:
  """Console-script entry point (aasp-aliasing)."""
  sys.exit(main())


if __name__ == '__main__':
  run()
