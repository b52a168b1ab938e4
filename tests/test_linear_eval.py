"""Linear evaluation: the AdamW classifier reaches the L-BFGS optimum of the same objective, its
reported loss is that objective (checked in float64 numpy), seeds matter and repeat exactly, the
embedding cache is hit without calling the encoder and misses when an audio file changes, and the
CLI runs end to end on a real tiny checkpoint with a locked config.
"""

import json
import os
import shutil
import statistics

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO_ROOT

from aasp_jax import configuration
from aasp_jax.evaluate import embeddings as embeddings_lib
from aasp_jax.evaluate import linear_eval, linear_eval_cli, linear_probe
from configs import linear_eval as linear_eval_config

FIXTURES = os.path.join(REPO_ROOT, 'tests', 'fixtures', 'audio')
CONFIG = os.path.join(REPO_ROOT, 'configs', 'linear_eval.py')
D, C = 6, 3


def blobs(seed, n, spread=1.0):
  """C Gaussian blobs far apart (separable), labels balanced."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(scale=6.0, size=(C, D))
  y = np.arange(n) % C
  return centres[y] + rng.normal(scale=spread, size=(n, D)), y


def noisy_linear_data(seed, n):
  """Labels from a random linear rule plus noise: learnable, not separable."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, D))
  return x, np.argmax(x @ rng.normal(size=(D, C)) + rng.normal(size=(n, C)), axis=1)


