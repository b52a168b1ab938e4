"""Shared pytest setup."""

import os
import sys

from absl import flags

# grain worker processes and absl-based entry points read absl flags; tests never parse argv.
flags.FLAGS.mark_as_parsed()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, 'tests', 'fixtures')
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)
