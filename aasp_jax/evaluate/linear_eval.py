"""Linear evaluation with the protocol in a config (configs/linear_eval.py).

  from aasp_jax.evaluate import linear_eval
  result = linear_eval.linear_eval(config)   # {'accuracy_mean': ..., 'accuracy_std': ..., ...}

Steps:
  1. The frozen encoder of `config.checkpoint` (teacher or student, `pretrained.load_pretrained`)
     embeds the train and test clips once (`embeddings.clip_embeddings`: [CLS, mean token]). The
     embeddings are cached as .npz, keyed by a hash of everything they depend on: the checkpoint's
     files, step and copy, the clips (path, window, size and modification time of each file), the
     front end and `min_samples`. Another classifier or seed reuses them; a changed audio file or
     checkpoint misses the cache.
  2. For each seed, a multinomial logistic regression on standardised features (train-split
     statistics) minimising mean CE + l2 / 2 * ||W||^2, l2 chosen by stratified k-fold CV on the
     train split: 'lbfgs' (`linear_probe`, full batch, deterministic) or 'adamw' (minibatches in a
     seeded order, AdamW with a cosine-decayed learning rate, from zero).
  3. Test accuracy per seed, and its mean and sample standard deviation (ddof = 1) over seeds.

Clips the input pipeline cannot use are left out of both the fit and the accuracy, and counted.
"""

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from aasp_jax import configuration
from aasp_jax.data import manifest
from aasp_jax.evaluate import embeddings as embeddings_lib
from aasp_jax.evaluate import linear_probe, pretrained

_logger = logging.getLogger(__name__)

CLASSIFIERS = ('lbfgs', 'adamw')
# Bumped when the cached arrays' meaning changes, so old cache files are never read.
CACHE_VERSION = 1


# ---------------------------------------------------------------------------- config checks


def check_config(config: ConfigDict) -> None:
  """Raises configuration.ConfigError naming the key for a config that cannot run."""

  def fail(message):
    raise configuration.ConfigError(message)

  if not config.checkpoint:
    fail('checkpoint is required: a training workdir, its checkpoints/ or checkpoints/<step>.')
  if config.which not in pretrained.WHICH:
    fail(f'which={config.which!r}: choose one of {pretrained.WHICH}.')
  manifests = bool(config.train) or bool(config.test)
  if config.task:
    if manifests or config.dataset.name:
      fail('task runs the shared probe protocol on its own splits: leave train, test and '
           'dataset.name unset.')
    if not os.path.isfile(config.task):
      fail(f'task={config.task!r} does not exist (a manifest with label and group columns).')
  elif manifests and config.dataset.name:
    fail('Give either train/test manifests or dataset.name, not both.')
  if manifests and not (config.train and config.test):
    fail('train and test must both be set (labelled manifests, one label per clip).')
  if not config.task and not manifests and not config.dataset.name:
    fail(
      'No labelled clips: set task (the shared protocol), train and test (manifests) or '
      'dataset.name and dataset.root.'
    )
  if config.dataset.name and not config.dataset.root:
    fail(f'dataset.root is required with dataset.name={config.dataset.name!r}.')
  if config.classifier not in CLASSIFIERS:
    fail(f'classifier={config.classifier!r}: choose one of {CLASSIFIERS}.')
  if config.batch_size < 1:
    fail(f'batch_size={config.batch_size} must be >= 1.')
  if not config.seeds or not all(isinstance(s, int) for s in config.seeds):
    fail(f'seeds={config.seeds!r} must be a non-empty list of integers.')
  if config.l2 is not None and config.l2 <= 0:
    fail(f'l2={config.l2} must be > 0 (or unset, to choose it by cross-validation).')
  if config.l2 is None:
    if not config.l2_grid or any(v <= 0 for v in config.l2_grid):
      fail(f'l2_grid={config.l2_grid!r} must be a non-empty list of values > 0.')
    if config.cv_folds < 2:
      fail(f'cv_folds={config.cv_folds} must be >= 2.')
  a = config.adamw
  for key in ('epochs', 'batch_size'):
    if a[key] < 1:
      fail(f'adamw.{key}={a[key]} must be >= 1.')
  if a.lr <= 0 or a.weight_decay < 0:
    fail(f'adamw.lr={a.lr} must be > 0 and adamw.weight_decay={a.weight_decay} >= 0.')


