"""Loading a pre-training checkpoint's encoder for evaluation (aasp_jax.evaluate.pretrained)."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import eval_checkpoints
from aasp_jax.evaluate import pretrained
from aasp_jax.models import vit


def full_state(workdir, step):
  """The whole saved train state, restored independently of the loader under test."""
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    manager.close()
  return jax.tree.map(np.asarray, restored['state']['train'])


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_teacher_and_student_are_the_saved_arrays(tiny_checkpoints):
  workdir = tiny_checkpoints['aape']
  saved = full_state(workdir, eval_checkpoints.STEPS)
  teacher = pretrained.load_pretrained(workdir)
  student = pretrained.load_pretrained(
    os.path.join(workdir, 'checkpoints', str(eval_checkpoints.STEPS)), which='student'
  )
  assert (teacher.which, teacher.step, student.which) == (
    'teacher',
    eval_checkpoints.STEPS,
    'student',
  )
  assert_trees_equal(teacher.params, saved['teacher'])
  assert_trees_equal(student.params, saved['params']['encoder'])
  # The encoder the saved config describes runs on those parameters and the saved front end.
  assert teacher.preset.target_length == teacher.config.frontend.target_length == 64
  x = np.zeros((1, 64, teacher.preset.num_mel_bins), np.float32)
  out = teacher.encoder.apply({'params': teacher.params}, x)
  assert out['cls'].shape == (1, teacher.width)


def test_missing_or_wrong_checkpoints_say_what_to_give(tiny_checkpoints, tmp_path):
  workdir = tiny_checkpoints['conv']
  with pytest.raises(FileNotFoundError, match='no such checkpoint folder'):
    pretrained.load_pretrained(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='no complete checkpoint'):
    pretrained.load_pretrained(tmp_path)
  with pytest.raises(ValueError, match=r'has no checkpoint of step 7; it has steps \[2\]'):
    pretrained.load_pretrained(workdir, step=7)
  with pytest.raises(ValueError, match='choose one of'):
    pretrained.load_pretrained(workdir, which='ema')
  # An unfinished save (orbax's temporary folder) is not a checkpoint.
  os.makedirs(os.path.join(tmp_path, 'checkpoints', '5.orbax-checkpoint-tmp-1', 'state'))
  with pytest.raises(FileNotFoundError, match='no complete checkpoint'):
    pretrained.load_pretrained(tmp_path)


@pytest.mark.slow
def test_scanned_layer_checkpoints_load_unrolled(tmp_path):
  """A run trained with model.scan_layers loads in the unrolled layout, computing the same thing."""
  done = eval_checkpoints.program_runner.run(
    tmp_path / 'scan',
    tmp_path / 'cache',
    '--config.model.scan_layers=true',
    '--config.model.stem=conv',
    '--config.total_steps=1',
    '--config.global_batch=2',
  )
  assert done.returncode == 0, done.stdout
  model = pretrained.load_pretrained(tmp_path / 'scan')
  saved = full_state(tmp_path / 'scan', 1)['teacher']
  depth = model.config.model.depth
  assert 'blocks' in saved and 'blocks_0' in model.params and not model.config.model.scan_layers
  assert_trees_equal(model.params, vit.unstack_blocks(saved, depth))
  x = np.random.default_rng(0).normal(size=(2, 64, 128)).astype(np.float32)
  scanned_model = pretrained.build.build_encoder(
    pretrained.config_from_json(
      {**model.config.to_dict(), 'model': {**model.config.model.to_dict(), 'scan_layers': True}}
    ).model
  )
  ref = scanned_model.apply({'params': saved}, x)
  out = model.encoder.apply({'params': model.params}, x)
  np.testing.assert_allclose(out['cls'], ref['cls'], atol=1e-5)
