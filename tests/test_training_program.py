"""The training program end to end, in real processes: resume after SIGKILL equals an uninterrupted
run, SIGTERM saves and exits cleanly, and the restart continues from that checkpoint."""

import glob
import os
import signal

import numpy as np
import orbax.checkpoint as ocp
import pytest

import program_runner as runner

pytestmark = pytest.mark.slow

N = 4


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('xla_cache'))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, cache_dir):
  """Run A: 2N steps in one go."""
  workdir = tmp_path_factory.mktemp('run_a')
  done = runner.run(
    workdir,
    cache_dir,
    f'--config.total_steps={2 * N}',
    f'--config.checkpoint.every_steps={2 * N}',
    # Tracing steps 2-3 must not change what is trained (compared with run B below).
    '--config.logging.profile_start_step=2',
    '--config.logging.profile_num_steps=2',
  )
  assert done.returncode == 0, done.stdout
  return workdir


def saved_state(workdir, step):
  path = os.path.join(str(workdir), 'checkpoints', str(step), 'state')
  return ocp.PyTreeCheckpointer().restore(path)


def assert_same_arrays(a, b):
  flat_a, flat_b = ocp.tree.to_flat_dict(a), ocp.tree.to_flat_dict(b)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=key)


def test_resume_after_sigkill_equals_the_uninterrupted_run(tmp_path, cache_dir, uninterrupted):
  # Run B saves every step, so saves are in flight most of the time, and is killed as soon as the
  # step-N checkpoint is complete.
  flags = (f'--config.total_steps={2 * N}', '--config.checkpoint.every_steps=1')
  proc = runner.start(tmp_path, cache_dir, *flags)
  runner.wait_for(lambda: N in runner.checkpoint_steps(tmp_path), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  killed_at = runner.checkpoint_steps(tmp_path)
  assert max(killed_at) < 2 * N, 'the run finished before it was killed; the test proves nothing'
  logged_before_kill = runner.metrics(tmp_path)

  restart = runner.run(tmp_path, cache_dir, *flags)
  assert restart.returncode == 0, restart.stdout
  assert f'restored step {max(killed_at)}' in restart.stdout
  assert not runner.unfinished_saves(tmp_path)

  a, b = runner.metrics(uninterrupted), runner.metrics(tmp_path)
  assert [e['step'] for e in b] == list(range(1, 2 * N + 1))  # no step lost or logged twice
  assert runner.training_metrics(b) == runner.training_metrics(a)
  assert len(logged_before_kill) >= N
  assert_same_arrays(saved_state(tmp_path, 2 * N), saved_state(uninterrupted, 2 * N))
  assert glob.glob(str(uninterrupted / 'profile' / '**' / '*.xplane.pb'), recursive=True)


def test_sigterm_saves_exits_cleanly_and_the_restart_continues(tmp_path, cache_dir, uninterrupted):
  flags = (f'--config.total_steps={2 * N}', '--config.checkpoint.every_steps=100')
  # Same steps as run A, but checkpoints only on preemption and at the end.
  proc = runner.start(tmp_path, cache_dir, *flags)
  runner.wait_for(
    lambda: os.path.exists(tmp_path / 'metrics.jsonl') and len(runner.metrics(tmp_path)) >= 1, proc
  )
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, output
  saved = runner.checkpoint_steps(tmp_path)
  assert len(saved) == 1 and 1 <= saved[0] < 2 * N, (saved, output)
  assert f'SIGTERM) at step {saved[0]}' in output

  restart = runner.run(tmp_path, cache_dir, *flags)
  assert restart.returncode == 0, restart.stdout
  assert f'restored step {saved[0]}' in restart.stdout
  assert runner.training_metrics(runner.metrics(tmp_path)) == runner.training_metrics(
    runner.metrics(uninterrupted)
  )
