"""Verified restores: every saved array's checksum is checked on restore; a damaged checkpoint is
set aside (never deleted) and the previous one used; readers skip damaged checkpoints without moving
them; with no usable checkpoint the run stops with one message."""

import glob
import json
import logging
import os
import shutil

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from ml_collections import ConfigDict

import program_runner as runner
import train_helpers
from aasp_jax import checkpointing, configuration
from aasp_jax.evaluate import hear, pretrained
from aasp_jax.export import cli as export_cli
from aasp_jax.train import state as state_lib

CKPT = ConfigDict({'keep': 5, 'async_save': True})
M32 = 0xFFFFFFFF


# ------------------------------------------------------------------------------------------------
# The checksum itself


def reference_checksum(x) -> str:
  """The checksum as `checkpointing`'s docstring defines it, in numpy integer arithmetic."""
  x = np.asarray(x)
  if x.dtype == bool:
    x = x.astype(np.uint8)
  flat = np.ascontiguousarray(x).reshape(-1)
  if x.dtype.itemsize in (4, 8):
    words = flat.view(np.uint32).astype(np.uint64)  # little-endian: an element's low word first
  else:
    words = flat.view(np.uint8 if x.dtype.itemsize == 1 else np.uint16).astype(np.uint64)
  i = np.arange(words.size, dtype=np.uint64)

  def fmix(h):
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x85EBCA6B)) & np.uint64(M32)
    h = h ^ (h >> np.uint64(13))
    h = (h * np.uint64(0xC2B2AE35)) & np.uint64(M32)
    return h ^ (h >> np.uint64(16))

  sums = []
  for seed in (0x9E3779B9, 0x85EBCA77):
    weight = fmix(i ^ np.uint64(seed)) | np.uint64(1)
    sums.append(int(((words * weight) & np.uint64(M32)).sum(dtype=np.uint64)) & M32)
  return f'{sums[0]:08x}{sums[1]:08x}'


def test_checksums_equal_a_numpy_reference_for_every_dtype():
  rng = np.random.default_rng(0)
  arrays = {
    'f32': rng.normal(size=(3, 5, 7)).astype(np.float32),
    'bf16': rng.normal(size=(9,)).astype(jax.numpy.bfloat16),
    'i8': rng.integers(-128, 127, size=(4, 3)).astype(np.int8),
    'u16': rng.integers(0, 2**16, size=(6,)).astype(np.uint16),
    'bool': rng.random(11) > 0.5,
    'step': np.int32(-7),
  }
  on_device = jax.device_put(arrays, jax.devices()[0])
  got = checkpointing.array_checksums({'host': arrays, 'device': on_device})
  for name, x in arrays.items():
    want = reference_checksum(x)
    assert got[f'host.{name}']['checksum'] == want, name
    assert got[f'device.{name}']['checksum'] == want, name
  assert all(v['nonfinite'] == 0 for v in got.values())


def test_every_single_bit_flip_changes_the_checksum():
  x = np.random.default_rng(1).normal(size=(8, 33)).astype(np.float32)
  words = x.view(np.uint32).reshape(-1)
  flips = [(0, 0), (0, 31), (words.size - 1, 31), (words.size - 1, 0)]
  flips += [(int(i), int(b)) for i, b in np.random.default_rng(2).integers(0, [264, 32], (40, 2))]
  copies = []
  for index, bit in flips:
    w = words.copy()
    w[index] ^= np.uint32(1 << bit)
    copies.append(w.view(np.float32).reshape(x.shape))
  sums = checkpointing.array_checksums({'x': x, 'flipped': copies})
  original = sums['x']['checksum']
  for k, flip in enumerate(flips):
    flipped = sums[f'flipped.{k}']['checksum']
    # Both 32-bit halves change: the weights are odd.
    assert flipped[:8] != original[:8] and flipped[8:] != original[8:], flip


def test_non_finite_values_are_refused_even_without_checksums():
  bad = {'teacher': {'w': np.array([1.0, np.nan, np.inf], np.float32)}}
  with pytest.raises(ValueError, match=r'array teacher\.w: 2 non-finite values'):
    checkpointing.verify_arrays(bad, None)


