"""Bad configs and workdirs fail before anything compiles, with a message that says what to change."""

import json
import os

import program_runner as runner
import pytest
from conftest import FIXTURES

from aasp_jax import checkpointing, configuration
from aasp_jax.train import loop
from aasp_jax.train import step as step_lib

TINY = [
  f.removeprefix('--config.') for f in runner.TINY_FLAGS[1:] if not f.startswith('--config.data.')
]

DATA = os.path.join(FIXTURES, 'audio')


def tiny_config(*overrides):
  return configuration.load_config(
    'configs/pretrain.py:variant=tiny,target_length=64', [*TINY, *overrides]
  )


@pytest.fixture(autouse=True)
def no_compilation(monkeypatch):
  """Any attempt to compile the train step fails the test: the errors must come first."""

  def refuse(*args, **kwargs):
    raise AssertionError('the train step was compiled before the config error was raised')

  monkeypatch.setattr(step_lib, 'compile_step', refuse)


def test_unknown_key_fails_at_flag_parsing_naming_the_key(tmp_path):
  done = runner.run(tmp_path, str(tmp_path / 'cache'), '--config.model.widht=64', timeout=120)
  assert done.returncode == 2
  assert (
    "aasp-pretrain: unknown config key 'widht' in --config.model.widht=64 (did you mean 'width'?)"
    in done.stdout
  )
  assert 'Traceback' not in done.stdout
  assert 'compiled' not in done.stdout


@pytest.mark.parametrize('key', ['global_batch', 'total_steps'])
def test_non_positive_batch_or_steps(tmp_path, key):
  with pytest.raises(configuration.ConfigError, match=f'{key}=0 must be positive'):
    tiny_config(f'{key}=0', f'data.train={DATA}')


def test_batch_not_divisible_by_the_mesh(tmp_path):
  # The suite runs with 8 fake devices; 'data' = -1 takes all 8.
  cfg = tiny_config('global_batch=12', f'data.train={DATA}')
  with pytest.raises(configuration.ConfigError, match=r'global_batch=12 .* 8 batch shards'):
    loop.train(cfg, str(tmp_path))


def test_mesh_that_does_not_fit_the_devices(tmp_path):
  cfg = tiny_config('global_batch=8', 'mesh.data=3', f'data.train={DATA}')
  with pytest.raises(configuration.ConfigError, match='change config.mesh'):
    loop.train(cfg, str(tmp_path))


def test_missing_data_path(tmp_path):
  with pytest.raises(configuration.ConfigError, match='data.train is not set'):
    loop.train(tiny_config('global_batch=8'), str(tmp_path))
  cfg = tiny_config('global_batch=8', f'data.train={tmp_path}/no_such_folder')
  with pytest.raises(configuration.ConfigError, match='no_such_folder.*does not exist'):
    loop.train(cfg, str(tmp_path))


