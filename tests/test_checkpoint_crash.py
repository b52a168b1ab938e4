"""A crash (SIGKILL) during an async save leaves the previous checkpoint as the latest, loadable one;
the half-written save is never listed and is cleaned up on the next start."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

import program_runner as runner
from aasp_jax import checkpointing
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_kill_during_async_save_keeps_the_previous_checkpoint(tmp_path):
  child = subprocess.Popen(
    [sys.executable, os.path.join(REPO_ROOT, 'tests', 'checkpoint_crash_child.py'), str(tmp_path)],
    cwd=REPO_ROOT,
    env=runner.environment(str(tmp_path / 'cache')),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  lines = []
  for line in child.stdout:
    lines.append(line)
    if line.startswith('saving 2'):
      break
  # Kill while step 2 is being written: its temporary folder exists and step 2 is not complete.
  runner.wait_for(lambda: runner.unfinished_saves(tmp_path), child, timeout=60, poll=0.001)
  child.kill()
  child.wait(timeout=60)
  assert runner.checkpoint_steps(tmp_path) == [1], ''.join(lines)
  assert runner.unfinished_saves(tmp_path), 'the save finished before the kill; nothing was tested'

  cfg = ConfigDict({'keep': 3, 'async_save': True})
  ckpts = checkpointing.RunCheckpoints(str(tmp_path), cfg)
  assert ckpts.latest_step() == 1
  mesh = jax.make_mesh(
    (1,), ('data',), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,)
  )
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  abstract = {
    'w': jax.ShapeDtypeStruct((50_000_000,), np.float32),
    'step': jax.ShapeDtypeStruct((), np.int32),
  }
  restored = ckpts.restore_latest(abstract, {'w': replicated, 'step': replicated})
  ckpts.close()
  state = restored.state
  assert not runner.unfinished_saves(tmp_path)  # the manager removes what the crash left behind
  assert int(state['step']) == 1
  assert float(state['w'].min()) == float(state['w'].max()) == 1.0
  assert restored.step == 1 and restored.data_position == {'global_batches': 1}