# ---------------------------------------------------------------------------- labelled splits


@dataclasses.dataclass(frozen=True)
class Splits:
  """The train and test clips with their class ids in the train split's vocabulary."""

  train: tuple[manifest.Entry, ...]
  test: tuple[manifest.Entry, ...]
  train_y: np.ndarray
  test_y: np.ndarray
  class_names: tuple[str, ...]
  description: str


def read_splits(config: ConfigDict) -> Splits:
  """The labelled clips the config names (manifests, or a dataset through `datasets`)."""
  if config.train:
    train = tuple(manifest.read_manifest(config.train))
    test = tuple(manifest.read_manifest(config.test))
    where_train, where_test = os.fspath(config.train), os.fspath(config.test)
    description = f'{where_train} / {where_test}'
  else:
    train, test, description = _dataset_splits(config.dataset)
    where_train, where_test = f'{description} (train)', f'{description} (test)'
  if not train or not test:
    raise ValueError(f'{description}: the train and the test split both need clips.')
  vocabulary = linear_probe.label_vocabulary(train, where_train)
  train_y = linear_probe.class_ids(train, vocabulary, where_train)
  test_y = linear_probe.class_ids(test, vocabulary, where_test)
  return Splits(train, test, train_y, test_y, vocabulary, description)


def _dataset_splits(dataset: ConfigDict):
  from aasp_jax.evaluate import datasets  # only needed for named datasets

  labelled = datasets.read_dataset(dataset.name, dataset.root)
  if labelled.multilabel:
    raise configuration.ConfigError(
      f'dataset {dataset.name!r} is multi-label; linear evaluation here is single-label '
      '(softmax over classes). Use aasp-finetune for multi-label tasks.'
    )
  if labelled.folds is not None:
    if dataset.test_fold is None:
      raise configuration.ConfigError(
        f'dataset {dataset.name!r} is evaluated by folds {sorted(set(labelled.folds))}: set '
        'dataset.test_fold.'
      )
    train, test = labelled.fold_split(dataset.test_fold)
    description = f'{dataset.name} fold {dataset.test_fold}'
  else:
    train, test = labelled.split('train'), labelled.split('test')
    description = dataset.name
  return tuple(train.entries), tuple(test.entries), description


# ---------------------------------------------------------------------------- cached embeddings


def _file_stamp(path: str):
  """(size, mtime_ns) of a file, or None when it is missing (it is then skipped and counted)."""
  try:
    st = os.stat(path)
  except OSError:
    return None
  return [st.st_size, st.st_mtime_ns]


def _checkpoint_stamp(source: str):
  """Relative path, size and mtime of every file of a checkpoint step folder."""
  stamps = []
  for root, _, files in os.walk(source):
    for name in sorted(files):
      path = os.path.join(root, name)
      stamps.append([os.path.relpath(path, source), *(_file_stamp(path) or [None, None])])
  return sorted(stamps)


