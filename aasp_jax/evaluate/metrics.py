"""Classification metrics of the downstream tasks: accuracy, AP / mAP, ROC AUC and d-prime.

Plain numpy (vectorised, float64), so evaluation code needs no scikit-learn. The definitions are
scikit-learn's, ties included, and the tests compare against it:

- `average_precision` is `sklearn.metrics.average_precision_score`: the sum over the distinct score
  thresholds, from the highest down, of (R_n - R_{n-1}) * P_n, where P_n / R_n are the precision /
  recall of "score >= threshold n". Tied scores form one threshold (no interpolation).
- `roc_auc` is `sklearn.metrics.roc_auc_score`: the trapezoidal area under the ROC curve, which
  equals the Mann-Whitney statistic P(score_pos > score_neg) + P(tie) / 2.
- `mean_average_precision` is the mAP of the AudioSet papers (AST, Audio-MAE, EAT): the AP of each
  class, averaged over the classes that have at least one positive clip. Classes without positives
  have no AP and are left out of the mean, not counted as 0.
- `d_prime` is sqrt(2) * Phi^-1(AUC), the separation of two unit-variance Gaussians that have that
  AUC; `mean_d_prime` applies it to the class-averaged AUC, as the AudioSet papers report it.

  from aasp_jax.evaluate import metrics
  metrics.accuracy(scores_nc, labels_n)            # single-label
  metrics.mean_average_precision(scores_nc, targets_nc)  # multi-label
"""

from __future__ import annotations

import numpy as np
from scipy import special


def accuracy(scores_or_predictions, labels) -> float:
  """The fraction of clips whose predicted class is the label.

  Args:
    scores_or_predictions: scores [N, C] (the prediction is the argmax; ties go to the lowest
      class index) or predicted class indices [N].
    labels: the true class indices [N].

  Raises:
    ValueError: for mismatched lengths, empty input, non-integer class indices or labels outside
      [0, C) when scores are given.
  """
  scores = np.asarray(scores_or_predictions)
  labels_n = _class_indices(labels, 'labels')
  if scores.ndim == 2:
    _check_finite(scores, 'scores')
    if np.any(labels_n >= scores.shape[1]):
      raise ValueError(
        f'labels must be class indices below the number of score columns ({scores.shape[1]}); '
        f'got a label of {labels_n.max()}'
      )
    predictions = np.argmax(scores, axis=1)
  elif scores.ndim == 1:
    predictions = _class_indices(scores, 'predictions')
  else:
    raise ValueError(
      f'accuracy takes scores [N, C] or predictions [N]; got an array of shape {scores.shape}'
    )
  if predictions.shape[0] != labels_n.shape[0]:
    raise ValueError(
      f'{predictions.shape[0]} predictions but {labels_n.shape[0]} labels; give one per clip'
    )
  if labels_n.size == 0:
    raise ValueError('accuracy of an empty set is undefined: no clips were given')
  return float(np.mean(predictions == labels_n))


def average_precision(scores, targets) -> float:
  """Average precision of one class (scikit-learn's `average_precision_score`).

  Args:
    scores: [N] real scores (higher = more likely positive).
    targets: [N] binary targets (0/1, False/True or 0.0/1.0).

  Raises:
    ValueError: for mismatched shapes, non-binary targets, non-finite scores, or no positive
      target (AP is undefined then).
  """
  scores_n, targets_n = _binary_problem(scores, targets, ndim=1)
  if not targets_n.any():
    raise ValueError('average precision is undefined without a positive target')
  return float(_average_precision_columns(scores_n[:, None], targets_n[:, None])[0])


def mean_average_precision(scores, targets) -> float:
  """mAP as the AudioSet papers compute it: per-class AP, averaged over the classes with positives.

  A class with no positive target in `targets` has no AP; it is excluded from the mean (as in AST /
  Audio-MAE / EAT evaluation), so the value equals scikit-learn's macro average over the kept
  classes.

  Args:
    scores: [N, C] scores.
    targets: [N, C] binary multi-hot targets.

  Raises:
    ValueError: for mismatched shapes, non-binary targets, non-finite scores, or no class with a
      positive target.
  """
  scores_nc, targets_nc = _binary_problem(scores, targets, ndim=2)
  kept = targets_nc.any(axis=0)
  if not kept.any():
    raise ValueError(f'mAP is undefined: none of the {targets_nc.shape[1]} classes has a positive')
  return float(np.mean(_average_precision_columns(scores_nc[:, kept], targets_nc[:, kept])))


