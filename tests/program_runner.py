"""Runs `aasp-pretrain` in fresh processes for the training-program tests, with a tiny CPU config.

Every run shares one persistent XLA compilation cache (per test session), so the identical train
step is compiled once and the later runs (restarts, resumes) load it in well under a second.
"""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import FIXTURES, REPO_ROOT

TINY_FLAGS = [
  '--config=configs/pretrain.py:variant=tiny,target_length=64',
  f'--config.data.train={os.path.join(FIXTURES, "audio")}',
  '--config.model.dtype=float32',
  '--config.model.depth=2',
  '--config.model.width=32',
  '--config.model.num_heads=2',
  '--config.model.mlp_dim=64',
  '--config.model.aape.num_modes=2',
  '--config.model.predictor.width=16',
  '--config.model.predictor.num_heads=2',
  '--config.objective.top_k_layers=2',
  '--config.objective.num_clones=2',
  '--config.objective.projection_hidden=16',
  '--config.objective.projection_dim=8',
  '--config.optimizer.lr=0.002',
  '--config.logging.log_every_steps=1',
]


def environment(cache_dir: str, devices: int = 1) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['PYTHONPATH'] = REPO_ROOT + os.pathsep + env.get('PYTHONPATH', '')
  return env


def command(workdir: str, *flags: str) -> list[str]:
  return [sys.executable, '-m', 'aasp_jax.main', f'--workdir={workdir}', *TINY_FLAGS, *flags]


def _process_options(cache_dir: str, devices: int) -> dict:
  """One place for how every trainer process is started: repo root, environment, merged output."""
  return dict(
    cwd=REPO_ROOT,
    env=environment(cache_dir, devices),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def run(workdir, cache_dir, *flags, devices=1, timeout=600) -> subprocess.CompletedProcess:
  """Runs to completion; returns the process (stdout and stderr merged into .stdout)."""
  return subprocess.run(
    command(str(workdir), *flags), timeout=timeout, **_process_options(cache_dir, devices)
  )


def start(workdir, cache_dir, *flags, devices=1) -> subprocess.Popen:
  return subprocess.Popen(command(str(workdir), *flags), **_process_options(cache_dir, devices))


def wait_for(predicate, process: subprocess.Popen, timeout: float = 300, poll: float = 0.01):
  """Polls `predicate()` until true; fails with the process output if it exits or times out."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    if process.poll() is not None:
      raise AssertionError(f'process exited with {process.returncode}:\n{process.stdout.read()}')
    time.sleep(poll)
  process.send_signal(signal.SIGKILL)
  raise AssertionError(f'timed out:\n{process.stdout.read()}')


def metrics(workdir) -> list[dict]:
  with open(os.path.join(str(workdir), 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def checkpoint_steps(workdir) -> list[int]:
  """Complete checkpoints (orbax renames a step folder into place only when it is complete)."""
  folder = os.path.join(str(workdir), 'checkpoints')
  if not os.path.isdir(folder):
    return []
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def unfinished_saves(workdir) -> list[str]:
  folder = os.path.join(str(workdir), 'checkpoints')
  if not os.path.isdir(folder):
    return []
  return [name for name in os.listdir(folder) if 'tmp' in name]


def training_metrics(entries: list[dict]) -> list[dict]:
  """Drops the wall-clock figures, which legitimately differ between runs."""
  timing = ('clips_per_s', 'steps_per_s')
  return [{k: v for k, v in e.items() if k not in timing} for e in entries]
