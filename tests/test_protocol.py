"""The shared probe protocol: group splits, the ridge and kNN classifiers against scikit-learn, the
mel-statistics baseline against the host front end, and the real tasks' splits."""

import os

import numpy as np
import pytest

from aasp_jax import configuration
from aasp_jax.audio import decode, fbank_host
from aasp_jax.evaluate import pretrained, protocol

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = [
  os.path.join(REPO, 'data', 'sonicpi', 'task.csv'),
  os.path.join(REPO, 'data', 'gm_instruments', 'task.csv'),
]


def _synthetic(num_groups=40, per_group=4, num_classes=4, seed=0):
  rng = np.random.default_rng(seed)
  group_label = rng.integers(0, num_classes, num_groups)
  groups = np.repeat(np.arange(num_groups), per_group)
  labels = group_label[groups]
  return labels, groups


def _task(labels, groups, name='synthetic'):
  folds = protocol.group_kfold(labels, groups, protocol.FOLDS, protocol.REPEATS)
  classes = tuple(str(c) for c in range(labels.max() + 1))
  return protocol.ProbeTask(name, (), labels, classes, groups, folds)


def test_group_kfold_keeps_groups_whole_and_balances_classes():
  labels, groups = _synthetic(num_groups=53, per_group=3)
  folds = protocol.group_kfold(labels, groups, 5, 3)
  assert folds.shape == (3, len(labels))
  for r in range(3):
    for g in np.unique(groups):
      assert len(np.unique(folds[r][groups == g])) == 1  # a group never straddles folds
    for c in np.unique(labels):
      per_fold = np.bincount(folds[r][labels == c], minlength=5)
      assert per_fold.max() - per_fold.min() <= 3  # at most one group (3 clips) apart
  assert not np.array_equal(folds[0], folds[1])  # repeats are different partitions
  np.testing.assert_array_equal(folds, protocol.group_kfold(labels, groups, 5, 3))


def test_group_kfold_refuses_too_few_groups():
  with pytest.raises(ValueError, match='groups cannot fill'):
    protocol.group_kfold(np.array([0, 1, 0]), np.array([0, 1, 2]), 5, 1)


@pytest.mark.parametrize('path', TASKS, ids=['sonicpi', 'gm_instruments'])
def test_real_task_splits_are_disjoint_by_source(path):
  task = protocol.ProbeTask.from_manifest(path)
  assert len(task.entries) == len(task.labels) == len(task.groups)
  for r in range(protocol.REPEATS):
    for k in range(protocol.FOLDS):
      held = task.folds[r] == k
      assert held.any()
      assert not set(task.groups[held]) & set(task.groups[~held])  # no source on both sides
      # every class is in every training side, so the classifier can predict it
      assert len(np.unique(task.labels[~held])) == task.num_classes


def test_ridge_predictions_equal_scikit_learn():
  from sklearn.linear_model import RidgeClassifier

  rng = np.random.default_rng(1)
  x = rng.normal(size=(90, 12)) * rng.uniform(0.1, 5, 12) + rng.normal(size=12)
  y = rng.integers(0, 4, 90)
  x[:, 0] += 2 * y  # some signal
  train = np.arange(90) < 60
  held = ~train
  ours = protocol._ridge_predictions(x, np.eye(4)[y], train, held, (0.01, 1.0))
  mean, std = x[train].mean(0), x[train].std(0)
  for l2 in (0.01, 1.0):
    ref = RidgeClassifier(alpha=l2 * train.sum()).fit((x[train] - mean) / std, y[train])
    np.testing.assert_array_equal(ours[l2], ref.predict((x[held] - mean) / std))


def test_knn_equals_scikit_learn():
  from sklearn.neighbors import KNeighborsClassifier

  labels, groups = _synthetic(num_groups=30, per_group=3, num_classes=3, seed=2)
  task = _task(labels, groups)
  x = np.random.default_rng(3).normal(size=(len(labels), 6)) + labels[:, None] * 0.7
  ours = protocol.knn_scores(x, task, np.arange(len(labels)))
  for r in range(protocol.REPEATS):
    for k in range(protocol.FOLDS):
      train, held = task.folds[r] != k, task.folds[r] == k
      mean, std = x[train].mean(0), x[train].std(0)
      ref = KNeighborsClassifier(
        n_neighbors=protocol.KNN_K, metric='cosine', weights=lambda d: 2.0 - d
      ).fit((x[train] - mean) / std, labels[train])
      expected = ref.predict((x[held] - mean) / std) == labels[held]
      np.testing.assert_array_equal(ours[r, held], expected)