def roc_auc(scores, targets) -> float:
  """Area under the ROC curve of one class (scikit-learn's `roc_auc_score`; ties count half).

  Args:
    scores: [N] real scores.
    targets: [N] binary targets.

  Raises:
    ValueError: for mismatched shapes, non-binary targets, non-finite scores, or targets that are
      all positive or all negative (AUC is undefined then).
  """
  scores_n, targets_n = _binary_problem(scores, targets, ndim=1)
  positives = int(targets_n.sum())
  if positives in (0, targets_n.size):
    raise ValueError('ROC AUC is undefined unless the targets hold both positives and negatives')
  return float(_roc_auc_columns(scores_n[:, None], targets_n[:, None])[0])


def mean_roc_auc(scores, targets) -> float:
  """ROC AUC per class, averaged over the classes that have both positives and negatives.

  Raises:
    ValueError: as `roc_auc`, or when no class has both positives and negatives.
  """
  scores_nc, targets_nc = _binary_problem(scores, targets, ndim=2)
  positives = targets_nc.sum(axis=0)
  kept = (positives > 0) & (positives < targets_nc.shape[0])
  if not kept.any():
    raise ValueError(
      f'mean ROC AUC is undefined: none of the {targets_nc.shape[1]} classes has both positive '
      'and negative targets'
    )
  return float(np.mean(_roc_auc_columns(scores_nc[:, kept], targets_nc[:, kept])))


def d_prime(auc) -> float:
  """sqrt(2) * Phi^-1(auc): the d' of two unit-variance Gaussians whose ROC AUC is `auc`.

  An AUC of 0.5 gives 0, 1 gives +inf and 0 gives -inf.

  Raises:
    ValueError: if `auc` is not a number in [0, 1].
  """
  value = float(auc)
  if not 0.0 <= value <= 1.0:  # also rejects NaN
    raise ValueError(f'd_prime needs an AUC in [0, 1]; got {auc!r}')
  return float(np.sqrt(2.0) * special.ndtri(value))


def mean_d_prime(scores, targets) -> float:
  """d' of the class-averaged ROC AUC, over the classes with both positives and negatives.

  This is the d-prime the AudioSet papers report (`d_prime(mean_roc_auc(...))`, as in the AudioSet
  baselines and AST): averaging per-class d' instead would be dominated by, or infinite for, the
  classes that happen to be separated perfectly.

  Raises:
    ValueError: as `mean_roc_auc`.
  """
  return d_prime(mean_roc_auc(scores, targets))


# ---------------------------------------------------------------------------- internals


# The helpers below work class-major ([C, N], one row per class), so that sorting runs along
# contiguous memory.


def _average_precision_columns(scores_nc: np.ndarray, targets_nc: np.ndarray) -> np.ndarray:
  """AP of each column; every column must have a positive."""
  sorted_scores, sorted_targets = _sorted_descending(scores_nc, targets_nc)
  n = sorted_scores.shape[1]
  true_positives = np.cumsum(sorted_targets, axis=1)
  precision = true_positives / np.arange(1, n + 1, dtype=np.float64)
  # Tied scores are one threshold, so every clip of a tie group takes the precision at the group's
  # last clip. Each positive adds 1 / P to the recall at its group's threshold, hence
  # AP = sum over thresholds of dR * P = (1 / P) * sum over positives of their group's precision.
  _, group_end = _tie_groups(sorted_scores)
  group_precision = np.take_along_axis(precision, group_end, axis=1)
  return np.sum(sorted_targets * group_precision, axis=1) / true_positives[:, -1]


