"""The probe protocol: one way to score a frozen encoder, shared by the main job, `aasp-linear-eval`
(task mode), the trainer's online probe and `benchmarks/learning.py`.

A *task* is a labelled manifest with a `group` per clip (`task.csv`: path, label, group), where a
group is the clip's source: a kit, speaker, recording, instrument sample set or file family. The
protocol, fixed before any recipe was tuned (2026-12-05), is recorded here; each task's splits are
recorded in a `folds.csv` next to it (`python -m aasp_jax.evaluate.protocol TASK.csv` writes it,
and a test checks that the rule still gives it):

  1. Splits: `REPEATS` x `FOLDS` stratified group k-fold over every labelled clip. A group lies on
     one side of every split, so a probe cannot match near duplicates. Repeat r assigns groups to
     folds greedily (largest first, ties in a random order seeded by r) to balance every class
     over the folds. The splits depend on the task file alone, not on any encoder.
  2. Input: each clip's first window (the encoder's `target_length` frames, crop from the start,
     zero-padded); time patches that hold no frame of the clip are masked as attention keys and
     left out of every pooled feature.
  3. Features, all from one forward pass: `cls` (final CLS), `mean` (mean of the final output's
     valid tokens), `block<i>` (mean of block i's valid tokens, before the final norm) and
     `blocks` (the average of the blocks' means). The headline feature is `HEADLINE_FEATURE`,
     chosen before any result; every feature is reported.
  4. Classifiers, fitted on the training folds only, on features standardised with the training
     folds' statistics:
     * linear: a ridge classifier (least squares on one-hot targets, closed form, so hundreds
       of nested fits cost seconds), l2 chosen from `L2_GRID` by `INNER_FOLDS`-fold group CV
       inside the training folds (nested: the held-out fold never chooses anything);
     * kNN: cosine similarity, `KNN_K` neighbours, votes weighted by similarity.
  5. Score: accuracy pooled over the folds of a repeat, averaged over repeats; its standard error
     is the standard deviation of the per-fold accuracies / sqrt(number of folds in all).
     Between encoders (pre-training seeds), gains are paired with each seed's own initialisation,
     and their spread is the standard error over seeds.

The log-mel statistics baseline (`mel_statistics`: mean and std of each mel band over the clip's
valid frames of the same window) goes through the same splits and classifiers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aasp_jax.audio import presets as presets_lib
from aasp_jax.data import clips, manifest, pipeline, sources
from aasp_jax.evaluate import embed
from aasp_jax.evaluate import embeddings as embeddings_lib
from aasp_jax.evaluate import linear_probe

FOLDS = 5
REPEATS = 3
INNER_FOLDS = 3
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
KNN_K = 5
HEADLINE_FEATURE = 'mean'
CLASSIFIERS = ('linear', 'knn')


# ---------------------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class ProbeTask:
  """A labelled task with a source group per clip.

  Attributes:
    name: a short name (the task file's folder name by default).
    entries: the clips, in manifest order.
    labels: int [N] class index into `classes`.
    classes: the sorted class names.
    groups: int [N] group index (clips of one group always share a side of a split).
    folds: int [REPEATS, N] the fold of each clip in each repeat.
  """

  name: str
  entries: tuple[manifest.Entry, ...]
  labels: np.ndarray
  classes: tuple[str, ...]
  groups: np.ndarray
  folds: np.ndarray

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  @classmethod
  def from_manifest(cls, path: str | os.PathLike, name: str | None = None) -> 'ProbeTask':
    """Reads a task manifest; every clip needs exactly one label and a group."""
    path = os.fspath(path)
    entries = manifest.read_manifest(path)
    classes = linear_probe.label_vocabulary(entries, path)
    labels = linear_probe.class_ids(entries, classes, path)
    missing = [e.clip_id for e in entries if e.group is None]
    if missing:
      raise ValueError(
        f'{path}: {len(missing)} clip(s) have no "group" (e.g. {missing[0]!r}); a probe task '
        'needs the source of every clip so that splits keep near duplicates together'
      )
    group_names = sorted({e.group for e in entries})
    index = {g: i for i, g in enumerate(group_names)}
    groups = np.array([index[e.group] for e in entries], np.int64)
    folds = group_kfold(labels, groups, FOLDS, REPEATS)
    task_name = name or os.path.basename(os.path.dirname(os.path.abspath(path)))
    return cls(task_name, tuple(entries), labels, tuple(classes), groups, folds)


def group_kfold(
  labels: np.ndarray, groups: np.ndarray, folds: int, repeats: int, seed: int = 0
) -> np.ndarray:
  """Repeated stratified group k-fold: int [repeats, N] fold ids, groups never split.

  Each repeat visits the groups largest first (ties in an order drawn from `seed + repeat`) and
  puts each in the fold where it raises the class proportions least: the fold minimising
  sum_c (fold count of c + group count of c) / class total of c, weighted by the group's counts,
  then the smallest fold, then the lowest index. Deterministic given the arrays.
  """
  labels, groups = np.asarray(labels), np.asarray(groups)
  num_classes = int(labels.max()) + 1 if labels.size else 0
  group_ids = np.unique(groups)
  if len(group_ids) < folds:
    raise ValueError(f'{len(group_ids)} groups cannot fill {folds} folds')
  counts = np.zeros((len(group_ids), num_classes), np.int64)
  position = {g: i for i, g in enumerate(group_ids)}
  for label, group in zip(labels, groups):
    counts[position[group], label] += 1
  totals = np.maximum(counts.sum(axis=0), 1)
  out = np.empty((repeats, len(labels)), np.int64)
  for r in range(repeats):
    order = np.random.default_rng(seed + r).permutation(len(group_ids))
    order = order[np.argsort(-counts[order].sum(axis=1), kind='stable')]
    fold_counts = np.zeros((folds, num_classes), np.int64)
    fold_of_group = np.empty(len(group_ids), np.int64)
    for g in order:
      share = ((fold_counts + counts[g]) / totals * counts[g]).sum(axis=1)
      sizes = fold_counts.sum(axis=1)
      best = min(range(folds), key=lambda k: (round(share[k], 12), sizes[k], k))
      fold_of_group[g] = best
      fold_counts[best] += counts[g]
    out[r] = fold_of_group[[position[g] for g in groups]]
  return out


# ------------------------------------------------------------------------------------- features


@functools.partial(jax.jit, static_argnames=('encoder', 'preset', 'patch_t', 'patch_f'))
def _features(params, x_btf, num_samples_b, *, encoder, preset, patch_t, patch_f):
  """Every protocol feature of a batch of clips (log-mels of the first window, padding masked)."""
  with nn.logical_axis_rules(()):
    n_time, n_freq = preset.target_length // patch_t, preset.num_mel_bins // patch_f
    frames_b = valid_frames(num_samples_b, preset)
    time_valid_bt = jnp.arange(n_time)[None, :] * patch_t < frames_b[:, None]
    valid_bn = jnp.repeat(time_valid_bt, n_freq, axis=1)
    out = encoder.apply(
      {'params': params}, x_btf, token_valid_bn=valid_bn, deterministic=True, return_layers=True
    )
  weight_bn1 = valid_bn[..., None].astype(jnp.float32)
  count_b1 = jnp.maximum(weight_bn1.sum(axis=1), 1.0)

  def pool(tokens_bnd):
    return (tokens_bnd.astype(jnp.float32) * weight_bn1).sum(axis=1) / count_b1

  features = {'cls': out['cls'].astype(jnp.float32), 'mean': pool(out['tokens'])}
  blocks = [pool(layer) for layer in out['layers']]
  for i, block in enumerate(blocks):
    features[f'block{i}'] = block
  features['blocks'] = jnp.mean(jnp.stack(blocks), axis=0)
  return features


def valid_frames(num_samples, preset: presets_lib.FrontEndPreset):
  """Kaldi frames of clips with `num_samples` samples, capped at the window (`target_length`)."""
  frames = embed._frames_from_samples(jnp.asarray(num_samples, jnp.int32), preset)
  return jnp.minimum(frames, preset.target_length)


@functools.partial(jax.jit, static_argnames=('preset',))
def _mel_statistics(x_btf, num_samples_b, *, preset):
  valid_bt1 = (jnp.arange(preset.target_length)[None] < valid_frames(num_samples_b, preset)[:, None])[
    ..., None
  ].astype(jnp.float32)
  count = jnp.maximum(valid_bt1.sum(axis=1), 1.0)
  mean = (x_btf * valid_bt1).sum(axis=1) / count
  var = (jnp.square(x_btf - mean[:, None]) * valid_bt1).sum(axis=1) / count
  return {'mel_stats': jnp.concatenate([mean, jnp.sqrt(var)], axis=-1)}


@dataclasses.dataclass(frozen=True)
class TaskFeatures:
  """Features of a task's readable clips.

  Attributes:
    features: {name: float32 [N, D]}, rows in entry order.
    indices: int [N] entry index of each row.
    skipped: {reason: count}; every clip is either a row or counted here.
  """

  features: dict[str, np.ndarray]
  indices: np.ndarray
  skipped: dict[str, int]


@functools.lru_cache(maxsize=4)
def _decoded(entries: tuple, preset: presets_lib.FrontEndPreset, batch_size: int):
  """The log-mels of the clips' first windows, computed once per process and reused by every
  encoder scored on them: (list of (entry indices, log-mels [batch_size, T, F], lengths), skip
  counts). Short batches are padded to `batch_size` rows (one compiled program); only the leading
  rows are real.

  The log-mel is the host front end's (`fbank_host`, in the pipeline's readers): it equals the
  device one to float32 rounding (~3e-6), and on a CPU it costs only the clip's own frames, not
  the whole padded window (~3,700 against ~130 clips/s for FSDD's 0.4 s clips on 2 cores, where
  the device front end took ~3/4 of the tiny encoder's probe time).
  """
  options = embeddings_lib.pipeline_options(preset, batch_size)
  options = dataclasses.replace(options, features='log_mel')
  dataset = pipeline.make_dataset(
    sources.EntrySource(list(entries)), options, process_index=0, process_count=1
  )
  skipped_total = np.zeros(len(clips.SKIP_REASONS), np.int64)
  batches = []
  for batch in dataset:
    skipped_total += batch['skipped']
    if 'index' in batch:  # the host-only tail batch carries skip counts only
      batches.append((
        batch['index'].astype(np.int64),
        embeddings_lib.pad_rows(batch['log_mel'], batch_size),
        embeddings_lib.pad_rows(batch['num_samples'], batch_size),
      ))
  skipped = pipeline.skip_summary(skipped_total)
  embedded = sum(len(index) for index, _, _ in batches)
  if embedded + sum(skipped.values()) != len(entries):
    raise RuntimeError('the input pipeline lost clips without counting them')
  return batches, skipped


def _batched(forward, preset, entries, batch_size: int) -> TaskFeatures:
  """`forward(log_mel, num_samples)` -> {name: [batch, ...]} over the decoded clips."""
  # Labels and groups do not change the audio: two tasks over the same clips share one decode.
  clips_only = tuple(dataclasses.replace(e, labels=(), group=None) for e in entries)
  batches, skipped = _decoded(clips_only, preset, batch_size)
  device = jax.local_devices()[0]
  chunks = []
  for index, x_btf, num_samples in batches:
    out = forward(jax.device_put(x_btf, device), jax.device_put(num_samples, device))
    chunks.append({k: np.asarray(v)[: len(index)] for k, v in out.items()})
  indices = np.concatenate([i for i, _, _ in batches]) if batches else np.zeros((0,), np.int64)
  features = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
  return TaskFeatures(features, indices, dict(skipped))


def encoder_features(
  encoder: nn.Module, params, preset: presets_lib.FrontEndPreset, entries, batch_size: int = 16
) -> TaskFeatures:
  """The protocol's features (`cls`, `mean`, `block<i>`, `blocks`) of a frozen encoder."""
  params = jax.device_put(nn.meta.unbox(params), jax.local_devices()[0])
  patch_t, patch_f = _patch_size(encoder)
  forward = functools.partial(
    _features, params, encoder=encoder, preset=preset, patch_t=patch_t, patch_f=patch_f
  )
  return _batched(forward, preset, entries, batch_size)


def mel_statistics(preset: presets_lib.FrontEndPreset, entries, batch_size: int = 16):
  """The baseline: mean and std of each normalised log-mel band over the window's valid frames."""
  return _batched(functools.partial(_mel_statistics, preset=preset), preset, entries, batch_size)


def _patch_size(encoder: nn.Module) -> tuple[int, int]:
  return encoder.stem.patch_t, encoder.stem.patch_f


# ----------------------------------------------------------------------------------- classifiers


def _ridge_predictions(x, y_onehot, train, held, l2_grid) -> dict[float, np.ndarray]:
  """Predicted classes of the `held` rows for each l2: ridge regression on one-hot targets,
  features standardised and targets centred on the `train` rows (the intercept is unpenalised).

  Minimises ||X W - Y||^2 / n + l2 ||W||^2 for every l2 from one eigendecomposition of X^T X / n.
  """
  xt = x[train]
  mean, std = xt.mean(axis=0), xt.std(axis=0)
  std = np.where(std > 0, std, 1.0)
  xt, xh = (xt - mean) / std, (x[held] - mean) / std
  yt = y_onehot[train]
  y_mean = yt.mean(axis=0)
  n = len(xt)
  evals, evecs = np.linalg.eigh(xt.T @ xt / n)
  proj = evecs.T @ (xt.T @ (yt - y_mean) / n)
  out = {}
  for l2 in l2_grid:
    w = evecs @ (proj / (np.maximum(evals, 0.0) + l2)[:, None])
    out[l2] = np.argmax(xh @ w + y_mean, axis=1)
  return out


def _inner_folds(groups: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """Fold id in [0, INNER_FOLDS) for each of `rows` (group-aware), -1 elsewhere."""
  out = np.full(len(labels), -1, np.int64)
  out[rows] = group_kfold(labels[rows], groups[rows], INNER_FOLDS, 1, seed=1)[0]
  return out


def linear_scores(x: np.ndarray, task: ProbeTask, rows: np.ndarray) -> np.ndarray:
  """Linear-probe correctness, bool [REPEATS, N] (each clip scored in its held-out fold).

  The classifier is a ridge classifier (`_ridge_predictions`); `rows` are the entry indices of
  x's rows, and clips without a row count as wrong. l2 is chosen per outer fold by nested group
  CV on its training folds (highest inner accuracy; ties go to the larger l2).
  """
  x = np.asarray(x, np.float64)
  labels, groups, folds = task.labels[rows], task.groups[rows], task.folds[:, rows]
  y_onehot = np.eye(task.num_classes)[labels]
  out = np.zeros((folds.shape[0], len(task.labels)), bool)
  for r in range(folds.shape[0]):
    for k in range(FOLDS):
      train, held = folds[r] != k, folds[r] == k
      inner = _inner_folds(groups, labels, np.flatnonzero(train))
      hits = dict.fromkeys(L2_GRID, 0)
      for j in range(INNER_FOLDS):
        predicted = _ridge_predictions(x, y_onehot, train & (inner != j), inner == j, L2_GRID)
        for l2 in L2_GRID:
          hits[l2] += int(np.sum(predicted[l2] == labels[inner == j]))
      chosen = linear_probe.select_l2({float(l2): h for l2, h in hits.items()})
      predicted = _ridge_predictions(x, y_onehot, train, held, (chosen,))[chosen]
      out[r, rows[held]] = predicted == labels[held]
  return out


def knn_scores(x: np.ndarray, task: ProbeTask, rows: np.ndarray) -> np.ndarray:
  """Cosine kNN correctness, bool [REPEATS, N]; features standardised on the training folds."""
  labels, folds = task.labels[rows], task.folds[:, rows]
  out = np.zeros((folds.shape[0], len(task.labels)), bool)
  x = np.asarray(x, np.float64)
  for r in range(folds.shape[0]):
    for k in range(FOLDS):
      train, held = folds[r] != k, folds[r] == k
      mean, std = x[train].mean(axis=0), x[train].std(axis=0)
      z = (x - mean) / np.where(std > 0, std, 1.0)
      z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
      sim = z[held] @ z[train].T
      top = np.argsort(-sim, axis=1, kind='stable')[:, :KNN_K]
      votes = np.zeros((held.sum(), task.num_classes))
      for j in range(top.shape[1]):
        np.add.at(votes, (np.arange(len(top)), labels[train][top[:, j]]), sim[np.arange(len(top)), top[:, j]] + 1.0)
      out[r, rows[held]] = votes.argmax(axis=1) == labels[held]
  return out


# --------------------------------------------------------------------------------------- scoring


@dataclasses.dataclass(frozen=True)
class Score:
  """Accuracy of one feature set with one classifier on one task.

  Attributes:
    accuracy: mean over repeats of the accuracy pooled over that repeat's folds.
    se: std of the per-fold accuracies / sqrt(folds in all).
    per_fold: float [REPEATS * FOLDS] accuracy of each held-out fold.
  """

  accuracy: float
  se: float
  per_fold: np.ndarray

  def to_json(self) -> dict:
    return {'accuracy': self.accuracy, 'se': self.se, 'per_fold': self.per_fold.tolist()}


def summarise(correct: np.ndarray, task: ProbeTask) -> Score:
  per_fold = np.array(
    [correct[r][task.folds[r] == k].mean() for r in range(correct.shape[0]) for k in range(FOLDS)]
  )
  return Score(
    float(correct.mean(axis=1).mean()),
    float(per_fold.std(ddof=1) / math.sqrt(len(per_fold))),
    per_fold,
  )


def score_features(
  task: ProbeTask,
  task_features: TaskFeatures,
  names: Sequence[str] | None = None,
  classifiers: Sequence[str] = CLASSIFIERS,
) -> dict[str, dict[str, Score]]:
  """{feature: {classifier: Score}} for the chosen feature sets (default: all)."""
  names = list(task_features.features) if names is None else list(names)
  out = {}
  for name in names:
    x = task_features.features[name]
    if not np.all(np.isfinite(x)):
      raise ValueError(f'feature {name!r} holds NaN or Inf values; the probe needs finite ones')
    out[name] = {}
    for classifier in classifiers:
      fn = {'linear': linear_scores, 'knn': knn_scores}[classifier]
      out[name][classifier] = summarise(fn(x, task, task_features.indices), task)
  return out


def score_encoder(
  task: ProbeTask,
  encoder: nn.Module,
  params,
  preset: presets_lib.FrontEndPreset,
  names: Sequence[str] | None = None,
  batch_size: int = 16,
) -> dict[str, dict[str, Score]]:
  """Features of a frozen encoder on `task`, scored by the protocol."""
  return score_features(task, encoder_features(encoder, params, preset, task.entries, batch_size), names)


def paired_gain(pretrained: Sequence[float], random: Sequence[float]) -> dict:
  """Gains of pre-trained encoders over their own initialisations (same order): mean, SE over
  seeds (ddof 1) and mean / SE."""
  gains = np.asarray(pretrained, np.float64) - np.asarray(random, np.float64)
  se = float(gains.std(ddof=1) / math.sqrt(len(gains))) if len(gains) > 1 else float('nan')
  mean = float(gains.mean())
  return {'gains': gains.tolist(), 'mean': mean, 'se': se, 'z': mean / se if se > 0 else float('nan')}


def fold_gain(a: Score, b: Score) -> tuple[float, float]:
  """Paired gain of a over b scored on the same folds: mean and SE of the per-fold differences."""
  diff = a.per_fold - b.per_fold
  return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))