def test_workdir_of_an_incompatible_run(tmp_path):
  data = DATA
  old = tiny_config('global_batch=8', f'data.train={data}')
  # A checkpoint's config item as the trainer writes it (orbax JSON handler layout).
  manager = checkpointing.RunCheckpoints(str(tmp_path), old.checkpoint)
  manager.manager.save(
    5,
    args=checkpointing.ocp.args.Composite(
      config=checkpointing.ocp.args.JsonSave(json.loads(old.to_json()))
    ),
  )
  manager.wait_until_finished()
  manager.close()
  new = tiny_config('global_batch=8', f'data.train={data}', 'model.width=48', 'seed=3')
  with pytest.raises(configuration.ConfigError) as err:
    loop.train(new, str(tmp_path))
  message = str(err.value)
  assert 'model.width: checkpoint 32, now 48' in message
  assert 'seed: checkpoint 0, now 3' in message
  assert 'new --workdir' in message
  # Keys that may change between restarts (logging, checkpoint cadence, mesh) are not refused.
  checkpointing.check_resumable(
    json.loads(old.to_json()),
    tiny_config('global_batch=8', f'data.train={data}', 'logging.log_every_steps=7'),
    str(tmp_path),
  )
  # A checkpoint saved before model.posemb / block_norm / norm_eps existed was made with their
  # defaults: it resumes under a config that has them at those values, and not under another.
  saved = json.loads(old.to_json())
  for field in ('posemb', 'block_norm', 'norm_eps'):
    del saved['model'][field]
  checkpointing.check_resumable(saved, old, str(tmp_path))
  post = tiny_config('global_batch=8', f'data.train={data}', 'model.block_norm=post')
  with pytest.raises(configuration.ConfigError, match="model.block_norm: checkpoint 'pre'"):
    checkpointing.check_resumable(saved, post, str(tmp_path))
  # Likewise every key added with EAT's recipe (configuration.LATER_FIELDS).
  saved = json.loads(old.to_json())
  del saved['objective']['mask_centres'], saved['optimizer']['adam'], saved['model']['init']
  for key in [k for k in saved['model']['predictor'] if k.startswith(('cnn_', 'mae_'))]:
    if key not in ('cnn_layers', 'cnn_kernel_size', 'cnn_groups'):
      del saved['model']['predictor'][key]
  checkpointing.check_resumable(saved, old, str(tmp_path))
  eat_masks = tiny_config('global_batch=8', f'data.train={data}', 'objective.mask_centres=eat')
  with pytest.raises(configuration.ConfigError, match="mask_centres: checkpoint 'coverage'"):
    checkpointing.check_resumable(saved, eat_masks, str(tmp_path))


def test_cli_prints_config_errors_without_a_traceback(tmp_path):
  missing = runner.run(tmp_path, str(tmp_path / 'cache'), '--config.data.train=/no/such/data')
  assert missing.returncode == 2
  assert 'aasp-pretrain: ' in missing.stdout and '/no/such/data' in missing.stdout
  assert 'Traceback' not in missing.stdout
  # A mesh error used to be followed by an orbax "cannot schedule new futures after interpreter
  # shutdown" traceback from the checkpoint manager that was never closed.
  mesh = runner.run(tmp_path / 'w2', str(tmp_path / 'cache'), '--config.mesh.data=3')
  assert mesh.returncode == 2
  assert 'aasp-pretrain: ' in mesh.stdout and 'change config.mesh' in mesh.stdout
  assert 'Traceback' not in mesh.stdout and 'cannot schedule new futures' not in mesh.stdout


def test_no_usable_data_fails_before_compiling_in_under_30_s(tmp_path):
  # An all-bad folder used to spin at 100 % CPU with no output; an empty pack compiled for 13 s and
  # then died with a bare StopIteration.
  import time

  from aasp_jax.data import pack

  bad = tmp_path / 'bad'
  bad.mkdir()
  for i in range(40):
    (bad / f'clip{i}.wav').write_text(f'not audio {i}')
  start = time.monotonic()
  with pytest.raises(configuration.ConfigError, match=r'no usable clip.*unreadable 40'):
    loop.train(tiny_config('global_batch=8', f'data.train={bad}'), str(tmp_path / 'w1'))
  assert time.monotonic() - start < 30
  empty = tmp_path / 'empty_pack'
  with pytest.raises(Exception, match='packed 0 of 40'):
    pack.pack(pack.PackConfig(str(bad), str(empty), num_shards=1, workers=1), progress=False)
  start = time.monotonic()
  with pytest.raises(configuration.ConfigError, match='holds no records'):
    loop.train(tiny_config('global_batch=8', f'data.train={empty}'), str(tmp_path / 'w2'))
  assert time.monotonic() - start < 30


def test_unreadable_data_paths_fail_before_compiling(tmp_path):
  with pytest.raises(configuration.ConfigError, match='no_such_pack'):
    loop.train(
      tiny_config('global_batch=8', f'data.train={tmp_path}/no_such_pack/clips-*.array_record'),
      str(tmp_path / 'w1'),
    )
  loop_link = tmp_path / 'loop'
  os.symlink(loop_link, loop_link)
  with pytest.raises(configuration.ConfigError, match='symlink loop'):
    loop.train(tiny_config('global_batch=8', f'data.train={loop_link}'), str(tmp_path / 'w2'))
