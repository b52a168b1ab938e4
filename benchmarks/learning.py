"""Does pre-training learn? Pre-train variants for a fixed budget over several seeds, probe their
checkpoints along the way with the shared protocol (aasp_jax/evaluate/protocol.py), and compare with
each run's own initialisation, a log-mel statistics baseline and a supervised upper bound.

  python benchmarks/learning.py train --variants aasp,mae --seeds 0,1,2 --steps 600 --probe_every 200
  python benchmarks/learning.py baselines          # mel statistics + supervised upper bound
  python benchmarks/learning.py report             # table (.md), figure (.png), learning.json

Everything lives under --out (default benchmarks/results/learning): one workdir per run
(`runs/<variant>_s<seed>`, the trainer's own checkpoints, so an interrupted run resumes), each with
`probe.json` (every probed step, every feature and classifier), plus `baselines.json`. `train`
skips runs and steps already probed, so rerunning a command continues it.

Pre-training data (`--data`): the bundled Sonic Pi clips (data/sonicpi, 206 clips, 7 min) plus,
where it is present, the Asterisk speech prompts (54 min, CC-BY-SA-3.0; `--asterisk`, default
../shared/data/asterisk; elsewhere rebuild them from Debian's asterisk-core-sounds-{en,es}-g722
packages, 16 kHz FLAC with a `manifest.csv` of `path`); the counts are recorded in each run.
`--data ...,gm` adds the GM task's own clips (transductive; off by default). A run that could not
finish is probed where it stopped with `train --probe_only` (its table rows end early).
Probe tasks (`TASKS`): data/sonicpi/task.csv (drum and sample categories), data/gm_instruments/
task.csv (instrument families of real SoundFont samples), and two of real speech from the Free
Spoken Digit Dataset (data/fsdd, CC BY-SA 4.0): `fsdd_digit` (the spoken digit, every test speaker
unseen) and `fsdd_speaker` (who speaks, every test digit unseen); all are split by source (see
their READMEs). The two FSDD tasks share one forward pass. A task added after a run finished is
probed on its kept checkpoints by `train --probe_only` (only the steps that lack it).

The supervised upper bound (`baselines`) fine-tunes the same encoder with labels on repeat 0's
training folds until a group-disjoint validation split of those folds stops improving (patience,
step cap), and records where each fold stopped (`supervised`).
"""

import argparse
import csv
import json
import logging
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# The probe's ridge and kNN fits are small (a few thousand rows x 128-768 features), so OpenBLAS's
# threads gain nothing there, and on 2 cores shared with XLA's threads (and other jobs) they spin
# against them: scoring the four tasks took 27-100 s per encoder with the default threads and 5 s
# with one (2 loaded cores). Set before numpy loads; an OPENBLAS_NUM_THREADS already set is kept.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import jax  # noqa: E402
import numpy as np  # noqa: E402

from aasp_jax import checkpointing, configuration  # noqa: E402
from aasp_jax.evaluate import pretrained, protocol  # noqa: E402