def verdict(gain: float, se: float) -> str:
  """How the main job words a gain: a gain (or a loss) only beyond 3 standard errors."""
  if se > 0 and gain >= 3 * se:
    return 'a gain beyond 3 standard errors'
  if se > 0 and gain <= -3 * se:
    return 'a LOSS beyond 3 standard errors'
  return 'within noise (|gain| < 3 SE): not a demonstrated gain'


# ------------------------------------------------------------------------------ recorded splits

FOLDS_FILE = 'folds.csv'


def folds_table(task: ProbeTask) -> list[list[str]]:
  """The task's splits as rows: clip id, group, label, then the fold in each repeat."""
  header = ['id', 'group', 'label'] + [f'fold_repeat{r}' for r in range(task.folds.shape[0])]
  rows = [
    [e.clip_id, e.group, task.classes[task.labels[i]]] + [str(f) for f in task.folds[:, i]]
    for i, e in enumerate(task.entries)
  ]
  return [header] + rows


def write_folds(task_manifest: str) -> str:
  """Writes folds.csv next to a task manifest (the recorded splits); returns its path."""
  import csv

  task = ProbeTask.from_manifest(task_manifest)
  path = os.path.join(os.path.dirname(os.path.abspath(task_manifest)), FOLDS_FILE)
  with open(path, 'w', newline='') as f:
    csv.writer(f, lineterminator='\n').writerows(folds_table(task))
  return path


if __name__ == '__main__':
  import sys

  for manifest_path in sys.argv[1:]:
    print(write_folds(manifest_path))
