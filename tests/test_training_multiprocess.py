"""Two real processes (jax.distributed on 127.0.0.1, 4 fake CPU devices each) train the tiny config
and log the same metrics as one process with 8 fake devices on the same global batch."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import program_runner as runner
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

SONICPI = os.path.join(REPO_ROOT, 'data', 'sonicpi')
FLAGS = (
  # The program's multi-process path is under test here; the AaPE stem's and the device log-mel's
  # sharded equivalence is tested in test_train_step_multidevice.py. These two cut compile time.
  '--config.model.stem=conv',
  '--config.data.features=log_mel',
  '--config.global_batch=8',
  '--config.total_steps=2',
  '--config.checkpoint.every_steps=2',
  # The online probe gathers the sharded encoder from both processes (a collective) at step 2.
  '--config.probe.every_steps=2',
  f'--config.probe.tasks={SONICPI}/task.csv',
)


def test_two_processes_match_one_process_with_all_devices(tmp_path):
  cache = str(tmp_path / 'cache')
  single = runner.run(tmp_path / 'single', cache, *FLAGS, devices=8)
  assert single.returncode == 0, single.stdout

  two = subprocess.run(
    [
      sys.executable, os.path.join(REPO_ROOT, 'launch', 'local_multiprocess.py'),
      '--num_processes=2', '--devices_per_process=4', '--',
      *runner.command(str(tmp_path / 'two'), *FLAGS)[3:],
    ],
    cwd=REPO_ROOT, env=runner.environment(cache), stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT, text=True, timeout=600,
  )  # fmt: skip
  assert two.returncode == 0, two.stdout
  assert '[p1] ' in two.stdout and 'over 8 devices (2 processes)' in two.stdout

  one_m = runner.training_metrics(runner.metrics(tmp_path / 'single'))
  two_m = runner.training_metrics(runner.metrics(tmp_path / 'two'))
  assert [e['step'] for e in two_m] == [1, 2, 2]  # the probe's entry comes last
  assert {'probe/sonicpi/linear', 'probe/sonicpi/knn'} <= set(two_m[-1])
  assert two_m[-1]['probe/sonicpi/linear'] == one_m[-1]['probe/sonicpi/linear']
  for a, b in zip(one_m, two_m):
    assert a.keys() == b.keys()
    for key in a:
      # Cross-process reductions (gloo) may add in another order than in-process ones.
      np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=1e-6, err_msg=key)
  # One input position for all processes (not one file per process), so any process count resumes.
  position = tmp_path / 'two' / 'checkpoints' / '2' / 'data_position' / 'metadata'  # orbax JSON
  assert json.load(open(position))['global_batches'] == 2
