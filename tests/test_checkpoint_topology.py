"""Checkpoints travel: written on 2 devices or by 2 processes, they are read on 1 device by every
reader (HEAR, aasp-embed, aasp-export) and resumed by another number of processes; the checksums
that verify them are the same on every mesh."""

import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402
from etils import epath  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

import program_runner as runner  # noqa: E402
import train_helpers  # noqa: E402
from aasp_jax import checkpointing, sharding  # noqa: E402
from aasp_jax.export import exporter  # noqa: E402
from aasp_jax.train import state as state_lib  # noqa: E402
from conftest import REPO_ROOT  # noqa: E402

TESTS = os.path.join(REPO_ROOT, 'tests')
CHILD = os.path.join(TESTS, 'checkpoint_topology_child.py')
LAUNCHER = os.path.join(REPO_ROOT, 'launch', 'local_multiprocess.py')


def test_checksums_are_the_same_on_every_mesh():
  cfg, objective, tx, _, _, state, _ = train_helpers.setup()
  # The student and the step (a quarter of the state's arrays: one compilation per mesh).
  single = checkpointing.array_checksums(jax.device_get({'params': state.params, 's': state.step}))
  for shape in ((1, 8, 1), (2, 2, 2)):
    mesh_cfg = ConfigDict(dict(zip(sharding.MESH_AXES, shape)))
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:8])
    _, shardings = state_lib.state_shardings(objective, tx, mesh, cfg.logical_axis_rules)
    placed = jax.device_put(
      {'params': state.params, 's': state.step}, {'params': shardings.params, 's': shardings.step}
    )
    split = [x for x in jax.tree.leaves(placed) if not x.sharding.is_fully_replicated]
    assert len(split) > 30  # most arrays really are cut into shards
    assert checkpointing.array_checksums(placed) == single


# ------------------------------------------------------------------------------------------------
# Real runs: 1 process x 2 devices, 2 processes x 1 device (the same 2-device mesh)


def child(cache, mode, *args, processes=1, devices=1) -> str:
  env = runner.environment(cache, devices)
  env['PYTHONPATH'] = TESTS + os.pathsep + env['PYTHONPATH']
  if processes == 1:
    command = [sys.executable, CHILD, mode, *args]
  else:
    command = [
      sys.executable, LAUNCHER, f'--num_processes={processes}',
      f'--devices_per_process={devices}', '--module=checkpoint_topology_child', '--', mode, *args,
    ]  # fmt: skip
  done = subprocess.run(
    command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    timeout=600,
  )  # fmt: skip
  assert done.returncode == 0, done.stdout
  return done.stdout


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """{'two_devices' | 'two_processes': (workdir, reference npz)}: 4 steps, checkpoints at 2, 4."""
  root = tmp_path_factory.mktemp('topology')
  cache = str(root / 'cache')
  out = {}
  for name, layout in (('two_devices', (1, 2)), ('two_processes', (2, 1))):
    workdir, ref = str(root / name), str(root / f'{name}_ref.npz')
    log = child(cache, 'train', workdir, ref, processes=layout[0], devices=layout[1])
    assert f'over 2 devices ({layout[0]} processes)' in log
    out[name] = (workdir, ref)
  return ConfigDict(dict(root=str(root), cache=cache, **out), type_safe=False)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['two_devices', 'two_processes'])
def test_checkpoints_load_on_one_device_in_every_reader(runs, name):
  workdir, ref = runs[name]
  out = os.path.join(runs.root, f'{name}_read')
  log = child(runs.cache, 'load', workdir, out)
  assert 'available devices are different' not in log and 'Sharding info not provided' not in log
  reference = np.load(ref)
  params = {
    k.removeprefix('param/'): reference[k] for k in reference.files if k.startswith('param/')
  }
  hear = np.load(os.path.join(out, 'hear.npz'))
  embedded = np.load(os.path.join(out, 'embed.npz'))
  _, _, exported = exporter.load_export(os.path.join(out, 'export'))
  assert int(hear['step']) == 4
  # Restoring is exact: every reader holds the trained teacher bit for bit ...
  assert exported.keys() == params.keys()
  for k, v in params.items():
    np.testing.assert_array_equal(hear[f'param/{k}'], v, err_msg=k)
    np.testing.assert_array_equal(exported[k], v, err_msg=k)
  # ... so its embeddings are those computed from the trained state before the move (same code,
  # one CPU device each time; 1e-6 allows for a different XLA build of the same graph).
  np.testing.assert_allclose(hear['scene'], reference['scene'], rtol=1e-6, atol=1e-6)
  assert list(embedded['clip_ids']) == list(reference['clip_ids'])
  np.testing.assert_allclose(embedded['embeddings'], reference['files'], rtol=1e-6, atol=1e-6)


def saved_arrays(workdir, step) -> dict:
  """A checkpoint's state as host arrays, read with orbax alone (numpy targets: any topology)."""
  path = epath.Path(workdir) / 'checkpoints' / str(step) / 'state'
  handler = ocp.PyTreeCheckpointHandler()
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), handler.metadata(path).tree)
  restored = handler.restore(
    path,
    args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
    ),
  )
  handler.close()
  return ocp.tree.to_flat_dict(restored, sep='.')


def resume_elsewhere(runs, source, name, processes, devices) -> str:
  """Copies `source`'s run as it was at step 2 and finishes it with another process layout."""
  workdir = os.path.join(runs.root, name)
  shutil.copytree(runs[source][0], workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  log = child(runs.cache, 'train', workdir, processes=processes, devices=devices)
  assert 'restored step 2 from' in log and f'({processes} processes)' in log
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize(
  'source, processes, devices',
  [('two_processes', 1, 2), ('two_devices', 2, 1)],
  ids=['2to1', '1to2'],
)
def test_a_run_resumes_with_another_number_of_processes(runs, source, processes, devices):
  resumed = resume_elsewhere(runs, source, f'{source}_resumed', processes, devices)
  with open(os.path.join(resumed, 'checkpoints', '2', 'data_position', 'metadata')) as f:
    assert json.load(f)['global_batches'] == 2  # one position for all hosts
  for uninterrupted in (runs.two_processes[0], runs.two_devices[0]):
    a = runner.training_metrics(runner.metrics(uninterrupted))
    b = runner.training_metrics(runner.metrics(resumed))
    assert [e['step'] for e in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
      assert x.keys() == y.keys()
      for key in x:
        # Same mesh, same batches; gloo's cross-process sums may add in another order.
        np.testing.assert_allclose(
          y[key], x[key], rtol=2e-5, atol=1e-6, err_msg=f'{key} {x["step"]}'
        )
    want, got = saved_arrays(uninterrupted, 4), saved_arrays(resumed, 4)
    assert want.keys() == got.keys()
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
