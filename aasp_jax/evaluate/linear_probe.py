"""Linear probe: L2-regularised multinomial logistic regression on frozen clip embeddings.

The probe is the standard check of what a self-supervised encoder has learned: embed labelled clips
with the frozen encoder, fit a linear classifier on the train split and report its accuracy on the
test split. The protocol here:

  1. Features are standardised with the statistics of the rows the classifier is fitted on (the
     train split; within cross-validation, the training folds).
  2. The classifier minimises  mean_i CE(x_i W + b, y_i) + l2 / 2 * ||W||^2  (bias unregularised),
     full batch, with L-BFGS (optax) from zero: deterministic, and the objective is strictly convex,
     so the result is its unique optimum up to the tolerance.
  3. `l2` is chosen from a small fixed grid by stratified k-fold cross-validation on the train split
     only (highest mean validation accuracy; ties go to the stronger regularisation). The test split
     is used once, for the final accuracy.

Fits run on the CPU backend: they are small, and the CPU keeps float32 matmuls exact-precision and
the results identical whatever accelerator the encoder runs on.
"""

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from aasp_jax.audio import presets as presets_lib
from aasp_jax.data import manifest
from aasp_jax.evaluate import embeddings as embeddings_lib

_logger = logging.getLogger(__name__)

# Regularisation strengths tried by cross-validation (per-example loss scale; 1e-4 is nearly
# unregularised for standardised features, 1.0 shrinks weights hard).
DEFAULT_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
DEFAULT_FOLDS = 5
# L-BFGS stops when the objective's gradient norm is below TOLERANCE, or after MAX_ITERATIONS (only
# weakly regularised fits on separable data, whose optimum is far from zero, get that far).
TOLERANCE = 1e-5
MAX_ITERATIONS = 1000
# Curvature pairs L-BFGS keeps. On embeddings of the bundled probe set, 30 instead of optax's 10
# cut the iterations of a CV grid by a third (weakly regularised fits are ill-conditioned).
LBFGS_MEMORY = 30


@dataclasses.dataclass(frozen=True)
class Standardizer:
  """Per-feature (x - mean) / scale; constant features get scale 1 (they stay 0)."""

  mean: np.ndarray
  scale: np.ndarray

  @classmethod
  def fit(cls, x: np.ndarray) -> 'Standardizer':
    x = np.asarray(x, np.float64)
    std = x.std(axis=0)
    return cls(x.mean(axis=0), np.where(std > 0, std, 1.0))

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return ((np.asarray(x, np.float64) - self.mean) / self.scale).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LogisticRegression:
  """A fitted multinomial classifier on (already standardised) features.

  Attributes:
    weights: float32 [features, classes].
    bias: float32 [classes].
    iterations: L-BFGS iterations run.
    grad_norm: the objective's gradient norm at the returned parameters.
  """

  weights: np.ndarray
  bias: np.ndarray
  iterations: int
  grad_norm: float

  def logits(self, x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64) @ self.weights + self.bias

  def predict(self, x: np.ndarray) -> np.ndarray:
    return np.argmax(self.logits(x), axis=1)


def objective(params: dict, x, y, sample_weight, l2):
  """Weighted mean cross-entropy + l2 / 2 * ||W||^2, the function the probe minimises."""
  logits = jnp.matmul(x, params['w'], precision=jax.lax.Precision.HIGHEST) + params['b']
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  data_term = jnp.sum(sample_weight * ce) / jnp.sum(sample_weight)
  return data_term + 0.5 * l2 * jnp.sum(params['w'] ** 2)


@functools.partial(jax.jit, static_argnames=('num_classes', 'max_iterations'))
def _lbfgs(x, y, sample_weight, l2, tolerance, num_classes: int, max_iterations: int):
  """Full-batch L-BFGS from zero; returns (params, iterations, gradient norm)."""
  fun = functools.partial(objective, x=x, y=y, sample_weight=sample_weight, l2=l2)
  solver = optax.lbfgs(memory_size=LBFGS_MEMORY)
  value_and_grad = optax.value_and_grad_from_state(fun)
  params = {
    'w': jnp.zeros((x.shape[1], num_classes), jnp.float32),
    'b': jnp.zeros((num_classes,), jnp.float32),
  }

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=fun)
    return optax.apply_updates(params, updates), state

  def not_converged(carry):
    _, state = carry
    count = otu.tree_get(state, 'count')
    grad_norm = otu.tree_norm(otu.tree_get(state, 'grad'))
    return (count == 0) | ((count < max_iterations) & (grad_norm >= tolerance))

  params, state = jax.lax.while_loop(not_converged, step, (params, solver.init(params)))
  grad_norm = otu.tree_norm(jax.grad(fun)(params))
  return params, otu.tree_get(state, 'count'), grad_norm


