"""Preemption notices: when to stop, save and exit.

Cloud TPU VMs and SLURM send SIGTERM some time before killing a job. A single process catches it
with a Python handler and stops after the current step, or at once while it waits for input (the
loop polls `signalled` while the input pipeline is starved). A second SIGTERM ends the process
immediately with the default action, so a stuck process can always be ended. With several processes,
each host gets the signal at a slightly different step, so they must agree on one: JAX's preemption
sync manager (started by `jax.distributed.initialize`) catches SIGTERM itself and returns the same
step on every host through `reached_preemption_sync_point`.
"""

import logging
import os
import signal

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """`reached(step)` is True at the step where every process should save and stop."""

  def __init__(self):
    self._multi = jax.process_count() > 1
    self._signalled = False
    self._previous = None
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del frame
    if self._signalled:
      logging.warning('Second SIGTERM: exiting now, without a new checkpoint.')
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    logging.warning(
      'SIGTERM received: saving a checkpoint after the current step (a second SIGTERM exits at '
      'once).'
    )
    self._signalled = True

  @property
  def signalled(self) -> bool:
    """A SIGTERM arrived in this (single) process; always False with several processes."""
    return self._signalled

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