def _roc_auc_columns(scores_nc: np.ndarray, targets_nc: np.ndarray) -> np.ndarray:
  """Mann-Whitney AUC of each column, tied scores sharing the mean of their ranks."""
  sorted_scores, sorted_targets = _sorted_descending(scores_nc, targets_nc)
  n = sorted_scores.shape[1]
  group_start, group_end = _tie_groups(sorted_scores)
  # The descending rank (1 = highest) of a tie group's clips is the mean of start+1 .. end+1; the
  # ascending rank Mann-Whitney uses is n + 1 minus that.
  ascending_rank = n + 1 - (group_start + group_end + 2) / 2.0
  positives = sorted_targets.sum(axis=1)
  negatives = n - positives
  rank_sum = np.sum(ascending_rank * sorted_targets, axis=1)
  return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def _sorted_descending(scores_nc: np.ndarray, targets_nc: np.ndarray):
  """Class-major [C, N] scores sorted from the highest down, and the targets in the same order."""
  scores_cn = np.ascontiguousarray(scores_nc.T)
  targets_cn = np.ascontiguousarray(targets_nc.T)
  order = np.argsort(-scores_cn, axis=1, kind='stable')
  return np.take_along_axis(scores_cn, order, axis=1), np.take_along_axis(targets_cn, order, axis=1)


def _tie_groups(sorted_cn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """For each clip of each sorted row, the first and the last index of its run of equal values."""
  n = sorted_cn.shape[1]
  index = np.broadcast_to(np.arange(n), sorted_cn.shape)
  differs = sorted_cn[:, 1:] != sorted_cn[:, :-1]
  edge = np.ones_like(sorted_cn[:, :1], dtype=bool)
  is_first = np.concatenate([edge, differs], axis=1)
  is_last = np.concatenate([differs, edge], axis=1)
  group_start = np.maximum.accumulate(np.where(is_first, index, 0), axis=1)
  group_end = np.minimum.accumulate(np.where(is_last, index, n)[:, ::-1], axis=1)[:, ::-1]
  return group_start, group_end


def _binary_problem(scores, targets, ndim: int) -> tuple[np.ndarray, np.ndarray]:
  """Validated float64 scores and 0/1 targets of the same shape, with `ndim` dimensions."""
  scores = np.asarray(scores, dtype=np.float64)
  targets = np.asarray(targets)
  shape = '[N]' if ndim == 1 else '[N, C]'
  if scores.ndim != ndim:
    raise ValueError(f'scores must have shape {shape}; got shape {scores.shape}')
  if targets.shape != scores.shape:
    raise ValueError(
      f'targets have shape {targets.shape} but scores have {scores.shape}; they must match'
    )
  if scores.shape[0] == 0:
    raise ValueError('no clips were given (N = 0)')
  _check_finite(scores, 'scores')
  if targets.dtype == bool:
    return scores, targets.astype(np.float64)
  if not np.issubdtype(targets.dtype, np.number):
    raise ValueError(f'targets must be numeric 0/1 or boolean; got dtype {targets.dtype}')
  if not np.all((targets == 0) | (targets == 1)):
    bad = np.unique(targets[(targets != 0) & (targets != 1)])[:5]
    raise ValueError(f'targets must be binary (0 or 1); found values such as {bad.tolist()}')
  return scores, targets.astype(np.float64)


def _class_indices(values, name: str) -> np.ndarray:
  """A 1-D array of non-negative integer class indices (integral floats are accepted)."""
  array = np.asarray(values)
  if array.ndim != 1:
    raise ValueError(f'{name} must be class indices of shape [N]; got shape {array.shape}')
  if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
    raise ValueError(f'{name} must be integer class indices; got dtype {array.dtype}')
  integral = np.issubdtype(array.dtype, np.integer) or (
    np.all(np.isfinite(array)) and np.all(array == np.round(array))
  )
  if not integral:
    raise ValueError(f'{name} must be integer class indices; got non-integer values')
  if np.any(array < 0):
    raise ValueError(f'{name} must be non-negative class indices; got {array.min()}')
  return array.astype(np.int64)


def _check_finite(array: np.ndarray, name: str) -> None:
  if not np.all(np.isfinite(array)):
    raise ValueError(f'{name} hold {np.sum(~np.isfinite(array))} non-finite value(s) (NaN/inf)')