def fit_logistic_regression(
  x: np.ndarray,
  y: np.ndarray,
  num_classes: int,
  l2: float,
  sample_weight: np.ndarray | None = None,
  *,
  tolerance: float = TOLERANCE,
  max_iterations: int = MAX_ITERATIONS,
) -> LogisticRegression:
  """Minimises `objective` over (W, b) on the CPU.

  Args:
    x: float [N, D] features (standardise them first).
    y: int [N] class ids in [0, num_classes).
    num_classes: number of classes (classes without examples are allowed).
    l2: the L2 strength on W, > 0 (it makes the optimum unique).
    sample_weight: optional [N] non-negative weights; a zero weight removes a row exactly, which
      lets every cross-validation fold reuse one compiled program.
  """
  if l2 <= 0:
    raise ValueError(f'l2 must be > 0, got {l2}')
  y = np.asarray(y)
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f'labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]')
  weight = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight)
  cpu = jax.devices('cpu')[0]
  args = jax.device_put(
    (
      np.asarray(x, np.float32),
      y.astype(np.int32),
      weight.astype(np.float32),
      np.float32(l2),
      np.float32(tolerance),
    ),
    cpu,
  )
  params, iterations, grad_norm = _lbfgs(
    *args, num_classes=num_classes, max_iterations=max_iterations
  )
  return LogisticRegression(
    np.asarray(params['w']), np.asarray(params['b']), int(iterations), float(grad_norm)
  )


def stratified_folds(y: np.ndarray, folds: int) -> np.ndarray:
  """Fold id per row: each class's rows, in order, are dealt round-robin (no randomness).

  A class with n rows has n // folds or n // folds + 1 rows in every fold.
  """
  y = np.asarray(y)
  fold = np.empty(len(y), np.int64)
  for label in np.unique(y):
    rows = np.flatnonzero(y == label)
    fold[rows] = np.arange(len(rows)) % folds
  return fold


def fit_standardized(x, y, num_classes, l2, rows=None):
  """(Standardizer, LogisticRegression) fitted on `rows` of x (all rows when None)."""
  mask = np.ones(len(y), bool) if rows is None else rows
  standardizer = Standardizer.fit(x[mask])
  # All rows are passed (masked rows with weight 0), so every fold has the same shapes.
  model = fit_logistic_regression(standardizer(x), y, num_classes, l2, mask.astype(np.float32))
  return standardizer, model


def cross_validate(
  x: np.ndarray,
  y: np.ndarray,
  num_classes: int,
  l2_grid: Sequence[float] = DEFAULT_L2_GRID,
  folds: int = DEFAULT_FOLDS,
) -> dict[float, float]:
  """Mean validation accuracy over stratified folds of (x, y), for each l2 of the grid."""
  if len(y) < folds:
    raise ValueError(f'{folds}-fold cross-validation needs at least {folds} rows, got {len(y)}')
  fold = stratified_folds(y, folds)
  scores = {}
  for l2 in l2_grid:
    accuracies = []
    for k in range(folds):
      held_out = fold == k
      standardizer, model = fit_standardized(x, y, num_classes, l2, rows=~held_out)
      predicted = model.predict(standardizer(x[held_out]))
      accuracies.append(np.mean(predicted == y[held_out]))
    scores[float(l2)] = float(np.mean(accuracies))
  return scores


def select_l2(cv_accuracy: dict[float, float]) -> float:
  """The l2 with the highest CV accuracy; ties go to the larger l2 (the simpler model)."""
  best = max(cv_accuracy.values())
  return max(l2 for l2, accuracy in cv_accuracy.items() if accuracy == best)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
  """What `probe` found.

  Attributes:
    accuracy: test accuracy of the classifier fitted on all train rows with the chosen l2.
    l2: the chosen L2 strength.
    train_accuracy: its accuracy on the train rows.
    cv_accuracy: {l2: mean validation accuracy} over the grid (train split only).
    predictions: int [num_test] predicted class per test row.
    num_train: train rows used.
    num_test: test rows scored.
  """

  accuracy: float
  l2: float
  train_accuracy: float
  cv_accuracy: dict[float, float]
  predictions: np.ndarray
  num_train: int
  num_test: int


