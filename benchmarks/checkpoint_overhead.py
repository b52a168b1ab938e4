"""Checkpointing overhead: the trainer's step time with and without saves every 50 steps.

Three runs of the same config in one invocation, interleaved so machine load hits them alike:
  none   no checkpoint until the end (the end is excluded from the timing)
  async  async saves every 50 steps (the default mode)
  sync   blocking saves every 50 steps (for reference)
The step time comes from the trainer's own metrics (`steps_per_s` per logging interval of 10
steps, excluding the first interval, which includes warm-up); the figure is the mean step time over
all timed steps, so the intervals that contain a save weigh in fully.

  python benchmarks/checkpoint_overhead.py                       # tiny quick-start model
  python benchmarks/checkpoint_overhead.py --set model.variant=S ...   # any override
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {
  'none': ('checkpoint.every_steps=1000000',),
  'async': ('checkpoint.every_steps=50', 'checkpoint.async_save=true'),
  'sync': ('checkpoint.every_steps=50', 'checkpoint.async_save=false'),
}


def run(mode: str, args, root: str, cache: str) -> list[dict]:
  workdir = os.path.join(root, mode)
  overrides = [
    f'total_steps={args.steps}',
    'logging.log_every_steps=10',
    f'global_batch={args.batch}',
    *MODES[mode],
    *args.set,
  ]
  env = dict(
    os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0'
  )
  cmd = [sys.executable, '-m', 'aasp_jax.main', f'--config={args.config}', f'--workdir={workdir}']
  cmd += [f'--config.{o}' for o in overrides]
  subprocess.run(
    cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def mean_step_seconds(entries: list[dict]) -> float:
  timed = [e for e in entries[1:] if e['step'] % 10 == 0]
  return float(np.sum([10 / e['steps_per_s'] for e in timed]) / (10 * len(timed)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/quickstart.py')
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--set', action='append', default=[], help='config override key=value')
  args = parser.parse_args()
  times = {mode: [] for mode in MODES}
  with tempfile.TemporaryDirectory() as root:
    cache = os.path.join(root, 'xla_cache')
    for repeat in range(args.repeats):
      for mode in MODES:
        entries = run(mode, args, os.path.join(root, str(repeat)), cache)
        times[mode].append(mean_step_seconds(entries))
        print(f'repeat {repeat} {mode:5s}: {times[mode][-1] * 1e3:.1f} ms/step', flush=True)
  base = np.median(times['none'])
  print(
    f'\nconfig {args.config} {" ".join(args.set)}; global batch {args.batch}; {args.steps} steps'
  )
  print('mode   ms/step (median of repeats)   ratio to no checkpoints')
  for mode in MODES:
    t = np.median(times[mode])
    print(f'{mode:6s} {t * 1e3:10.1f}                     {t / base:.3f}')


if __name__ == '__main__':
  main()