def numpy_objective(x, y, w, b, l2):
  """mean CE(xW + b, y) + l2 / 2 ||W||^2 in float64."""
  z = np.asarray(x, np.float64) @ w.astype(np.float64) + b.astype(np.float64)
  z = z - z.max(axis=1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  return -np.mean(log_p[np.arange(len(y)), y]) + 0.5 * l2 * np.sum(w.astype(np.float64) ** 2)


def test_minibatch_order_is_a_fresh_permutation_per_epoch():
  order = linear_eval.minibatch_order(10, 4, 3, seed=0)
  assert order.shape == (9, 4)  # 3 batches of 4 per epoch, the last padded with two -1
  epochs = order.reshape(3, 12)
  for epoch in epochs:
    assert sorted(epoch[:10]) == list(range(10)) and list(epoch[10:]) == [-1, -1]
  assert not np.array_equal(epochs[0], epochs[1])
  assert np.all((order >= 0).any(axis=1))  # every step sees data


def test_adamw_on_separable_blobs_matches_lbfgs_accuracy():
  train_x, train_y = blobs(0, 120)
  test_x, test_y = blobs(0, 300)[0][120:], blobs(0, 300)[1][120:]
  standardizer = linear_probe.Standardizer.fit(train_x)
  lbfgs = linear_probe.fit_logistic_regression(standardizer(train_x), train_y, C, 1e-2)
  adamw = linear_eval.fit_adamw(standardizer(train_x), train_y, C, 1e-2, seed=0, epochs=50)
  lbfgs_accuracy = np.mean(lbfgs.predict(standardizer(test_x)) == test_y)
  adamw_accuracy = np.mean(adamw.predict(standardizer(test_x)) == test_y)
  assert lbfgs_accuracy >= 0.99
  assert adamw_accuracy == lbfgs_accuracy


def test_adamw_converges_to_the_lbfgs_optimum_and_reports_its_loss():
  x, y = noisy_linear_data(1, 150)
  x = linear_probe.Standardizer.fit(x)(x)
  l2 = 0.05  # strongly convex: one optimum, which both solvers must reach
  lbfgs = linear_probe.fit_logistic_regression(x, y, C, l2)
  adamw = linear_eval.fit_adamw(x, y, C, l2, seed=3, epochs=300, batch_size=32, lr=0.05)
  expected_loss = numpy_objective(x, y, adamw.weights, adamw.bias, l2)
  assert adamw.loss == pytest.approx(expected_loss, rel=1e-5)
  optimum = numpy_objective(x, y, lbfgs.weights, lbfgs.bias, l2)
  assert adamw.loss == pytest.approx(optimum, abs=2e-4)
  np.testing.assert_allclose(adamw.weights, lbfgs.weights, atol=2e-2)
  # The softmax is invariant to a shift of all biases; compare them centred.
  np.testing.assert_allclose(
    adamw.bias - adamw.bias.mean(), lbfgs.bias - lbfgs.bias.mean(), atol=2e-2
  )


def test_adamw_seeds_change_the_result_and_a_repeated_seed_reproduces_it():
  x, y = noisy_linear_data(2, 90)
  fit = lambda seed: linear_eval.fit_adamw(x, y, C, 1e-3, seed=seed, epochs=5, batch_size=16)
  first, again, other = fit(0), fit(0), fit(1)
  np.testing.assert_array_equal(first.weights, again.weights)
  np.testing.assert_array_equal(first.bias, again.bias)
  assert first.loss == again.loss
  assert not np.allclose(first.weights, other.weights, atol=1e-4)


def test_mean_and_std_over_seeds():
  values = [0.5, 0.75, 0.9, 0.6]
  mean, std = linear_eval.mean_and_std(values)
  assert mean == pytest.approx(statistics.mean(values))
  assert std == pytest.approx(statistics.stdev(values))
  assert linear_eval.mean_and_std([0.25]) == (0.25, 0.0)


def load_config(overrides=()):
  config = linear_eval_config.get_config()
  config.lock()
  configuration.apply_overrides(config, list(overrides))
  return config


def test_config_errors_name_the_key():
  config = load_config(['checkpoint=/x', 'train=/a.csv'])
  with pytest.raises(configuration.ConfigError, match='train and test'):
    linear_eval.check_config(config)
  config = load_config(['checkpoint=/x', 'train=/a.csv', 'test=/b.csv', 'classifier=sgd'])
  with pytest.raises(configuration.ConfigError, match='classifier'):
    linear_eval.check_config(config)
  config = load_config(['checkpoint=/x', 'dataset.name=esc50'])
  with pytest.raises(configuration.ConfigError, match='dataset.root'):
    linear_eval.check_config(config)


@pytest.fixture
def audio_manifest(tmp_path):
  """The four fixture clips copied to tmp_path, 2 classes, one manifest used for train and test."""
  rows = [
    ('loop_amen.flac', 'long'),
    ('guit_harmonics.flac', 'long'),
    ('perc_swash.flac', 'short'),
    ('hat_raw.flac', 'short'),
  ]
  for name, _ in rows:
    shutil.copy(os.path.join(FIXTURES, name), tmp_path / name)
  path = tmp_path / 'clips.csv'
  path.write_text('path,label\n' + ''.join(f'{n},{label}\n' for n, label in rows))
  return tmp_path, str(path)


@pytest.mark.slow
def test_cache_is_hit_without_the_encoder_and_missed_after_an_audio_change(
  tiny_checkpoints, audio_manifest, monkeypatch, tmp_path
):
  folder, manifest_path = audio_manifest
  config = load_config(
    [
      f'checkpoint={tiny_checkpoints["conv"]}',
      f'train={manifest_path}',
      f'test={manifest_path}',
      f'cache_dir={tmp_path / "cache"}',
      'cv_folds=2',
    ]
  )
  calls = []
  real = embeddings_lib.clip_embeddings

  def counting(*args, **kwargs):
    calls.append(len(args[3]))
    return real(*args, **kwargs)

  monkeypatch.setattr(embeddings_lib, 'clip_embeddings', counting)
  first = linear_eval.linear_eval(config)
  assert first['cache'] == {'train': 'miss', 'test': 'hit', 'dir': str(tmp_path / 'cache')}
  assert calls == [4]  # the test split is the same clips: embedded once

  def must_not_run(*args, **kwargs):
    raise AssertionError('the encoder ran although the embeddings were cached')

  monkeypatch.setattr(embeddings_lib, 'clip_embeddings', must_not_run)
  second = linear_eval.linear_eval(config)
  assert second['cache']['train'] == 'hit' and second['cache']['test'] == 'hit'
  assert second['accuracy_per_seed'] == first['accuracy_per_seed']
  assert second['per_seed'] == first['per_seed']

  # A changed recording (new content, new size and mtime) must be embedded again.
  audio, rate = sf.read(folder / 'perc_swash.flac')
  sf.write(folder / 'perc_swash.flac', 0.5 * audio[: len(audio) // 2], rate)
  monkeypatch.setattr(embeddings_lib, 'clip_embeddings', counting)
  third = linear_eval.linear_eval(config)
  assert third['cache']['train'] == 'miss' and calls == [4, 4]
  assert third['train_clips'] == 4 and third['skipped'] == 0


@pytest.mark.slow
def test_cli_end_to_end_on_a_tiny_checkpoint(tiny_checkpoints, audio_manifest, tmp_path, capsys):
  _, manifest_path = audio_manifest
  output = tmp_path / 'result.json'
  argv = [
    'aasp-linear-eval',
    f'--config={CONFIG}:classifier=adamw',
    f'--config.checkpoint={tiny_checkpoints["conv"]}',
    f'--config.train={manifest_path}',
    f'--config.test={manifest_path}',
    f'--config.cache_dir={tmp_path / "cache"}',
    '--config.cv_folds=2',
    '--config.l2_grid=(0.01, 1.0)',
    '--config.seeds=(0, 1, 2)',
    '--config.adamw.epochs=20',
    f'--config.output={output}',
  ]
  assert linear_eval_cli.main(argv) == 0
  saved = json.loads(output.read_text())
  result = saved['result']
  assert result['classifier'] == 'adamw' and result['seeds'] == [0, 1, 2]
  assert result['num_classes'] == 2 and result['class_names'] == ['long', 'short']
  assert result['train_clips'] == 4 and result['test_clips'] == 4 and result['skipped'] == 0
  accuracies = [r['accuracy'] for r in result['per_seed']]
  assert result['accuracy_per_seed'] == accuracies
  assert all(a in (0.0, 0.25, 0.5, 0.75, 1.0) for a in accuracies)  # 4 test clips
  assert result['accuracy_mean'] == pytest.approx(np.mean(accuracies))
  assert result['accuracy_std'] == pytest.approx(np.std(accuracies, ddof=1))
  assert all(r['l2'] in (0.01, 1.0) and np.isfinite(r['final_loss']) for r in result['per_seed'])
  assert saved['config']['classifier'] == 'adamw'
  assert 'accuracy' in capsys.readouterr().out

  # The locked config: a misspelt key fails before anything runs.
  assert linear_eval_cli.main(['aasp-linear-eval', '--config.chekpoint=/x']) == 2
  assert 'chekpoint' in capsys.readouterr().err
  # A missing manifest file is a data error naming the file.
  missing = str(tmp_path / 'missing.csv')
  assert linear_eval_cli.main([*argv[:3], f'--config.train={missing}', argv[4]]) == 1
  assert 'missing.csv' in capsys.readouterr().err


def test_lbfgs_summary_claims_no_uncertainty_from_seeds():
  result = {
    'classifier': 'lbfgs', 'splits': 'a / b', 'num_classes': 2, 'train_clips': 4,
    'test_clips': 4, 'skipped': 0, 'seeds': [0, 1, 2],
    'per_seed': [{'seed': s, 'accuracy': 0.75, 'l2': 0.1} for s in (0, 1, 2)],
  }
  text = linear_eval_cli.summary(result)
  assert '0.7500' in text and '±' not in text and 'no uncertainty' in text


@pytest.mark.slow
def test_cli_task_mode_runs_the_shared_protocol(tiny_checkpoints, tmp_path, capsys):
  from aasp_jax.evaluate import pretrained, protocol

  task_csv = os.path.join(REPO_ROOT, 'data', 'sonicpi', 'task.csv')
  output = tmp_path / 'task.json'
  argv = [
    'aasp-linear-eval',
    f'--config={CONFIG}',
    f'--config.checkpoint={tiny_checkpoints["conv"]}',
    f'--config.task={task_csv}',
    f'--config.output={output}',
  ]
  assert linear_eval_cli.main(argv) == 0
  result = json.loads(output.read_text())['result']
  assert result['task'] == 'sonicpi' and result['num_classes'] == 10
  # The same numbers as the protocol run directly on the same encoder (what the benchmark, the
  # main job and the online probe call).
  model = pretrained.load_pretrained(tiny_checkpoints['conv'])
  task = protocol.ProbeTask.from_manifest(task_csv)
  direct = protocol.score_encoder(task, model.encoder, model.params, model.preset, ['mean'])
  assert result['scores']['mean']['linear']['accuracy'] == direct['mean']['linear'].accuracy
  assert result['scores']['mean']['knn']['accuracy'] == direct['mean']['knn'].accuracy
  assert '(headline)' in capsys.readouterr().out
  # task and a fixed split are exclusive: a config error (exit 2) naming the keys.
  assert linear_eval_cli.main([*argv, '--config.train=x.csv', '--config.test=y.csv']) == 2
  assert 'task' in capsys.readouterr().err