def probe(
  train_x: np.ndarray,
  train_y: np.ndarray,
  test_x: np.ndarray,
  test_y: np.ndarray,
  num_classes: int,
  l2_grid: Sequence[float] = DEFAULT_L2_GRID,
  folds: int = DEFAULT_FOLDS,
) -> ProbeResult:
  """Chooses l2 by CV on the train split, refits on all of it, and scores the test split.

  Raises:
    ValueError: for NaN or Inf features (a diverged encoder would otherwise score as chance).
  """
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  for name, x in (('train', train_x), ('test', test_x)):
    if not np.all(np.isfinite(x)):
      raise ValueError(f'The {name} features hold NaN or Inf values; the probe needs finite ones.')
  cv_accuracy = cross_validate(train_x, train_y, num_classes, l2_grid, folds)
  l2 = select_l2(cv_accuracy)
  standardizer, model = fit_standardized(train_x, train_y, num_classes, l2)
  if model.iterations >= MAX_ITERATIONS:
    _logger.info('Probe fit (l2=%g) stopped at %d iterations', l2, model.iterations)
  predictions = model.predict(standardizer(test_x))
  train_accuracy = np.mean(model.predict(standardizer(train_x)) == train_y)
  return ProbeResult(
    accuracy=float(np.mean(predictions == test_y)) if len(test_y) else float('nan'),
    l2=l2,
    train_accuracy=float(train_accuracy),
    cv_accuracy=cv_accuracy,
    predictions=predictions,
    num_train=len(train_y),
    num_test=len(test_y),
  )


def label_vocabulary(entries: Sequence[manifest.Entry], where: str) -> tuple[str, ...]:
  """The sorted labels of a single-label manifest (its rows must carry exactly one label each)."""
  for e in entries:
    if len(e.labels) != 1:
      raise ValueError(
        f'{where}: clip {e.clip_id!r} has {len(e.labels)} labels {list(e.labels)}; the linear '
        'probe needs exactly one label per clip'
      )
  return tuple(sorted({e.labels[0] for e in entries}))


def class_ids(
  entries: Sequence[manifest.Entry], vocabulary: Sequence[str], where: str
) -> np.ndarray:
  """int [N] position of each clip's single label in `vocabulary`."""
  index = {name: i for i, name in enumerate(vocabulary)}
  label_vocabulary(entries, where)  # checks one label per clip
  unseen = sorted({e.labels[0] for e in entries} - set(index))
  if unseen:
    raise ValueError(
      f'{where}: label(s) {unseen} do not occur in the train manifest, so the probe cannot '
      f'predict them; the train labels are {list(vocabulary)}'
    )
  return np.array([index[e.labels[0]] for e in entries], np.int64)


def probe_encoder(
  encoder: nn.Module,
  encoder_params,
  preset: presets_lib.FrontEndPreset,
  train_manifest: str | os.PathLike,
  test_manifest: str | os.PathLike,
  batch_size: int = 16,
  *,
  min_samples: int | None = None,
  l2_grid: Sequence[float] = DEFAULT_L2_GRID,
  folds: int = DEFAULT_FOLDS,
) -> dict:
  """Linear-probe accuracy of a frozen encoder on a labelled train / test manifest pair.

  The label vocabulary is the train manifest's; every clip needs exactly one label. Clips the input
  pipeline skips (see `embeddings.clip_embeddings`) are left out of both the fit and the accuracy,
  and counted.

  Returns:
    dict with 'accuracy' (test), 'l2', 'train_accuracy', 'cv_accuracy' (at the chosen l2),
    'num_classes', 'train_clips' / 'test_clips' (embedded and used), 'train_skipped' /
    'test_skipped' ({reason: count}) and 'skipped' (total).

  Raises:
    ValueError: a clip without exactly one label, or a test label absent from the train manifest
      (the message names the manifest).
  """
  train_entries = manifest.read_manifest(train_manifest)
  test_entries = manifest.read_manifest(test_manifest)
  vocabulary = label_vocabulary(train_entries, os.fspath(train_manifest))
  train_y = class_ids(train_entries, vocabulary, os.fspath(train_manifest))
  test_y = class_ids(test_entries, vocabulary, os.fspath(test_manifest))
  embed = functools.partial(
    embeddings_lib.clip_embeddings,
    encoder,
    encoder_params,
    preset,
    batch_size=batch_size,
    min_samples=min_samples,
  )
  train, test = embed(train_entries), embed(test_entries)
  result = probe(
    train.embeddings,
    train_y[train.indices],
    test.embeddings,
    test_y[test.indices],
    len(vocabulary),
    l2_grid,
    folds,
  )
  return {
    'accuracy': result.accuracy,
    'l2': result.l2,
    'train_accuracy': result.train_accuracy,
    'cv_accuracy': result.cv_accuracy[result.l2],
    'num_classes': len(vocabulary),
    'train_clips': result.num_train,
    'test_clips': result.num_test,
    'train_skipped': train.skipped,
    'test_skipped': test.skipped,
    'skipped': train.num_skipped + test.num_skipped,
  }
