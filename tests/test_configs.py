"""Every shipped config loads and its models initialise abstractly; bad configs fail clearly."""

import glob
import os

import pytest
from conftest import REPO_ROOT

from aasp_jax import configuration

CONFIG_FILES = sorted(
  p
  for p in glob.glob(os.path.join(REPO_ROOT, 'configs', '*.py'))
  # Pre-training configs only: linear_eval.py and configs/finetune/ are loaded (and tested) by
  # their own programs (tests/test_linear_eval.py, tests/test_finetune.py).
  if os.path.basename(p) not in ('common.py', '__init__.py', 'linear_eval.py')
)
ARGS = ['', 'variant=tiny,target_length=256', 'variant=S,stem=conv', 'variant=B/16,predictor=cnn']


def vit_param_count(d, depth, mlp, patch=16):
  """Analytic parameter count of a conv-stem ViT encoder (timm's ViT-B/16 minus its head)."""
  block = 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 4 * d
  return patch * patch * d + d + d + depth * block + 2 * d


def test_there_are_configs():
  assert CONFIG_FILES, 'no configs shipped'


@pytest.mark.parametrize('path', CONFIG_FILES)
@pytest.mark.parametrize('arg', ARGS)
def test_config_loads_and_initialises_abstractly(path, arg):
  spec = f'{path}:{arg}' if arg else path
  cfg = configuration.load_config(spec)
  shapes = configuration.abstract_params(cfg)
  assert configuration.count_params(shapes['encoder']) > 0
  assert configuration.count_params(shapes['predictor']) > 0
  assert cfg.is_locked


def test_vit_b_conv_stem_has_the_vit_b_parameter_count():
  cfg = configuration.load_config('configs/pretrain.py:variant=B/16,stem=conv')
  n = configuration.count_params(configuration.abstract_params(cfg)['encoder'])
  assert n == vit_param_count(768, 12, 3072)  # 85.8M, as timm's vit_base_patch16 without pos/head
  aape = configuration.load_config('configs/pretrain.py:variant=B/16,stem=aape')
  n_aape = configuration.count_params(configuration.abstract_params(aape)['encoder'])
  assert 0 < n_aape - n < 0.05 * n  # AaPE adds a small stem branch


def test_unknown_override_key_fails_with_the_valid_keys():
  with pytest.raises(configuration.ConfigError, match=r"'model.aape.num_mode'.*num_modes"):
    configuration.load_config('configs/pretrain.py', ['model.aape.num_mode=4'])
  with pytest.raises(configuration.ConfigError, match="Unknown config key 'modle.depth'"):
    configuration.load_config('configs/pretrain.py', ['modle.depth=4'])


def test_unknown_config_argument_and_variant_fail():
  with pytest.raises(ValueError, match="Unknown config argument 'varient'"):
    configuration.load_config('configs/pretrain.py:varient=B')
  with pytest.raises(ValueError, match="Unknown model variant 'H'"):
    configuration.load_config('configs/pretrain.py:variant=H/14')


def test_bad_values_fail_before_compilation():
  with pytest.raises(configuration.ConfigError, match="model.stem.*'aape', 'conv'"):
    configuration.load_config('configs/pretrain.py:stem=patch')
  with pytest.raises(configuration.ConfigError, match='needs a int'):
    configuration.load_config('configs/pretrain.py', ['model.depth=1.5'])
  with pytest.raises(configuration.ConfigError, match='multiple of model.patch_t=16; use 992'):
    configuration.load_config('configs/pretrain.py:target_length=1000')
  with pytest.raises(configuration.ConfigError, match='not divisible by model.num_heads'):
    configuration.load_config('configs/pretrain.py', ['model.num_heads=5'])
  with pytest.raises(configuration.ConfigError, match='must be odd'):
    configuration.load_config('configs/pretrain.py', ['model.aape.kernel_size=30'])
  with pytest.raises(configuration.ConfigError, match='window'):
    configuration.load_config('configs/pretrain.py', ['model.aape.window=causal'])
  with pytest.raises(configuration.ConfigError, match='is a section'):
    configuration.load_config('configs/pretrain.py', ['model.aape=1'])
  # A learned table cannot grow: the remedy is a shorter window.
  with pytest.raises(configuration.ConfigError, match='set frontend.target_length <= 32'):
    configuration.load_config(
      'configs/pretrain.py:target_length=64', ['model.posemb=learned', 'model.max_time_patches=2']
    )


def test_overrides_are_typed():
  cfg = configuration.load_config(
    'configs/pretrain.py:variant=tiny',
    ['model.depth=2', 'model.remat=true', 'frontend.norm_mean=-4', 'model.aape.delta=2'],
  )
  assert cfg.model.depth == 2 and cfg.model.remat is True
  assert cfg.frontend.norm_mean == -4.0 and isinstance(cfg.frontend.norm_mean, float)
  assert cfg.model.aape.delta == 2.0


def test_cli_prints_config_and_sizes(capsys):
  configuration.main(
    ['configs/pretrain.py:variant=tiny,target_length=256', '--set', 'model.depth=2']
  )
  out = capsys.readouterr().out
  assert 'depth: 2' in out and 'encoder:' in out and 'parameters' in out
