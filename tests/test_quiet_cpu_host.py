"""A CPU host with libtpu installed (the test and tpu extras) starts JAX without libtpu's errors."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

_PROBE = 'import aasp_jax, jax; print(jax.default_backend(), jax.config.jax_platforms)'
_ON_TPU_HOST = bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def _run(code: str, **env_changes) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS', 'TPU_ACCELERATOR_TYPE')}
  env.update(env_changes)
  return subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120
  )


@pytest.mark.skipif(_ON_TPU_HOST, reason='this host has TPU chips: JAX must probe them')
@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu installed')
def test_no_libtpu_errors_without_chips():
  # The reference: plain `import jax` on the same host does print libtpu's complaints.
  bare = _run('import jax; jax.devices()')
  assert 'TPU' in bare.stderr, 'expected libtpu to complain when probed; the premise changed'
  done = _run(_PROBE)
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ['cpu', 'cpu']
  assert 'TPU' not in done.stderr and 'libtpu' not in done.stderr, done.stderr


def test_explicit_choices_are_kept():
  # GKE names the TPU type of a node: JAX must probe it as usual (platforms left unset).
  done = _run(_PROBE, TPU_ACCELERATOR_TYPE='v5p-8', TPU_SKIP_MDS_QUERY='1')
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ['cpu', 'None']