def cache_key(model: pretrained.Pretrained, entries: Sequence[manifest.Entry], min_samples) -> str:
  """Hex digest of everything the embeddings of `entries` under `model` depend on."""
  description = {
    'version': CACHE_VERSION,
    'checkpoint': model.source,
    'checkpoint_files': _checkpoint_stamp(model.source) if os.path.isdir(model.source) else None,
    'step': model.step,
    'which': model.which,
    'preset': dataclasses.asdict(model.preset),
    'min_samples': min_samples,
    'entries': [[e.path, e.start, e.end, _file_stamp(e.path)] for e in entries],
  }
  text = json.dumps(description, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()


def cached_clip_embeddings(
  model: pretrained.Pretrained,
  entries: Sequence[manifest.Entry],
  batch_size: int,
  min_samples: int | None = None,
  cache_dir: str | None = None,
) -> tuple[embeddings_lib.ClipEmbeddings, str]:
  """(embeddings, 'hit' | 'miss' | 'off'): from `cache_dir` when there, else from the encoder."""
  if not cache_dir:
    return _embed(model, entries, batch_size, min_samples), 'off'
  path = os.path.join(cache_dir, f'{cache_key(model, entries, min_samples)}.npz')
  if os.path.exists(path):
    with np.load(path) as saved:
      skipped = json.loads(str(saved['skipped_json']))
      return embeddings_lib.ClipEmbeddings(saved['embeddings'], saved['indices'], skipped), 'hit'
  result = _embed(model, entries, batch_size, min_samples)
  os.makedirs(cache_dir, exist_ok=True)
  buffer = io.BytesIO()
  np.savez(
    buffer,
    embeddings=result.embeddings,
    indices=result.indices,
    skipped_json=np.asarray(json.dumps(result.skipped)),
  )
  temporary = f'{path}.{os.getpid()}.tmp'
  with open(temporary, 'wb') as f:
    f.write(buffer.getvalue())
  os.replace(temporary, path)  # atomic: a concurrent reader never sees half a file
  return result, 'miss'


def _embed(model, entries, batch_size, min_samples) -> embeddings_lib.ClipEmbeddings:
  return embeddings_lib.clip_embeddings(
    model.encoder, model.params, model.preset, entries, batch_size, min_samples=min_samples
  )


# ---------------------------------------------------------------------------- AdamW classifier


@dataclasses.dataclass(frozen=True)
class AdamWFit:
  """A classifier trained by minibatch AdamW on (already standardised) features.

  Attributes:
    weights: float32 [features, classes].
    bias: float32 [classes].
    loss: the full-batch objective (mean CE + l2 / 2 * ||W||^2) at the returned parameters.
    steps: optimizer steps taken.
  """

  weights: np.ndarray
  bias: np.ndarray
  loss: float
  steps: int

  def predict(self, x: np.ndarray) -> np.ndarray:
    return np.argmax(np.asarray(x, np.float64) @ self.weights + self.bias, axis=1)


def minibatch_order(num_rows: int, batch_size: int, epochs: int, seed: int) -> np.ndarray:
  """int [steps, batch_size] row ids: each epoch a fresh permutation; -1 pads an epoch's last batch.

  Every batch holds at least one real row, so every step sees data.
  """
  rng = np.random.default_rng(seed)
  per_epoch = -(-num_rows // batch_size)
  order = np.full((epochs, per_epoch * batch_size), -1, np.int64)
  for epoch in range(epochs):
    order[epoch, :num_rows] = rng.permutation(num_rows)
  return order.reshape(epochs * per_epoch, batch_size)


@functools.partial(jax.jit, static_argnames=('num_classes', 'lr', 'weight_decay'))
def _adamw(x, y, order_sb, l2, num_classes: int, lr: float, weight_decay: float):
  schedule = optax.cosine_decay_schedule(lr, decay_steps=order_sb.shape[0])
  # Decoupled decay on W only: the bias is not regularised, as in the objective.
  tx = optax.adamw(schedule, weight_decay=weight_decay, mask={'w': True, 'b': False})
  params = {
    'w': jnp.zeros((x.shape[1], num_classes), jnp.float32),
    'b': jnp.zeros((num_classes,), jnp.float32),
  }

  def step(carry, rows_b):
    params, state = carry
    valid_b = (rows_b >= 0).astype(jnp.float32)
    rows_b = jnp.maximum(rows_b, 0)
    grads = jax.grad(linear_probe.objective)(params, x[rows_b], y[rows_b], valid_b, l2)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), order_sb)
  loss = linear_probe.objective(params, x, y, jnp.ones_like(y, jnp.float32), l2)
  return params, loss


