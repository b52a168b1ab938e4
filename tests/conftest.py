"""Shared pytest setup."""

import os
import sys

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
  """
  import eval_checkpoints

  root = tmp_path_factory.mktemp('tiny_checkpoints')
  cache = tmp_path_factory.mktemp('tiny_checkpoints_xla_cache')

  class Runs(dict):
    def __missing__(self, stem):
      self[stem] = eval_checkpoints.tiny_run(root, stem, cache)
      return self[stem]

  return Runs()