TASKS = {
  'sonicpi': os.path.join(REPO, 'data', 'sonicpi', 'task.csv'),
  'gm_instruments': os.path.join(REPO, 'data', 'gm_instruments', 'task.csv'),
  'fsdd_digit': os.path.join(REPO, 'data', 'fsdd', 'digit', 'task.csv'),
  'fsdd_speaker': os.path.join(REPO, 'data', 'fsdd', 'speaker', 'task.csv'),
}
# name -> (quickstart config argument, overrides). Every variant shares the quick-start sizes,
# batch, optimiser and schedule; only the listed switches differ.
VARIANTS = {
  'aasp': ('', []),
  'no_contrastive': ('', ['objective.contrastive_weight=0.0']),
  'conv_stem': ('stem=conv', []),
  # XLA's grouped convolutions are ~20x slower than dense ones on CPU (EAT's decoder: 16 groups),
  # so the tiny CNN decoder runs dense 3x3 convolutions here.
  'cnn_decoder': ('predictor=cnn', ['model.predictor.cnn_groups=1']),
  'masked_stem': ('', ['objective.stem_input=masked']),
  'eat_loss_scale': ('', ['objective.loss_scale=eat']),
  'eat_utterance_sum': ('', ['objective.utterance_reduction=sum']),
  'eat_ffn_targets': ('', ['objective.target_layers=ffn']),
  # EAT's pre-training as its code runs it (configs/common.py apply_recipe, proven update for update
  # in tests/test_eat_step.py) at the quick-start size, its schedule scaled to the run (warm-up
  # 53k of 400k updates; EMA annealed over the run). EAT's 16-group decoder (as wide as the encoder).
  'eat': ('recipe=eat', ['optimizer.warmup_fraction=0.133']),
  # The recipe the study ran before issue 22 (benchmarks/RESULTS.md, first pass), rebuilt from its
  # switches on the current code: pre-LN, AaSP's positions and init, a 64-wide decoder with an
  # input projection, affine LayerNorm and a learned mask token, dense 3x3 convolutions, the CLS
  # term summed over the global rows, optax's AdamW decaying kernels only. Three old behaviours are
  # fixed for every variant and not switchable: the EMA decay's one-update lag, round() for the
  # visible count and the decoder's missing first residual.
  'eat_old': ('stem=conv,predictor=cnn', [
    'objective.contrastive_weight=0.0', 'objective.loss_scale=eat',
    'objective.utterance_reduction=sum', 'objective.target_layers=ffn',
    'optimizer.warmup_fraction=0.133', 'model.predictor.cnn_groups=1',
  ]),
  'mae': ('recipe=mae', []),
  # Crop length against clip length: most Sonic Pi clips and every GM clip are shorter than the
  # 2.56 s crop; 1.28 s halves the padding (the probe's window is the crop).
  'crop128': ('target_length=128', []),
  # Masking on the 16 x 8 grid (128 patches): EAT's 0.8 leaves ~26 visible patches here.
  'mask50': ('', ['objective.mask_ratio=0.5']),
  # A faster teacher: at 0.99 -> 0.999 over 600 steps the teacher's horizon is most of the run.
  'ema_fast': ('', ['optimizer.ema_start=0.98', 'optimizer.ema_end=0.995']),
}


def _listed(folder: str, listing: str) -> list[str]:
  """Absolute paths of the clips a folder's CSV listing names (its `path` column)."""
  with open(os.path.join(folder, listing)) as f:
    return [os.path.join(folder, r['path']) for r in csv.DictReader(f)]


def pretrain_manifest(out: str, asterisk: str | None, sources: str) -> tuple[str, dict]:
  """A CSV of every pre-training clip (absolute paths); returns (path, counts per source).

  `sources`: comma-separated from sonicpi, asterisk, soundfonts, gm. 'soundfonts' adds the notes
  rendered from two other GM SoundFonts by benchmarks/soundfont_notes.py (in-domain for the GM
  task, none of its samples); 'gm' adds the GM instrument task's own clips (unlabelled):
  transductive pre-training, reported as such.
  """
  rows = []
  counts = {}
  names = sources.split(',')
  for name, listing in (('sonicpi', 'labels.csv'), ('gm', 'task.csv')):
    if name in names:
      folder = os.path.join(REPO, 'data', 'sonicpi' if name == 'sonicpi' else 'gm_instruments')
      clips = _listed(folder, listing)
      rows += clips
      counts[name] = len(clips)
  if 'soundfonts' in names:
    folder = os.path.join(out, 'soundfont_notes')
    listing = os.path.join(folder, 'manifest.csv')
    if not os.path.isfile(listing):
      raise SystemExit(f'{listing}: missing; build it with python benchmarks/soundfont_notes.py')
    notes = _listed(folder, 'manifest.csv')
    rows += notes
    counts['soundfonts'] = len(notes)
  if 'asterisk' in names and asterisk and os.path.isfile(os.path.join(asterisk, 'manifest.csv')):
    speech = _listed(asterisk, 'manifest.csv')
    rows += speech
    counts['asterisk'] = len(speech)
  path = os.path.join(out, f'pretrain_{sources.replace(",", "_")}.csv')
  os.makedirs(out, exist_ok=True)
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['path'])
    writer.writerows([r] for r in rows)
  return path, counts


def run_config(variant: str, seed: int, steps: int, probe_every: int, data: str, extra=()):
  arg, overrides = VARIANTS[variant]
  overrides = list(overrides) + [
    f'seed={seed}',
    f'total_steps={steps}',
    f'checkpoint.every_steps={probe_every}',
    'checkpoint.keep=100',
    f'optimizer.ema_anneal_steps={steps}',
    f'data.train={data}',
    'logging.log_every_steps=50',
    'probe.every_steps=0',  # the benchmark probes the saved checkpoints itself
    *extra,
  ]
  path = os.path.join(REPO, 'configs', 'quickstart.py') + (f':{arg}' if arg else '')
  return configuration.load_config(path, overrides), overrides