def fit_adamw(
  x: np.ndarray,
  y: np.ndarray,
  num_classes: int,
  l2: float,
  seed: int,
  *,
  epochs: int = 100,
  batch_size: int = 64,
  lr: float = 1e-2,
  weight_decay: float = 0.0,
) -> AdamWFit:
  """Minimises mean CE + l2 / 2 * ||W||^2 over (W, b) by AdamW on the CPU, from zero.

  `seed` sets the minibatch order; the same seed gives the same result.
  """
  y = np.asarray(y)
  if len(y) == 0:
    raise ValueError('fit_adamw needs at least one row.')
  if y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f'labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]')
  order = minibatch_order(len(y), min(batch_size, len(y)), epochs, seed)
  cpu = jax.devices('cpu')[0]
  args = jax.device_put(
    (np.asarray(x, np.float32), y.astype(np.int32), order.astype(np.int32), np.float32(l2)), cpu
  )
  params, loss = _adamw(
    *args, num_classes=num_classes, lr=float(lr), weight_decay=float(weight_decay)
  )
  return AdamWFit(np.asarray(params['w']), np.asarray(params['b']), float(loss), len(order))


# ---------------------------------------------------------------------------- classifiers


# A fit: (standardised train x, train y, num_classes, l2) -> a model with .predict(x).
Fit = Callable[[np.ndarray, np.ndarray, int, float], object]


def make_fit(config: ConfigDict, seed: int) -> Fit:
  """The configured classifier's fit function for one seed."""
  if config.classifier == 'lbfgs':
    return linear_probe.fit_logistic_regression
  a = config.adamw

  def fit(x, y, num_classes, l2):
    return fit_adamw(
      x,
      y,
      num_classes,
      l2,
      seed,
      epochs=a.epochs,
      batch_size=a.batch_size,
      lr=a.lr,
      weight_decay=a.weight_decay,
    )

  return fit


def cross_validate(fit: Fit, x, y, num_classes, l2_grid, folds) -> dict[float, float]:
  """Mean validation accuracy over stratified folds (standardised on the training folds)."""
  if len(y) < folds:
    raise ValueError(f'{folds}-fold cross-validation needs at least {folds} rows, got {len(y)}')
  fold = linear_probe.stratified_folds(y, folds)
  scores = {}
  for l2 in l2_grid:
    accuracies = []
    for k in range(folds):
      held_out = fold == k
      standardizer = linear_probe.Standardizer.fit(x[~held_out])
      model = fit(standardizer(x[~held_out]), y[~held_out], num_classes, float(l2))
      accuracies.append(np.mean(model.predict(standardizer(x[held_out])) == y[held_out]))
    scores[float(l2)] = float(np.mean(accuracies))
  return scores


def classify(config: ConfigDict, seed: int, train_x, train_y, test_x, test_y, num_classes) -> dict:
  """One seed: l2 by CV (unless fixed), a fit on all train rows, test accuracy."""
  fit = make_fit(config, seed)
  cv = None
  if config.l2 is None:
    cv = cross_validate(fit, train_x, train_y, num_classes, config.l2_grid, config.cv_folds)
    l2 = linear_probe.select_l2(cv)
  else:
    l2 = float(config.l2)
  standardizer = linear_probe.Standardizer.fit(train_x)
  model = fit(standardizer(train_x), train_y, num_classes, l2)
  predictions = model.predict(standardizer(test_x))
  result = {
    'seed': seed,
    'accuracy': float(np.mean(predictions == test_y)),
    'train_accuracy': float(np.mean(model.predict(standardizer(train_x)) == train_y)),
    'l2': l2,
    'cv_accuracy': cv,
  }
  if isinstance(model, AdamWFit):
    result['final_loss'] = model.loss
  return result


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


# ---------------------------------------------------------------------------- the evaluation


def default_cache_dir(model: pretrained.Pretrained) -> str:
  """<workdir>/embedding_cache for a checkpoint at <workdir>/checkpoints/<step>."""
  checkpoints = os.path.dirname(model.source)
  return os.path.join(os.path.dirname(checkpoints), 'embedding_cache')


