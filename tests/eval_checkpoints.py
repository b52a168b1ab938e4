"""Real tiny pre-training checkpoints for the evaluation tests (HEAR API, probes, fine-tuning, ...).

Each is an actual `aasp-pretrain` run of a few steps on the fixture audio (the same code path a
user's checkpoint comes from), written once per test session and shared through the session's
compilation cache. The model is the training-program tests' tiny CPU config: width 32, depth 2,
64-frame (0.64 s) windows, so chunking and padding are exercised with short clips.
"""

import os

import program_runner

STEPS = 2


def tiny_run(root, stem: str, cache_dir) -> str:
  """The workdir of a finished 2-step run with `stem` ('aape' or 'conv') under `root`."""
  workdir = os.path.join(str(root), f'tiny_{stem}')
  if not os.path.isdir(os.path.join(workdir, 'checkpoints', str(STEPS))):
    done = program_runner.run(
      workdir,
      str(cache_dir),
      f'--config.model.stem={stem}',
      f'--config.total_steps={STEPS}',
      '--config.global_batch=2',
    )
    assert done.returncode == 0, done.stdout
  return workdir