def score_json(scores: dict) -> dict:
  return {f: {c: s.to_json() for c, s in per.items()} for f, per in scores.items()}


def probe_model(model, tasks) -> dict:
  """{task: protocol scores} of one encoder; tasks over the same clips (the two FSDD tasks) share
  one forward pass."""
  features, out = {}, {}
  for name, task in tasks.items():
    clips = tuple((e.path, e.start, e.end) for e in task.entries)
    if clips not in features:
      features[clips] = protocol.encoder_features(model.encoder, model.params, model.preset,
                                                  task.entries)
    out[name] = score_json(protocol.score_features(task, features[clips]))
  return out


def train(args) -> None:
  from aasp_jax.train import loop

  data, counts = pretrain_manifest(args.out, args.asterisk, args.data)
  tasks = {name: protocol.ProbeTask.from_manifest(TASKS[name], name) for name in _tasks(args)}
  for variant in args.variants.split(','):
    for seed in [int(s) for s in args.seeds.split(',')]:
      workdir = os.path.join(args.out, 'runs', f'{variant}{args.tag}_s{seed}')
      record_path = os.path.join(workdir, 'probe.json')
      record = json.load(open(record_path)) if os.path.exists(record_path) else {}
      config, overrides = run_config(
        variant, seed, args.steps, args.probe_every, data, args.set
      )
      record.update(variant=variant + args.tag, seed=seed, overrides=overrides, data=counts,
                    budget_steps=args.steps)
      record.setdefault('steps', {})
      # A step counts as probed only on every task: a task added later is probed where missing.
      missing = _missing(record, 0, tasks)
      if missing:
        record['steps'].setdefault('0', {}).update(
          probe_model(pretrained.initial_encoder(config), missing))
      if not args.probe_only:
        start = time.perf_counter()
        result = loop.train(config, workdir)
        record.setdefault('train_seconds', 0.0)
        record['train_seconds'] += time.perf_counter() - start
        record['final_metrics'] = {k: float(v) for k, v in result.metrics.items()}
      saved = set(checkpointing.complete_steps(os.path.join(workdir, 'checkpoints')))
      record['completed_steps'] = max(saved | {0})
      for step in range(args.probe_every, args.steps + 1, args.probe_every):
        missing = _missing(record, step, tasks)
        if not missing or step not in saved:
          continue
        model = pretrained.load_pretrained(workdir, step=step)
        record['steps'].setdefault(str(step), {}).update(probe_model(model, missing))
        head = {t: record['steps'][str(step)][t][protocol.HEADLINE_FEATURE]['linear']['accuracy']
                for t in tasks}
        print(f'{variant} seed {seed} step {step}: {head}', flush=True)
      with open(record_path, 'w') as f:
        json.dump(record, f)


def _tasks(args) -> list[str]:
  """The task names that --tasks selects (all of TASKS by default)."""
  names = args.tasks.split(',') if args.tasks else list(TASKS)
  unknown = [n for n in names if n not in TASKS]
  if unknown:
    raise SystemExit(f'--tasks: unknown task(s) {unknown}; known: {", ".join(TASKS)}')
  return names


def _missing(record: dict, step: int, tasks: dict) -> dict:
  done = record['steps'].get(str(step), {})
  return {name: task for name, task in tasks.items() if name not in done}


def baselines(args) -> None:
  config, _ = run_config('aasp', 0, args.steps, args.probe_every, 'unused')
  preset = configuration.frontend_preset(config)
  path = os.path.join(args.out, 'baselines.json')
  out = json.load(open(path)) if os.path.exists(path) else {}
  for name in _tasks(args):
    task = protocol.ProbeTask.from_manifest(TASKS[name], name)
    out.setdefault(name, {})
    out[name]['mel_stats'] = score_json(
      protocol.score_features(task, protocol.mel_statistics(preset, task.entries))
    )['mel_stats']
    out[name]['chance'] = float(np.bincount(task.labels).max() / len(task.labels))
    # Earlier files hold fixed-budget bounds ('supervised_<steps>'); they are kept and reported.
    key = (f'supervised_es{args.supervised_max_steps}_p{args.supervised_patience}'
           f'x{args.supervised_eval_every}')
    if args.supervised_max_steps and key not in out[name]:
      out[name][key] = [
        supervised(task, int(seed), args.supervised_max_steps, args.supervised_patience,
                   args.supervised_eval_every)
        for seed in args.supervised_seeds.split(',')
      ]
    with open(path, 'w') as f:  # after each task: an interrupted run keeps what it finished
      json.dump(out, f)
  print(json.dumps({t: {k: v for k, v in d.items() if k == 'chance'} for t, d in out.items()}))


