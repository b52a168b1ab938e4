"""Shared pytest setup."""

import contextlib
import fcntl
import os
import sys
import time

# Multi-device tests need 8 fake CPU devices, and XLA reads this flag once, when the first test
# initialises the backend. Those test files set it themselves before importing jax (so they also run
# alone); setting it here too makes the suite independent of collection order. Single-device tests
# run on device 0 as before.
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()

from absl import flags  # noqa: E402

# grain worker processes and absl-based entry points read absl flags; tests never parse argv.
flags.FLAGS.mark_as_parsed()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, 'tests', 'fixtures')
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def tiny_checkpoints(tmp_path_factory):
  """{'aape': workdir, 'conv': workdir}: two real 2-step tiny pre-training runs, made on first use.

  Built lazily per stem, so a test that needs one stem pays for one run (~20 s each on 2 cores).
  Under pytest-xdist the runs are shared by the session's workers (each used to build its own):
  the first worker to need a stem builds it under a file lock, the others wait for it (bounded)
  and read it. Tests only read these workdirs.
  """
  import eval_checkpoints

  if os.environ.get('PYTEST_XDIST_WORKER'):
    shared = tmp_path_factory.getbasetemp().parent  # this session's folder, common to its workers
    root, cache = shared / 'tiny_checkpoints', shared / 'tiny_checkpoints_xla_cache'
    root.mkdir(exist_ok=True)
    cache.mkdir(exist_ok=True)
  else:
    root = tmp_path_factory.mktemp('tiny_checkpoints')
    cache = tmp_path_factory.mktemp('tiny_checkpoints_xla_cache')

  class Runs(dict):
    def __missing__(self, stem):
      failed = root / f'{stem}.failed'
      with _exclusive(root / f'{stem}.lock', timeout_s=900):
        if failed.exists():  # another worker's build failed: report it, do not build again
          raise RuntimeError(f'the tiny {stem} run failed in another worker:\n{failed.read_text()}')
        try:
          self[stem] = eval_checkpoints.tiny_run(root, stem, cache)
        except Exception as e:
          failed.write_text(f'{type(e).__name__}: {e}'[-4000:])
          raise
      return self[stem]

  return Runs()


@contextlib.contextmanager
def _exclusive(lock_path, timeout_s: float):
  """Holds an exclusive lock on `lock_path`, waiting at most `timeout_s` for it."""
  with open(lock_path, 'w') as f:
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() > deadline:
          raise TimeoutError(f'{lock_path}: held by another test worker for over {timeout_s} s')
        time.sleep(0.5)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