def linear_eval(config: ConfigDict, model: pretrained.Pretrained | None = None) -> dict:
  """Runs the protocol of `config` (see configs/linear_eval.py); `model` overrides the checkpoint.

  Returns:
    dict with 'accuracy_per_seed', 'accuracy_mean', 'accuracy_std' (sample std over seeds),
    'per_seed' (accuracy, train accuracy, chosen l2, CV accuracies, and for 'adamw' the final
    loss), 'num_classes', 'class_names', 'train_clips' / 'test_clips' (embedded and used),
    'train_skipped' / 'test_skipped' ({reason: count}), 'skipped' (total), 'cache'
    ({'train': 'hit' | 'miss' | 'off', 'test': ...}), and what was evaluated.
  """
  check_config(config)
  if model is None:
    model = pretrained.load_pretrained(config.checkpoint, config.which, config.step)
  if config.task:
    return task_eval(config, model)
  splits = read_splits(config)
  cache_dir = (config.cache_dir or default_cache_dir(model)) if config.cache else None
  embed = functools.partial(
    cached_clip_embeddings,
    model,
    batch_size=config.batch_size,
    min_samples=config.min_samples,
    cache_dir=cache_dir,
  )
  (train, train_cache), (test, test_cache) = embed(splits.train), embed(splits.test)
  if len(train.indices) == 0 or len(test.indices) == 0:
    raise ValueError(
      f'{splits.description}: no usable clips left in the '
      f'{"train" if len(train.indices) == 0 else "test"} split (skipped: train '
      f'{train.skipped}, test {test.skipped}).'
    )
  for name, e in (('train', train), ('test', test)):
    if not np.all(np.isfinite(e.embeddings)):
      raise ValueError(f'The {name} embeddings hold NaN or Inf values (a diverged checkpoint?).')
  data = (
    train.embeddings,
    splits.train_y[train.indices],
    test.embeddings,
    splits.test_y[test.indices],
    len(splits.class_names),
  )
  seeds = [int(s) for s in config.seeds]
  if config.classifier == 'lbfgs':
    # Deterministic: one fit serves every seed (reported per seed so the shapes never change).
    once = classify(config, seeds[0], *data)
    per_seed = [dict(once, seed=s) for s in seeds]
  else:
    per_seed = [classify(config, s, *data) for s in seeds]
  accuracies = [r['accuracy'] for r in per_seed]
  mean, std = mean_and_std(accuracies)
  if config.classifier == 'lbfgs':
    std = float('nan')  # one deterministic fit: the seeds measure no uncertainty
  return {
    'checkpoint': model.source,
    'step': model.step,
    'which': model.which,
    'splits': splits.description,
    'classifier': config.classifier,
    'seeds': seeds,
    'accuracy_per_seed': accuracies,
    'accuracy_mean': mean,
    'accuracy_std': std,
    'per_seed': per_seed,
    'num_classes': len(splits.class_names),
    'class_names': list(splits.class_names),
    'train_clips': len(train.indices),
    'test_clips': len(test.indices),
    'train_skipped': train.skipped,
    'test_skipped': test.skipped,
    'skipped': train.num_skipped + test.num_skipped,
    'cache': {'train': train_cache, 'test': test_cache, 'dir': cache_dir},
  }


def task_eval(config: ConfigDict, model: pretrained.Pretrained) -> dict:
  """The shared probe protocol (`protocol`) on `config.task`: every feature, linear and kNN, each
  accuracy with its standard error over the repeated group k-fold splits."""
  from aasp_jax.evaluate import protocol

  task = protocol.ProbeTask.from_manifest(config.task)
  features = protocol.encoder_features(
    model.encoder, model.params, model.preset, task.entries, config.batch_size
  )
  scores = protocol.score_features(task, features)
  return {
    'checkpoint': model.source,
    'step': model.step,
    'which': model.which,
    'task': task.name,
    'protocol': {
      'folds': protocol.FOLDS,
      'repeats': protocol.REPEATS,
      'headline_feature': protocol.HEADLINE_FEATURE,
    },
    'num_classes': task.num_classes,
    'class_names': list(task.classes),
    'clips': len(features.indices),
    'groups': int(len(np.unique(task.groups))),
    'skipped': features.skipped,
    'scores': {f: {c: s.to_json() for c, s in per.items()} for f, per in scores.items()},
  }