# ------------------------------------------------------------------------------------------------
# The trainer's restore_latest, on the real (tiny) train state


@pytest.fixture(scope='module')
def tiny():
  cfg, objective, tx, _, mesh, state, _ = train_helpers.setup()
  abstract, shardings = state_lib.state_shardings(objective, tx, mesh, cfg.logical_axis_rules)

  def at(step):  # distinct states per step, placed as the trainer places them
    moved = state.replace(
      step=np.int32(step), params=jax.tree.map(lambda p: p + 0.01 * step, state.params)
    )
    return jax.device_put(moved, shardings)

  return ConfigDict(
    dict(cfg=cfg, abstract=abstract, shardings=shardings, states={1: at(1), 2: at(2)}),
    type_safe=False,
  )


def save_steps(workdir, tiny, steps=(1, 2)):
  ckpts = checkpointing.RunCheckpoints(str(workdir), CKPT)
  for s in steps:
    ckpts.save(s, tiny.states[s], jax.random.key(10 + s), {'global_batches': s}, tiny.cfg)
  ckpts.wait_until_finished()
  ckpts.close()


def restore_latest(workdir, tiny):
  ckpts = checkpointing.RunCheckpoints(str(workdir), CKPT)
  try:
    return ckpts.restore_latest(tiny.abstract, tiny.shardings)
  finally:
    ckpts.close()


def assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def array_files(step_dir) -> list[str]:
  """The state item's array data files, largest last."""
  return sorted(glob.glob(f'{step_dir}/state/**/d/*', recursive=True), key=os.path.getsize)


def truncate(step_dir):
  path = array_files(step_dir)[-1]
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def delete(step_dir):
  os.remove(array_files(step_dir)[-1])


def flip_a_byte(step_dir):
  """One bit of one byte in the middle of the largest array file, as a disk error would."""
  path = array_files(step_dir)[-1]
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x10]))


FLIPPED = 'train.teacher.blocks_0.mlp.fc1.kernel'


def flip_a_stored_bit(step_dir):
  """One bit of one array value, stored through TensorStore: the files stay well-formed, so only
  the checksum can tell (as a bit flipped in memory before the save, or by a faulty disk, would)."""
  spec = {
    'driver': 'zarr',
    'kvstore': {'driver': 'ocdbt', 'base': f'file://{step_dir}/state/', 'path': f'{FLIPPED}/'},
  }
  store = ts.open(spec).result()
  words = store.read().result().view(np.uint32).copy()
  words.reshape(-1)[5] ^= np.uint32(1 << 3)  # a low mantissa bit: the value barely changes
  store.write(words.view(np.float32)).result()


def garble_json(step_dir):
  with open(os.path.join(step_dir, 'data_position', 'metadata'), 'w') as f:
    f.write('{"global_batch')


DAMAGE = {
  'truncated': (truncate, 'state: '),
  'deleted': (delete, 'state: '),
  'byte_flipped': (flip_a_byte, ''),  # a checksum mismatch, or a zstd stream that fails to decode
  'value_bit_flipped': (flip_a_stored_bit, f'array {FLIPPED}: checksum '),
  'garbled_json': (garble_json, 'data_position: unreadable'),
}


