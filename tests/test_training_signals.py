"""SIGTERM always ends the trainer in bounded time (the resume of a run with skipped clips is
tested in test_training_program.py)."""

import os
import signal
import subprocess
import sys
import threading
import time


import program_runner as runner
from conftest import REPO_ROOT


class Output:
  """Collects a process's merged output on a thread, so the test can wait for a line."""

  def __init__(self, process: subprocess.Popen):
    self.process, self.lines = process, []
    self._thread = threading.Thread(target=self._read, daemon=True)
    self._thread.start()

  def _read(self):
    for line in self.process.stdout:
      self.lines.append(line)

  def wait_for(self, text: str, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if any(text in line for line in self.lines):
        return
      if self.process.poll() is not None:
        self._thread.join(5)
        raise AssertionError(f'exited with {self.process.returncode}:\n{self.text}')
      time.sleep(0.05)
    raise AssertionError(f'{text!r} not printed within {timeout} s:\n{self.text}')

  @property
  def text(self) -> str:
    return ''.join(self.lines)


def test_sigterm_while_the_input_is_starved_saves_and_exits_within_10_s(tmp_path):
  command = [
    sys.executable, os.path.join(REPO_ROOT, 'tests', 'starved_child.py'), f'--workdir={tmp_path}',
    *runner.TINY_FLAGS, '--config.total_steps=50', '--config.checkpoint.every_steps=100',
  ]
  proc = subprocess.Popen(
    command, cwd=REPO_ROOT, env=runner.environment(str(tmp_path / 'cache')),
    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
  )
  out = Output(proc)
  try:
    out.wait_for('input starved', timeout=300)
    # Step 2 logged (every step is): the loop then waits for a third batch that never comes.
    deadline = time.monotonic() + 120
    while not (tmp_path / 'metrics.jsonl').exists() or len(runner.metrics(tmp_path)) < 2:
      assert time.monotonic() < deadline and proc.poll() is None, out.text
      time.sleep(0.05)
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    elapsed = time.monotonic() - sent
  finally:
    if proc.poll() is None:
      proc.kill()
  out._thread.join(5)
  assert proc.returncode == 0, out.text
  assert elapsed < 10
  assert 'SIGTERM while waiting for input at step 2: checkpoint saved' in out.text
  assert runner.checkpoint_steps(tmp_path) == [2]


def test_a_second_sigterm_ends_the_process_at_once(tmp_path):
  # The first SIGTERM only asks for a checkpoint after the current step (which may be minutes
  # away, or never come); the second one must end the process.
  code = (
    'import time\n'
    'from aasp_jax.train.preemption import PreemptionWatcher\n'
    'watcher = PreemptionWatcher()\n'
    "print('ready', flush=True)\n"
    'time.sleep(120)\n'
  )
  proc = subprocess.Popen(
    [sys.executable, '-c', code], cwd=REPO_ROOT, env=runner.environment(str(tmp_path)),
    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
  )
  out = Output(proc)
  try:
    out.wait_for('ready', timeout=120)
    proc.send_signal(signal.SIGTERM)
    out.wait_for('SIGTERM received', timeout=10)
    assert proc.poll() is None  # the first one is a request, not a kill
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGTERM
  out._thread.join(5)
  assert 'Second SIGTERM: exiting now' in out.text
