"""Evaluation metrics against scikit-learn, hand-worked examples and closed forms."""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from aasp_jax.evaluate import metrics


def tied_problem(rng, n, classes, positive_rate=0.3, decimals=1):
  """Scores rounded to `decimals` (many ties) that lean towards the positives, and 0/1 targets."""
  targets = (rng.random((n, classes)) < positive_rate).astype(np.int64)
  scores = np.round(rng.random((n, classes)) * 0.7 + 0.3 * targets, decimals)
  return scores, targets


def test_average_precision_by_hand_with_a_tie():
  # Thresholds 0.9 (P=1, R=1/2) and the tied 0.8 pair (P=2/3, R=1): AP = 1/2 * 1 + 1/2 * 2/3.
  scores = [0.9, 0.8, 0.8, 0.1]
  assert metrics.average_precision(scores, [1, 0, 1, 0]) == pytest.approx(5 / 6, abs=1e-15)
  # Breaking the tie in the positive's favour gives 1/2 * 1 + 1/2 * 1.
  assert metrics.average_precision([0.9, 0.8, 0.81, 0.1], [1, 0, 1, 0]) == pytest.approx(1.0)


def test_average_precision_and_roc_auc_equal_scikit_learn_on_tied_scores():
  rng = np.random.default_rng(0)
  checked = 0
  for trial in range(150):
    n = int(rng.integers(2, 80))
    scores, targets = tied_problem(rng, n, 1, positive_rate=rng.uniform(0.05, 0.9),
                                   decimals=int(rng.integers(0, 3)))  # fmt: skip
    s, t = scores[:, 0], targets[:, 0]
    if t.sum() == 0:
      continue
    assert metrics.average_precision(s, t) == pytest.approx(
      skm.average_precision_score(t, s), abs=1e-12
    )
    if t.sum() < n:
      assert metrics.roc_auc(s, t) == pytest.approx(skm.roc_auc_score(t, s), abs=1e-12)
      checked += 1
  assert checked > 100


def test_mean_average_precision_is_scikit_learn_macro_over_classes_with_positives():
  rng = np.random.default_rng(1)
  scores, targets = tied_problem(rng, 300, 12, positive_rate=0.1)
  targets[:, 4] = 0  # a class without positives
  targets[:2, 7], targets[2:, 7] = 1, 0  # a rare class
  keep = targets.sum(axis=0) > 0
  want = skm.average_precision_score(targets[:, keep], scores[:, keep], average='macro')
  got = metrics.mean_average_precision(scores, targets)
  assert got == pytest.approx(want, abs=1e-12)
  # The positive-less class is left out, not scored: its scores do not matter.
  scores[:, 4] = rng.random(300)
  assert metrics.mean_average_precision(scores, targets) == pytest.approx(got, abs=1e-15)
  # Boolean and float targets read the same as integers.
  assert metrics.mean_average_precision(scores, targets.astype(bool)) == pytest.approx(got)
  assert metrics.mean_average_precision(scores, targets.astype(np.float32)) == pytest.approx(got)


def test_average_precision_ignores_monotone_rescaling_and_is_one_for_a_perfect_ranking():
  rng = np.random.default_rng(2)
  scores, targets = tied_problem(rng, 100, 5)
  rescaled = 1 / (1 + np.exp(-(3 * scores - 1)))  # strictly increasing: same ranking, same ties
  assert metrics.mean_average_precision(rescaled, targets) == pytest.approx(
    metrics.mean_average_precision(scores, targets), abs=1e-12
  )
  assert metrics.average_precision(targets[:, 0] + 0.1, targets[:, 0]) == 1.0


def test_mean_roc_auc_and_mean_d_prime_over_classes_with_both_kinds_of_target():
  rng = np.random.default_rng(3)
  scores, targets = tied_problem(rng, 250, 8, positive_rate=0.2)
  targets[:, 2] = 0  # no positives
  targets[:, 5] = 1  # no negatives
  keep = [c for c in range(8) if c not in (2, 5)]
  want_auc = skm.roc_auc_score(targets[:, keep], scores[:, keep], average='macro')
  assert metrics.mean_roc_auc(scores, targets) == pytest.approx(want_auc, abs=1e-12)
  want_d = np.sqrt(2) * stats.norm.ppf(want_auc)
  assert metrics.mean_d_prime(scores, targets) == pytest.approx(want_d, abs=1e-10)


