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


def every_branch_active(params, seed=0):
  """The params of a checkpoint moved off their initial values everywhere, so that a parity test
  compares every branch (a 2-step run leaves AaPE's gate and its Lambda encoder's output layer at
  their zero init, where AaPE equals the plain conv stem):
  - AaPE outside its conv stem: + N(0, 0.3) noise, and the gate drawn from N(0, 1);
  - everything else (conv stem, CLS, blocks, norms, a learned position table, a head):
    + N(0, 0.05) noise.
  numpy arrays, float32, the same tree."""
  import jax
  import numpy as np

  rng = np.random.default_rng(seed)

  def perturb(path, array):
    name, array = jax.tree_util.keystr(path), np.asarray(array)
    noise = np.asarray(rng.standard_normal(array.shape), np.float32)
    if "['stem']" in name and "['conv_stem']" not in name:
      return noise if name.endswith("['gate']") else array + np.float32(0.3) * noise
    return array + np.float32(0.05) * noise

  return jax.tree_util.tree_map_with_path(perturb, params)
