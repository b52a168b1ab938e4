"""`aasp-pretrain` whose input delivers two batches and then blocks forever, like a read from a
network mount that stopped answering. Used by tests/test_training_signals.py."""

import threading

from aasp_jax import main
from aasp_jax.data import pipeline

_make_dataset = pipeline.make_dataset


def _starving(*args, **kwargs):
  dataset = _make_dataset(*args, **kwargs)

  class Starving:
    def __iter__(self):
      batches = iter(dataset)
      yield next(batches)
      yield next(batches)
      print('input starved', flush=True)
      threading.Event().wait()  # never set: a read that never returns

  return Starving()


if __name__ == '__main__':
  pipeline.make_dataset = _starving
  main.run()