@pytest.mark.parametrize('d', [0.0, 0.5, 1.0, 2.0, 3.5])
def test_d_prime_inverts_the_auc_of_two_unit_gaussians(d):
  # X ~ N(0, 1), Y ~ N(d, 1): P(Y > X) = Phi(d / sqrt 2).
  auc = stats.norm.cdf(d / np.sqrt(2))
  assert metrics.d_prime(auc) == pytest.approx(d, abs=1e-9)


def test_d_prime_recovers_the_separation_of_sampled_gaussians():
  rng = np.random.default_rng(4)
  d, n = 1.5, 20000
  scores = np.concatenate([rng.standard_normal(n), d + rng.standard_normal(n)])
  targets = np.repeat([0, 1], n)
  assert metrics.d_prime(metrics.roc_auc(scores, targets)) == pytest.approx(d, abs=0.05)
  assert metrics.d_prime(1.0) == np.inf and metrics.d_prime(0.0) == -np.inf


def test_accuracy_equals_a_direct_count():
  rng = np.random.default_rng(5)
  n, classes = 500, 7
  labels = rng.integers(0, classes, n)
  scores = rng.standard_normal((n, classes))
  scores[np.arange(n), labels] += rng.choice([0.0, 3.0], n)  # about half right
  correct = sum(int(np.argmax(scores[i]) == labels[i]) for i in range(n))
  assert metrics.accuracy(scores, labels) == correct / n
  predictions = np.argmax(scores, axis=1)
  assert metrics.accuracy(predictions, labels) == correct / n
  assert metrics.accuracy(predictions.astype(np.float64), labels.tolist()) == correct / n
  assert metrics.accuracy(scores, labels) == skm.accuracy_score(labels, predictions)


def test_accuracy_breaks_score_ties_towards_the_lowest_class():
  assert metrics.accuracy([[0.5, 0.5], [0.2, 0.2]], [0, 1]) == 0.5


@pytest.mark.parametrize(
  'call, message',
  [
    (lambda: metrics.average_precision([0.1, 0.2], [1, 0, 1]), 'must match'),
    (lambda: metrics.average_precision([0.1, 0.2], [1, 2]), 'binary'),
    (lambda: metrics.average_precision([0.1, np.nan], [1, 0]), 'non-finite'),
    (lambda: metrics.average_precision([0.1, 0.2], [0, 0]), 'without a positive'),
    (lambda: metrics.average_precision([[0.1, 0.2]], [[1, 0]]), r'shape \[N\]'),
    (lambda: metrics.average_precision(['a', 'b'], [1, 0]), 'could not convert'),
    (lambda: metrics.average_precision([0.1, 0.2], ['1', '0']), 'numeric 0/1'),
    (lambda: metrics.mean_average_precision(np.zeros((3, 2)), np.zeros((3, 2))), 'none of the 2'),
    (lambda: metrics.mean_average_precision(np.zeros((3, 2)), np.ones((3, 3))), 'must match'),
    (lambda: metrics.mean_average_precision(np.zeros(3), np.ones(3)), r'shape \[N, C\]'),
    (lambda: metrics.mean_average_precision(np.zeros((0, 2)), np.ones((0, 2))), 'no clips'),
    (lambda: metrics.roc_auc([0.1, 0.2], [1, 1]), 'both positives and negatives'),
    (lambda: metrics.mean_roc_auc(np.zeros((3, 2)), np.ones((3, 2))), 'both positive'),
    (lambda: metrics.d_prime(1.2), r'\[0, 1\]'),
    (lambda: metrics.d_prime(float('nan')), r'\[0, 1\]'),
    (lambda: metrics.accuracy(np.zeros((3, 2)), [0, 1]), '3 predictions but 2 labels'),
    (lambda: metrics.accuracy(np.zeros((2, 2)), [0, 2]), 'below the number of score columns'),
    (lambda: metrics.accuracy([0.5, 1.0], [0, 1]), 'non-integer'),
    (lambda: metrics.accuracy([0, 1], [0, -1]), 'non-negative'),
    (lambda: metrics.accuracy([0, 1], [[0, 1]]), 'shape'),
    (lambda: metrics.accuracy(np.zeros((1, 2, 2)), [0]), 'scores'),
    (lambda: metrics.accuracy(np.zeros((0, 2)), []), 'empty'),
  ],
)
def test_bad_input_fails_with_a_clear_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()
