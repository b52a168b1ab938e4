"""The training program end to end, in real processes: resume after SIGKILL equals an uninterrupted
run, SIGTERM saves and exits cleanly, and the restart continues from that checkpoint. The data
holds clips that are skipped, so the resumed runs must also continue the stream and its skip counts
exactly (they used to restart from zero)."""

import glob
import json
import os
import shutil
import signal

import numpy as np
import orbax.checkpoint as ocp
import pytest
import soundfile as sf

import program_runner as runner
from conftest import FIXTURES

pytestmark = pytest.mark.slow

N = 4


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('xla_cache'))


@pytest.fixture(scope='module')
def data_flag(tmp_path_factory):
  """The four fixture clips and three that are skipped (empty, not audio, digital silence)."""
  data = tmp_path_factory.mktemp('data_with_skips')
  for name in ('guit_harmonics.flac', 'hat_raw.flac', 'loop_amen.flac', 'perc_swash.flac'):
    shutil.copy(os.path.join(FIXTURES, 'audio', name), data / name)
  (data / 'empty.wav').write_bytes(b'')
  (data / 'text.flac').write_bytes(b'not audio at all' * 100)
  sf.write(data / 'silence.wav', np.zeros(16000, np.float32), 16000)
  return f'--config.data.train={data}'


def skip_totals(entry: dict) -> dict:
  return {k: v for k, v in entry.items() if k.startswith('skipped/')}


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, cache_dir, data_flag):
  """Run A: 2N steps in one go."""
  workdir = tmp_path_factory.mktemp('run_a')
  done = runner.run(
    workdir,
    cache_dir,
    data_flag,
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


def test_resume_after_sigkill_equals_the_uninterrupted_run(
  tmp_path, cache_dir, uninterrupted, data_flag
):
  # Run B saves every step, so saves are in flight most of the time, and is killed as soon as the
  # step-N checkpoint is complete.
  flags = (data_flag, f'--config.total_steps={2 * N}', '--config.checkpoint.every_steps=1')
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
  assert sum(skip_totals(a[-1]).values()) > 0, 'no clip was skipped: the test proves less'
  assert runner.training_metrics(b) == runner.training_metrics(a)  # skip counts included
  # The checkpoint's input position: one global batch per step and the run's skip totals.
  position = json.load(open(tmp_path / 'checkpoints' / str(2 * N) / 'data_position' / 'metadata'))
  assert position['global_batches'] == 2 * N
  assert {f'skipped/{r}': float(n) for r, n in position['skipped'].items()} == skip_totals(a[-1])
  assert len(logged_before_kill) >= N
  assert_same_arrays(saved_state(tmp_path, 2 * N), saved_state(uninterrupted, 2 * N))
  assert glob.glob(str(uninterrupted / 'profile' / '**' / '*.xplane.pb'), recursive=True)


def test_sigterm_saves_exits_cleanly_and_the_restart_continues(
  tmp_path, cache_dir, uninterrupted, data_flag
):
  flags = (data_flag, f'--config.total_steps={2 * N}', '--config.checkpoint.every_steps=100')
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


def test_trains_from_a_shard_glob(tmp_path, cache_dir, data_flag):
  # The README's form, --config.data.train='.../clips-*.array_record', used to pass the check and
  # then fail in open_source.
  from aasp_jax.data import pack

  folder = data_flag.split('=', 1)[1]
  pack.pack(pack.PackConfig(folder, str(tmp_path / 'packs'), num_shards=2, workers=1), progress=False)
  glob_flag = f'--config.data.train={tmp_path}/packs/clips-*.array_record'
  # The uninterrupted run's step budget: its compiled step (schedule included) comes from the cache.
  done = runner.run(tmp_path / 'w', cache_dir, glob_flag, f'--config.total_steps={2 * N}')
  assert done.returncode == 0, done.stdout
  assert runner.checkpoint_steps(tmp_path / 'w') == [2 * N]
  assert 'clips-*.array_record' in done.stdout  # the data check names the source it opened