def _runs(out: str) -> list[dict]:
  root = os.path.join(out, 'runs')
  runs = []
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    path = os.path.join(root, name, 'probe.json')
    if os.path.exists(path):
      runs.append(json.load(open(path)))
  return runs


def _mean_se(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float('nan')
  return float(values.mean()), float(se)


def summarise(runs: list[dict], feature: str, classifier: str) -> dict:
  """{variant: {task: {step: {...}}}}: accuracy mean and SE over seeds, the paired gain over each
  seed's own initialisation (mean, SE, z) and the mean protocol SE of a single run."""
  out: dict = {}
  by_variant: dict = {}
  for run in runs:
    by_variant.setdefault(run['variant'], []).append(run)
  for variant, vruns in by_variant.items():
    out[variant] = {'seeds': sorted(r['seed'] for r in vruns), 'tasks': {}}
    for task in TASKS:
      rows = {}
      for step in _probed_steps(vruns, task):
        acc = [r['steps'][str(step)][task][feature][classifier]['accuracy'] for r in vruns]
        init = [r['steps']['0'][task][feature][classifier]['accuracy'] for r in vruns]
        se_run = [r['steps'][str(step)][task][feature][classifier]['se'] for r in vruns]
        mean, se = _mean_se(acc)
        rows[step] = {
          'accuracy': mean, 'se_seeds': se, 'se_protocol': float(np.mean(se_run)),
          'per_seed': acc, 'gain': protocol.paired_gain(acc, init),
        }
      if rows:
        out[variant]['tasks'][task] = rows
  return out


def _probed_steps(runs: list[dict], task: str) -> list[int]:
  """The steps at which every run probed `task` (runs from before a task was added lack it)."""
  if not all(task in r['steps'].get('0', {}) for r in runs):
    return []
  steps = [{int(s) for s, scores in r['steps'].items() if task in scores} for r in runs]
  return sorted(set.intersection(*steps))


# (variant, reference, what differs): reported as a paired difference per seed when both ran.
COMPARISONS = (
  ('aasp_sf', 'aasp', 'pre-training data + SoundFont notes (in-domain for GM)'),
  ('mae_sf', 'mae', 'pre-training data + SoundFont notes (in-domain for GM)'),
  ('aasp_nosp', 'aasp_sf', "the Sonic Pi clips (the probe's own) left out of pre-training"),
  ('mae', 'aasp', 'MAE objective instead of AaSP'),
  ('crop128', 'aasp', 'crop and probe window 1.28 s instead of 2.56 s'),
  ('mask50', 'aasp', 'mask ratio 0.5 instead of 0.8'),
  ('ema_fast', 'aasp', 'EMA 0.98 -> 0.995 instead of 0.99 -> 0.999'),
  ('mae_sf', 'aasp_sf', 'MAE objective instead of AaSP, with the SoundFont notes'),
  ('eat', 'eat_old', "EAT's step as its code runs it instead of the recipe used before issue 22"),
  ('eat', 'aasp', "EAT's step instead of AaSP's"),
)


def compare(runs: list[dict], variant: str, reference: str, feature: str, classifier: str) -> dict:
  """{task: {step: paired difference variant - reference over the seeds both ran}}."""
  a = {r['seed']: r for r in runs if r['variant'] == variant}
  b = {r['seed']: r for r in runs if r['variant'] == reference}
  seeds = sorted(set(a) & set(b))
  if not seeds:
    return {}
  out = {'seeds': seeds}
  for task in TASKS:
    out[task] = {}
    for step in _probed_steps([x[s] for x in (a, b) for s in seeds], task):
      if step == 0:
        continue
      acc = [[x[s]['steps'][str(step)][task][feature][classifier]['accuracy'] for s in seeds]
             for x in (a, b)]
      out[task][step] = protocol.paired_gain(*acc)
  return out


def _fmt(mean, se) -> str:
  return f'{mean:.3f} ± {se:.3f}' if np.isfinite(se) else f'{mean:.3f}'


def report(args) -> None:
  runs = _runs(args.out)
  base_path = os.path.join(args.out, 'baselines.json')
  base = json.load(open(base_path)) if os.path.exists(base_path) else {}
  feature = protocol.HEADLINE_FEATURE
  result = {
    'protocol': {'folds': protocol.FOLDS, 'repeats': protocol.REPEATS, 'inner_folds':
                 protocol.INNER_FOLDS, 'l2_grid': list(protocol.L2_GRID), 'knn_k': protocol.KNN_K,
                 'headline_feature': feature},
    'linear': summarise(runs, feature, 'linear'),
    'knn': summarise(runs, feature, 'knn'),
    'baselines': base,
    'features': {},
    'comparisons': {
      f'{a} - {b}': {clf: compare(runs, a, b, feature, clf) for clf in ('linear', 'knn')}
      for a, b, _ in COMPARISONS
    },
  }
  # Every feature of every run's last step, for the "which layer / pooling" question.
  for run in runs:
    for task in TASKS:
      probed = [int(step) for step, scores in run['steps'].items() if task in scores]
      if not probed or task not in run['steps'].get('0', {}):
        continue
      last = str(max(probed))
      for feat, per in run['steps'][last][task].items():
        for clf, score in per.items():
          key = (run['variant'], task, feat, clf)
          result['features'].setdefault('|'.join(key), {'last': [], 'init': []})
          result['features']['|'.join(key)]['last'].append(score['accuracy'])
          result['features']['|'.join(key)]['init'].append(run['steps']['0'][task][feat][clf]['accuracy'])
  lines = [
    '# Learning benchmark (`benchmarks/learning.py`)', '',
    f'Protocol: {protocol.REPEATS} x {protocol.FOLDS}-fold stratified group k-fold (splits by '
    f'source), headline feature `{feature}`, linear = ridge classifier with l2 by nested '
    f'{protocol.INNER_FOLDS}-fold group CV, kNN k = {protocol.KNN_K} (cosine). Accuracy: mean over '
    'seeds ± SE over seeds (one seed: ± the protocol SE over folds). Gain: paired with each '
    "seed's own initialisation, mean ± SE over seeds (z = mean / SE).", '',
  ]
  lines += _reference_table(base)
  for task in TASKS:
    lines += [f'## {task}', '']
    b = base.get(task, {})
    if b:
      mel = b['mel_stats']
      lines.append(f'- chance (majority class): {b["chance"]:.3f}')
      lines.append(f'- log-mel statistics: linear {_fmt(mel["linear"]["accuracy"], mel["linear"]["se"])}, '
                   f'kNN {_fmt(mel["knn"]["accuracy"], mel["knn"]["se"])}')
      for key, val in b.items():
        if key.startswith('supervised'):
          lines.append(_supervised_line(val))
      lines.append('')
    lines += ['| variant | seeds | step | linear | gain vs own init (z) | kNN | kNN gain (z) |',
              '|---|---|---:|---:|---:|---:|---:|']
    for variant, v in result['linear'].items():
      for step, row in v['tasks'].get(task, {}).items():
        krow = result['knn'][variant]['tasks'][task][step]
        se = row['se_seeds'] if np.isfinite(row['se_seeds']) else row['se_protocol']
        kse = krow['se_seeds'] if np.isfinite(krow['se_seeds']) else krow['se_protocol']
        g, kg = row['gain'], krow['gain']
        lines.append(
          f'| {variant} | {len(v["seeds"])} | {step} | {_fmt(row["accuracy"], se)} | '
          f'{g["mean"]:+.3f} ± {g["se"]:.3f} ({g["z"]:.1f}) | {_fmt(krow["accuracy"], kse)} | '
          f'{kg["mean"]:+.3f} ± {kg["se"]:.3f} ({kg["z"]:.1f}) |'
        )
    lines.append('')
  compared = [(a, b, what) for a, b, what in COMPARISONS if result['comparisons'][f'{a} - {b}']['linear']]
  if compared:
    lines += ['## Paired comparisons between variants', '',
              ('Accuracy of the first variant minus the second, paired by seed (the same '
               'initialisation), mean ± SE over seeds (z).'), '',
              '| comparison | what differs | task | step | seeds | linear | kNN |',
              '|---|---|---|---:|---:|---:|---:|']
    for a, b, what in compared:
      cmp = result['comparisons'][f'{a} - {b}']
      for task in TASKS:
        for step, g in cmp['linear'][task].items():
          k = cmp['knn'][task][step]
          lines.append(f'| {a} − {b} | {what} | {task} | {step} | {len(cmp["linear"]["seeds"])} | '
                       f'{g["mean"]:+.3f} ± {g["se"]:.3f} ({g["z"]:.1f}) | '
                       f'{k["mean"]:+.3f} ± {k["se"]:.3f} ({k["z"]:.1f}) |')
    lines.append('')
  context = _context_lines(args.out)
  if context:
    lines += ['## What the encoder gives the predictor', '',
              'Frame loss with each clone\'s own encoder outputs against the same predictor given '
              "another clip's outputs (`frame_loss_shuffled`, positions kept), from metrics.jsonl:",
              '', '| run | step | frame loss | shuffled context | ratio |', '|---|---:|---:|---:|---:|']
    lines += context + ['']
  with open(os.path.join(args.out, 'learning.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(args.out, 'learning.json'), 'w') as f:
    json.dump(result, f, indent=1)
  _plot(result, os.path.join(args.out, 'learning.png'))
  print('\n'.join(lines))


def _reference_table(base: dict) -> list[str]:
  """What each task's labels reach (the supervised bound) next to chance and log-mel statistics."""
  rows = []
  for task in TASKS:
    b = base.get(task)
    if not b:
      continue
    # The latest bound trained to convergence, else an earlier fixed-budget one, labelled so.
    bounds = sorted((v for k, v in b.items() if k.startswith('supervised')),
                    key=lambda v: 'steps' not in v[0])
    bound = '—'
    if bounds:
      val = bounds[-1]
      m, se = _mean_se([v['accuracy'] for v in val])
      bound = _fmt(m, se if len(val) > 1 else val[0]['se'])
      if 'steps' in val[0]:
        bound += f' (fixed {val[0]["steps"]} steps)'
      else:
        bound += f' (best steps {", ".join(str(f["best_step"]) for f in val[0]["folds"])})'
    mel = b['mel_stats']['linear']
    rows.append(f'| {task} | {b["chance"]:.3f} | {_fmt(mel["accuracy"], mel["se"])} | {bound} |')
  if not rows:
    return []
  return ['## What labels reach', '',
          'Majority class, the log-mel statistics baseline (linear probe) and the supervised bound '
          '(the same encoder fine-tuned with labels to convergence, early stopping on a validation '
          'split of the training folds; repeat 0, first seed\'s stopping steps per fold).', '',
          '| task | chance | log-mel statistics | supervised bound |', '|---|---:|---:|---:|',
          *rows, '']


def _supervised_line(val: list[dict]) -> str:
  """One report line for a supervised bound (a list over seeds): its accuracy and, when it was
  trained to convergence, where each fold stopped."""
  m, se = _mean_se([v['accuracy'] for v in val])
  se = se if len(val) > 1 else val[0]['se']  # one seed: the SE over its folds
  if 'steps' in val[0]:  # the earlier fixed budget
    return (f'- supervised upper bound ({val[0]["steps"]} steps, repeat 0, seeds {len(val)}): '
            f'{_fmt(m, se)}')
  v = val[0]
  best = ', '.join(
    '/'.join(str(r['folds'][k]['best_step']) for r in val) for k in range(len(v['folds']))
  )
  stopped = [f['stopped_step'] for r in val for f in r['folds']]
  capped = sum(s == v['max_steps'] for s in stopped)
  return (f'- supervised upper bound (labels, end to end; early stopping on a group-disjoint '
          f'validation split of the training folds, every {v["eval_every"]} steps, patience '
          f'{v["patience"]}, cap {v["max_steps"]}; repeat 0, seeds {len(val)}): {_fmt(m, se)}; '
          f'best step per fold {best}; {capped} of {len(stopped)} fold(s) reached the cap')


def _context_lines(out: str) -> list[str]:
  lines = []
  root = os.path.join(out, 'runs')
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    path = os.path.join(root, name, 'metrics.jsonl')
    if not os.path.exists(path):
      continue
    entries = [json.loads(x) for x in open(path) if 'frame_loss_shuffled' in x]
    for e in entries[:: max(1, len(entries) // 4)] + entries[-1:]:
      lines.append(f'| {name} | {e["step"]} | {e["frame_loss"]:.4f} | '
                   f'{e["frame_loss_shuffled"]:.4f} | {e["frame_loss_shuffled"] / e["frame_loss"]:.3f} |')
  return lines


def _plot(result: dict, path: str) -> None:
  """Top: linear accuracy of the variants run over 3+ seeds; bottom: their paired gain over their
  own initialisations (one-seed ablations are in the table only)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  variants = [v for v, r in result['linear'].items() if len(r['seeds']) >= 3]
  colours = plt.get_cmap('tab20')
  fig, axes = plt.subplots(2, len(TASKS), figsize=(6 * len(TASKS), 9), squeeze=False)
  for col, task in enumerate(TASKS):
    top, bottom = axes[0, col], axes[1, col]
    for i, variant in enumerate(variants):
      rows = result['linear'][variant]['tasks'].get(task, {})
      if not rows:
        continue
      steps = sorted(rows)
      style = dict(marker='o', capsize=2, color=colours(i % 20), label=variant)
      top.errorbar(steps, [rows[s]['accuracy'] for s in steps],
                   yerr=[rows[s]['se_seeds'] for s in steps], **style)
      bottom.errorbar(steps, [rows[s]['gain']['mean'] for s in steps],
                      yerr=[rows[s]['gain']['se'] if s else 0.0 for s in steps], **style)
    b = result['baselines'].get(task)
    if b:
      top.axhline(b['mel_stats']['linear']['accuracy'], color='k', ls='--', label='log-mel stats')
      for key, val in b.items():
        if key.startswith('supervised'):
          fixed = 'steps' in val[0]
          label = f'supervised ({val[0]["steps"]} steps)' if fixed else 'supervised bound'
          top.axhline(np.mean([x['accuracy'] for x in val]), color='g', ls=':' if fixed else '-',
                      label=label)
    bottom.axhline(0.0, color='k', lw=0.8)
    bottom.axhline(0.10, color='r', ls=':', label='acceptance bar (+10 points)')
    top.set_title(f'{task}: linear probe ({result["protocol"]["headline_feature"]}), 3+ seeds')
    bottom.set_title(f'{task}: gain over own init (paired, ± SE over seeds)')
    for ax in (top, bottom):
      ax.set_xlabel('pre-training step (0 = own initialisation)')
      ax.legend(fontsize=6, ncol=2)
    top.set_ylabel('accuracy')
    bottom.set_ylabel('accuracy gain')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def supervised(
  task, seed: int, max_steps: int, patience: int, eval_every: int, batch: int = 32,
  lr: float = 1e-3, warmup: int = 50,
) -> dict:
  """The upper bound: what labels reach with the same encoder (from the run's initialisation for
  `seed`) plus a linear head on its mean-pooled valid tokens, fine-tuned end to end on the
  training folds of repeat 0 and scored on each held-out fold (AdamW, linear warm-up then a
  constant learning rate, first window of each clip).

  Trained to convergence without looking at the held-out fold: the training folds' clips are split
  by group (the protocol's inner split, fold 0 of `protocol.INNER_FOLDS`, so no source lies on both
  sides) into a validation part and a fitting part; every `eval_every` steps the validation
  accuracy is measured, training stops after `patience` evaluations without a new best or at
  `max_steps`, and the parameters of the best evaluation (earliest on ties) are scored. The
  fitting part is ~2/3 of the training folds, so this is a conservative bound.
  """
  import jax.numpy as jnp
  import optax

  init = pretrained.initial_encoder(configuration.load_config(
    os.path.join(REPO, 'configs', 'quickstart.py'), [f'seed={seed}']
  ))
  encoder, preset = init.encoder, init.preset
  # The protocol's log-mels of every clip (first window), cached per process, and the number of
  # valid frames of each.
  mels = protocol._batched(
    lambda x, n: {'x': x, 'frames': protocol.valid_frames(n, preset)}, preset, task.entries, 16
  )
  x_all, frames = mels.features['x'], mels.features['frames']
  labels, groups = task.labels[mels.indices], task.groups[mels.indices]
  patch_t, patch_f = protocol._patch_size(encoder)
  n_time, n_freq = preset.target_length // patch_t, preset.num_mel_bins // patch_f

  def logits_fn(params, x, fr):
    valid = jnp.repeat(jnp.arange(n_time)[None] * patch_t < fr[:, None], n_freq, axis=1)
    out = encoder.apply({'params': params['encoder']}, x, token_valid_bn=valid)
    w = valid[..., None].astype(jnp.float32)
    pooled = (out['tokens'] * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
    return pooled @ params['head']['w'] + params['head']['b']

  tx = optax.adamw(optax.warmup_constant_schedule(0.0, lr, warmup), weight_decay=0.05)

  @jax.jit
  def step(params, opt_state, x, fr, y):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, x, fr), y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  predict = jax.jit(lambda p, x, fr: jnp.argmax(logits_fn(p, x, fr), -1))
  chunk = 64

  def correct(params, rows):
    """bool per row: the prediction is right (rows in chunks of one compiled size)."""
    out = np.zeros(len(rows), bool)
    for i in range(0, len(rows), chunk):
      part = rows[i:i + chunk]
      padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part))])
      predicted = np.asarray(predict(params, x_all[padded], frames[padded]))[:len(part)]
      out[i:i + chunk] = predicted == labels[part]
    return out

  folds = task.folds[0][mels.indices]
  hits = np.zeros(len(labels), bool)
  per_fold = []
  start = time.perf_counter()
  for k in range(protocol.FOLDS):
    train_rows = np.flatnonzero(folds != k)
    inner = protocol._inner_folds(groups, labels, train_rows)
    val_rows, fit_rows = np.flatnonzero(inner == 0), np.flatnonzero(inner > 0)
    params = {
      'encoder': jax.tree.map(jnp.asarray, init.params),
      'head': {'w': jnp.zeros((encoder.width, task.num_classes)),
               'b': jnp.zeros((task.num_classes,))},
    }
    opt_state = tx.init(params)
    rng = np.random.default_rng(seed * 100 + k)
    best_acc, best_step, best_params, waited, curve = -1.0, 0, params, 0, []
    for t in range(1, max_steps + 1):
      rows = rng.choice(fit_rows, batch)
      params, opt_state = step(params, opt_state, x_all[rows], frames[rows], labels[rows])
      if t % eval_every and t != max_steps:
        continue
      acc = float(correct(params, val_rows).mean())
      curve.append([t, acc])
      if acc > best_acc:
        best_acc, best_step, best_params, waited = acc, t, params, 0
      else:
        waited += 1
        if waited >= patience:
          break
    held = np.flatnonzero(folds == k)
    hits[held] = correct(best_params, held)
    per_fold.append({
      'accuracy': float(hits[held].mean()), 'best_step': best_step, 'stopped_step': t,
      'val_accuracy': best_acc, 'fit_clips': len(fit_rows), 'val_clips': len(val_rows),
      'val_curve': curve,
    })
    print(f'supervised {task.name} seed {seed} fold {k}: best step {best_step} (stopped at {t}), '
          f'validation {best_acc:.3f}, held-out {per_fold[-1]["accuracy"]:.3f}', flush=True)
  accuracies = np.array([f['accuracy'] for f in per_fold])
  return {
    'accuracy': float(hits.mean()), 'se': float(accuracies.std(ddof=1) / np.sqrt(len(accuracies))),
    'per_fold': accuracies.tolist(), 'folds': per_fold, 'repeat': 0,
    'max_steps': max_steps, 'patience': patience, 'eval_every': eval_every, 'batch': batch,
    'lr': lr, 'seconds': time.perf_counter() - start,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('phase', choices=('train', 'baselines', 'report'))
  parser.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results', 'learning'))
  parser.add_argument('--variants', default='aasp')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--probe_every', type=int, default=200)
  parser.add_argument('--asterisk', default=os.path.join(REPO, '..', 'shared', 'data', 'asterisk'))
  parser.add_argument('--set', action='append', default=[], help='extra config override')
  parser.add_argument('--supervised_max_steps', type=int, default=1000,
                      help='the supervised bound\'s step cap (0: no bound)')
  parser.add_argument('--supervised_patience', type=int, default=4,
                      help='evaluations without a better validation accuracy before it stops')
  parser.add_argument('--supervised_eval_every', type=int, default=50)
  parser.add_argument('--supervised_seeds', default='0')
  parser.add_argument('--tasks', default='',
                      help=f'train/baselines on these tasks only (default all: {",".join(TASKS)})')
  parser.add_argument('--data', default='sonicpi,asterisk',
                      help='sonicpi, asterisk, soundfonts, gm')
  parser.add_argument('--tag', default='', help='suffix of the run names (e.g. a budget)')
  parser.add_argument('--probe_only', action='store_true',
                      help='probe the checkpoints a run has (an unfinished run, or tasks added '
                      'since it ran), do not train')
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  {'train': train, 'baselines': baselines, 'report': report}[args.phase](args)


if __name__ == '__main__':
  main()