def test_group_splits_stop_near_duplicate_matching():
  """Features that identify the source but not the class: a clip-level split would score high
  (near duplicates on both sides), the protocol's group split scores at chance."""
  labels, groups = _synthetic(num_groups=60, per_group=4, num_classes=2, seed=4)
  rng = np.random.default_rng(5)
  x = rng.normal(size=(60, 30))[groups] + 0.05 * rng.normal(size=(len(labels), 30))
  task = _task(labels, groups)
  rows = np.arange(len(labels))
  knn = protocol.summarise(protocol.knn_scores(x, task, rows), task)
  assert abs(knn.accuracy - 0.5) < 0.15
  leaky = protocol.ProbeTask('leaky', (), labels, task.classes, np.arange(len(labels)),
                             protocol.group_kfold(labels, np.arange(len(labels)), 5, 3))
  assert protocol.summarise(protocol.knn_scores(x, leaky, rows), leaky).accuracy > 0.75


def test_linear_scores_learn_a_separable_task_and_score_skipped_clips_as_wrong():
  labels, groups = _synthetic(num_groups=40, per_group=3, num_classes=4, seed=6)
  task = _task(labels, groups)
  x = np.eye(4)[labels] * 3 + np.random.default_rng(7).normal(size=(len(labels), 4))
  rows = np.arange(len(labels))
  full = protocol.summarise(protocol.linear_scores(x, task, rows), task)
  assert full.accuracy > 0.9
  kept = rows[5:]  # five clips could not be read: they count as wrong
  partial = protocol.linear_scores(x[5:], task, kept)
  assert not partial[:, :5].any()


def test_paired_gain():
  out = protocol.paired_gain([0.5, 0.6, 0.55], [0.4, 0.45, 0.5])
  gains = np.array([0.1, 0.15, 0.05])
  assert out['mean'] == pytest.approx(gains.mean())
  assert out['se'] == pytest.approx(gains.std(ddof=1) / np.sqrt(3))


def test_mel_statistics_and_features_of_real_clips():
  config = configuration.load_config(os.path.join(REPO, 'configs', 'quickstart.py'))
  preset = configuration.frontend_preset(config)
  task = protocol.ProbeTask.from_manifest(TASKS[0])
  entries = task.entries[:3] + task.entries[-2:]
  stats = protocol.mel_statistics(preset, entries, batch_size=4)
  for row, i in enumerate(stats.indices):
    wave = decode.load_audio(entries[i].path, preset)
    x = fbank_host.features(wave, preset)  # [target_length, F], normalised and padded
    frames = min(preset.num_frames(len(wave)), preset.target_length)
    expected = np.concatenate([x[:frames].mean(0), x[:frames].std(0)])
    np.testing.assert_allclose(stats.features['mel_stats'][row], expected, atol=2e-3, rtol=1e-3)
  model = pretrained.random_encoder(config, 0)
  feats = protocol.encoder_features(model.encoder, model.params, model.preset, entries, 4)
  depth = config.model.depth
  assert set(feats.features) == {'cls', 'mean', 'blocks'} | {f'block{i}' for i in range(depth)}
  np.testing.assert_allclose(
    feats.features['blocks'],
    np.mean([feats.features[f'block{i}'] for i in range(depth)], axis=0),
    rtol=1e-5, atol=1e-6,
  )


@pytest.mark.parametrize('path', TASKS, ids=['sonicpi', 'gm_instruments'])
def test_recorded_splits_are_the_protocols(path):
  """folds.csv next to each task records its splits; a change to the task file or to the split
  rule must be deliberate (rerun `python -m aasp_jax.evaluate.protocol TASK.csv`)."""
  import csv

  task = protocol.ProbeTask.from_manifest(path)
  with open(os.path.join(os.path.dirname(path), protocol.FOLDS_FILE), newline='') as f:
    recorded = list(csv.reader(f))
  assert recorded == protocol.folds_table(task)


def _score(per_fold):
  per_fold = np.asarray(per_fold, np.float64)
  return protocol.Score(float(per_fold.mean()), float(per_fold.std(ddof=1) / 4), per_fold)


def test_fold_gain_is_the_paired_difference():
  a, b = _score([0.5, 0.6, 0.7, 0.4]), _score([0.4, 0.6, 0.5, 0.4])
  gain, se = protocol.fold_gain(a, b)
  diff = np.array([0.1, 0.0, 0.2, 0.0])
  assert np.isclose(gain, diff.mean()) and np.isclose(se, diff.std(ddof=1) / 2)


def test_verdict_never_calls_noise_a_gain():
  assert 'not a demonstrated gain' in protocol.verdict(0.05, 0.02)  # 2.5 SE
  assert protocol.verdict(0.07, 0.02).startswith('a gain')  # 3.5 SE
  assert 'LOSS' in protocol.verdict(-0.07, 0.02)
  assert 'not a demonstrated gain' in protocol.verdict(0.0, 0.0)