@pytest.mark.parametrize('damage', DAMAGE)
def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_restored(
  tmp_path, tiny, caplog, damage
):
  save_steps(tmp_path, tiny)
  step_dir = str(tmp_path / 'checkpoints' / '2')
  corrupt, reason = DAMAGE[damage]
  corrupt(step_dir)
  with caplog.at_level(logging.WARNING):
    restored = restore_latest(tmp_path, tiny)
  assert restored.step == 1
  assert_same_tree(restored.state, tiny.states[1])
  assert restored.data_position == {'global_batches': 1}
  np.testing.assert_array_equal(
    jax.random.key_data(restored.rng), jax.random.key_data(jax.random.key(11))
  )
  # Set aside, not deleted; the manager no longer lists it.
  assert os.listdir(tmp_path / 'checkpoints_set_aside') == ['2']
  assert os.listdir(tmp_path / 'checkpoints_set_aside' / '2' / 'state')
  assert runner.checkpoint_steps(tmp_path) == [1]
  # One line says which step, what, and where it went; nothing else is printed for the damage.
  unusable = [r.getMessage() for r in caplog.records if 'is unusable' in r.getMessage()]
  assert len(unusable) == 1 and '\n' not in unusable[0], unusable
  assert f'step 2 is unusable, {reason}' in unusable[0], unusable[0]
  assert 'checkpoints_set_aside/2' in unusable[0]
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_with_every_checkpoint_damaged_the_run_stops_and_stays_stopped(tmp_path, tiny):
  save_steps(tmp_path, tiny)
  flip_a_stored_bit(str(tmp_path / 'checkpoints' / '2'))
  delete(str(tmp_path / 'checkpoints' / '1'))
  with pytest.raises(checkpointing.NoUsableCheckpoint) as e:
    restore_latest(tmp_path, tiny)
  message = str(e.value)
  assert f'step 2: array {FLIPPED}: checksum' in message and 'step 1: state: ' in message
  assert 'move that folder away' in message
  assert sorted(os.listdir(tmp_path / 'checkpoints_set_aside')) == ['1', '2']
  # A rerun must not quietly start from scratch over the set-aside checkpoints.
  with pytest.raises(checkpointing.NoUsableCheckpoint, match=r"steps \['1', '2'\] were set aside"):
    restore_latest(tmp_path, tiny)
  assert restore_latest(tmp_path / 'fresh', tiny) is None  # an empty workdir starts a new run


def test_another_model_is_refused_without_setting_anything_aside(tmp_path, tiny):
  save_steps(tmp_path, tiny, steps=(1,))
  wider = jax.tree.map(lambda a: a, tiny.abstract)
  kernel = wider.teacher['blocks_0']['mlp']['fc1']['kernel']
  wider.teacher['blocks_0']['mlp']['fc1']['kernel'] = jax.ShapeDtypeStruct((32, 65), kernel.dtype)
  ckpts = checkpointing.RunCheckpoints(str(tmp_path), CKPT)
  with pytest.raises(configuration.ConfigError, match=rf'{FLIPPED}: saved \(32, 64\) float32, '):
    ckpts.restore_latest(wider, tiny.shardings)
  ckpts.close()
  assert runner.checkpoint_steps(tmp_path) == [1]
  assert not (tmp_path / 'checkpoints_set_aside').exists()


