"""The labelled data of a fine-tuning run: the dataset's train / valid / test clips, the balanced
sampler's weights and the training stream (passes over the training set, each reshuffled or
redrawn), with every clip the pipeline cannot use counted per reason.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np
from ml_collections import ConfigDict

from aasp_jax import configuration
from aasp_jax.data import clips, manifest, pipeline, sources
from aasp_jax.evaluate import datasets

SAMPLERS = ('none', 'sum', 'rarest')


@dataclasses.dataclass(frozen=True)
class Splits:
  """The labelled clips of one run (train, the periodic-eval set, the final test set)."""

  train: datasets.LabelledSet
  valid: datasets.LabelledSet | None
  test: datasets.LabelledSet

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.train.class_names

  @property
  def multilabel(self) -> bool:
    return self.train.multilabel


def load_splits(dataset_cfg: ConfigDict) -> Splits:
  """Reads the dataset and selects the train / test fold or splits named by the config."""
  labelled = datasets.read_dataset(dataset_cfg.name, dataset_cfg.root)
  where = f'{dataset_cfg.name} at {dataset_cfg.root}'
  if labelled.folds is not None:
    folds = sorted(set(labelled.folds))
    if dataset_cfg.test_fold not in folds:
      raise configuration.ConfigError(
        f'dataset.test_fold={dataset_cfg.test_fold}: {where} has folds {folds}.'
      )
    train, test = labelled.fold_split(dataset_cfg.test_fold)
    valid = None
  else:
    present = sorted(set(labelled.splits))

    def split(name):
      if name not in present:
        raise configuration.ConfigError(f'{where} has no {name!r} split; it has {present}.')
      return labelled.split(name)

    train, test = split(dataset_cfg.train_split), split(dataset_cfg.test_split)
    valid = split(dataset_cfg.valid_split) if dataset_cfg.valid_split else None
  for name, part in (('train', train), ('test', test), ('valid', valid)):
    if part is not None and not part.entries:
      raise ValueError(f'{where}: the {name} set is empty.')
  if not labelled.multilabel:
    for e in train.entries + test.entries + (valid.entries if valid else ()):
      if len(e.labels) != 1:
        raise ValueError(
          f'{where}: clip {e.clip_id or e.path} has labels {list(e.labels)}, but the task is '
          'single-label (exactly one label per clip).'
        )
  return Splits(train, valid, test)


def sampling_weights(
  entries: Sequence[manifest.Entry], class_names: Sequence[str], mode: str
) -> np.ndarray:
  """Per-clip sampling probabilities from inverse label frequencies (AST / Audio-MAE's AudioSet
  sampler): 'sum' weighs a clip by the sum of 1 / count(label) over its labels, 'rarest' by its
  rarest label's 1 / count; 'none' is uniform. Clips without labels get weight 0.
  """
  n = len(entries)
  if mode == 'none':
    return np.full(n, 1.0 / n)
  index = {c: i for i, c in enumerate(class_names)}
  counts = np.zeros(len(class_names))
  for e in entries:
    for label in e.labels:
      counts[index[label]] += 1
  inverse = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
  reduce = {'sum': np.sum, 'rarest': np.max}[mode]
  weights = np.array(
    [reduce(inverse[[index[label] for label in e.labels]]) if e.labels else 0.0 for e in entries]
  )
  if not weights.sum() > 0:
    raise ValueError('balanced_sampler: no training clip has a label.')
  return weights / weights.sum()


class TrainStream:
  """Full training batches, pass after pass over the training set, with the skip counts.

  `position()` is where the next batch comes from (the pass and the batches already taken from
  it, and the skips so far): a checkpoint stores it, and `TrainStream(..., position=...)` goes on
  from there. A pass is a fixed order (its seed is derived from the pass index), so a resumed pass
  yields the batches the interrupted one would have, unless clips of that pass were skipped before
  the resume point (then the batches are shifted by those clips).
  """

  def __init__(
    self,
    entries,
    options: pipeline.PipelineOptions,
    weights: np.ndarray | None,
    position: dict | None = None,
  ):
    self.entries, self.options, self.weights = tuple(entries), options, weights
    self.skipped = np.zeros(len(clips.SKIP_REASONS), np.int64)
    self.passes, self.batches_in_pass = 0, 0
    if position is not None:
      self.passes, self.batches_in_pass = int(position['pass']), int(position['batches_in_pass'])
      self.skipped += [int(position['skipped'].get(r, 0)) for r in clips.SKIP_REASONS]

  def position(self) -> dict:
    """The stream's place as a small JSON-able dict (see the class docstring)."""
    return {
      'pass': self.passes,
      'batches_in_pass': self.batches_in_pass,
      'skipped': pipeline.skip_summary(self.skipped),
    }

  def _source(self, pass_index: int):
    if self.weights is None:
      return sources.EntrySource(self.entries)
    rng = np.random.default_rng([self.options.seed, pass_index])
    draws = rng.choice(len(self.entries), size=len(self.entries), p=self.weights)
    return sources.EntrySource([self.entries[i] for i in draws])

  def __iter__(self):
    while True:
      # A new seed per pass reshuffles and redraws the crops; a pass ends on a whole batch.
      options = dataclasses.replace(self.options, seed=self.options.seed * 100_003 + self.passes)
      start = self.batches_in_pass
      dataset = pipeline.make_dataset(self._source(self.passes), options, 0, 1, start_batch=start)
      for batch in dataset:
        self.skipped += batch['skipped']
        if 'waveform' not in batch:  # the host-only tail: skip counts only
          continue
        self.batches_in_pass += 1
        yield {k: batch[k] for k in ('waveform', 'num_samples', 'labels')}
      if not self.batches_in_pass:
        raise ValueError(
          f'A pass over the {len(self.entries)} training clips gave no full batch of '
          f'{self.options.batch_size}: skipped {pipeline.skip_summary(self.skipped)}. Fix the '
          'unreadable clips or lower batch_size.'
        )
      self.passes, self.batches_in_pass = self.passes + 1, 0