def test_checkpoints_written_before_checksums_restore_unverified(tmp_path, tiny, caplog):
  """The format of earlier versions: state, a per-process grain iterator item, config."""
  data = iter(grain.MapDataset.range(10).to_iter_dataset())
  next(data)
  manager = ocp.CheckpointManager(
    str(tmp_path / 'checkpoints'),
    item_handlers={
      'state': ocp.StandardCheckpointHandler(),
      'data': grain.checkpoint.CheckpointHandler(),
      'config': ocp.JsonCheckpointHandler(),
    },
  )
  rng = np.asarray(jax.random.key_data(jax.random.key(5)))
  manager.save(
    1,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave({'train': tiny.states[1], 'rng': rng}),
      data=grain.checkpoint.CheckpointSave(data),
      config=ocp.args.JsonSave(json.loads(tiny.cfg.to_json())),
    ),
  )
  manager.wait_until_finished()
  manager.close()
  with caplog.at_level(logging.WARNING):
    restored = restore_latest(tmp_path, tiny)
  assert restored.step == 1 and restored.data_position is None
  assert_same_tree(restored.state, tiny.states[1])
  assert any('predates checksums' in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# Readers (evaluation, HEAR, aasp-embed, aasp-export, fine-tuning): skip, never move


def test_readers_fall_back_past_a_damaged_checkpoint_and_refuse_it_by_name(
  tmp_path, tiny, caplog, capsys
):
  save_steps(tmp_path, tiny)
  flip_a_stored_bit(str(tmp_path / 'checkpoints' / '2'))
  with caplog.at_level(logging.WARNING):
    model = pretrained.load_pretrained(str(tmp_path))
  assert model.step == 1
  assert_same_tree(model.params, jax.device_get(tiny.states[1].teacher))
  warned = [r.getMessage() for r in caplog.records if 'is unusable' in r.getMessage()]
  assert len(warned) == 1 and f'array {FLIPPED}: checksum' in warned[0]
  # The student encoder is a different set of arrays: step 2's is intact.
  assert pretrained.load_pretrained(str(tmp_path), which='student').step == 2
  with pytest.raises(ValueError, match=rf'checkpoints/2: array {FLIPPED}: checksum .* Choose'):
    pretrained.load_pretrained(str(tmp_path), step=2)
  assert hear.load_model(str(tmp_path)).model.step == 1
  assert export_cli.main([str(tmp_path), str(tmp_path / 'export'), '--step', '2']) == 1
  err = capsys.readouterr().err
  assert err.startswith('aasp-export: error: ') and err.count('\n') == 1, err
  assert f'array {FLIPPED}: checksum' in err
  assert runner.checkpoint_steps(tmp_path) == [1, 2]  # readers move nothing
  assert not (tmp_path / 'checkpoints_set_aside').exists()
  # A reader restores one encoder only, so the damage must be in the teacher's arrays (the largest
  # data file may hold only optimizer state, depending on the order the save wrote them).
  flip_a_stored_bit(str(tmp_path / 'checkpoints' / '1'))
  with pytest.raises(
    checkpointing.NoUsableCheckpoint, match='No usable checkpoint .* step 2: .* step 1: '
  ):
    pretrained.load_pretrained(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# The whole program: a damaged checkpoint costs the steps since the previous one, nothing else

FLAGS = (
  '--config.model.stem=conv',
  '--config.data.features=log_mel',
  '--config.global_batch=2',
  '--config.total_steps=4',
  '--config.checkpoint.every_steps=2',
)


def saved_state(workdir, step):
  return ocp.PyTreeCheckpointer().restore(
    os.path.join(str(workdir), 'checkpoints', str(step), 'state')
  )


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """(workdir, compilation cache) of a 4-step run with checkpoints at steps 2 and 4."""
  root = tmp_path_factory.mktemp('uninterrupted')
  cache = str(root / 'cache')
  done = runner.run(root / 'a', cache, *FLAGS)
  assert done.returncode == 0, done.stdout
  return root / 'a', cache


@pytest.mark.slow
@pytest.mark.parametrize('damage', ['truncated', 'deleted', 'byte_flipped'])
def test_a_run_resumes_past_a_damaged_checkpoint_and_ends_as_if_uninterrupted(
  tmp_path, uninterrupted, damage
):
  a, cache = uninterrupted
  shutil.copytree(a, tmp_path / 'b', ignore=shutil.ignore_patterns('cache'))
  DAMAGE[damage][0](str(tmp_path / 'b' / 'checkpoints' / '4'))

  resumed = runner.run(tmp_path / 'b', cache, *FLAGS)  # steps 3-4 again, from step 2
  assert resumed.returncode == 0, resumed.stdout
  assert resumed.stdout.count('is unusable') == 1
  assert 'checkpoint: step 4 is unusable' in resumed.stdout
  assert 'restored step 2 from' in resumed.stdout
  assert os.path.isdir(tmp_path / 'b' / 'checkpoints_set_aside' / '4' / 'state')
  # Steps 3-4 trained again from step 2's state and data position: the same as the first time.
  ma, mb = runner.metrics(a), runner.metrics(tmp_path / 'b')
  assert [e['step'] for e in mb] == [1, 2, 3, 4]
  assert runner.training_metrics(mb) == runner.training_metrics(ma)
  assert_same_tree(saved_state(tmp_path / 'b', 4), saved_state(a, 4))
  if damage != 'byte_flipped':
    return
  # Every checkpoint damaged: the program stops with one message, before compiling anything.
  for step in (2, 4):
    delete(str(tmp_path / 'b' / 'checkpoints' / str(step)))
  stopped = runner.run(tmp_path / 'b', cache, *FLAGS)
  assert stopped.returncode == 2, stopped.stdout
  assert 'aasp-pretrain: No usable checkpoint' in stopped.stdout
  assert 'Traceback' not in stopped.stdout and 'compiled' not in stopped.stdout
