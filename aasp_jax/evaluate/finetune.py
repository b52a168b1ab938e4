"""Fine-tuning a pre-trained encoder on a labelled downstream task (EAT-style recipes).

  from aasp_jax.evaluate import finetune, finetune_cli
  config = finetune_cli.parse_config([
      'aasp-finetune', '--config=configs/finetune/esc50.py:test_fold=1',
      '--config.dataset.root=/data/ESC-50-master', '--config.init_checkpoint=runs/pretrain',
      '--config.workdir=runs/ft_esc50'])
  result = finetune.finetune(config)   # FinetuneResult: losses, 'accuracy' or 'mAP', skipped clips

What happens:
- The encoder (architecture, front end, weights) comes from a pre-training checkpoint via
  `pretrained.load_pretrained` (the EMA teacher by default), rebuilt with stochastic depth; a linear
  head on the CLS token (initialised near zero, as MAE / Audio-MAE) maps it to the classes. Only
  the input length changes (`target_length`): positions are fixed 2-D sin-cos and AaPE's Lambda
  encoder pools its modulation spectrum into fixed bands, so neither depends on the length.
- Audio is read by the training input pipeline (`data/pipeline.py`: random crops for training,
  crops from the start for evaluation, multi-hot labels from the class names); log-mel is computed
  on device. Training reads the set in passes (epochs), each reshuffled (or, with a balanced
  sampler, redrawn with inverse label-frequency weights); clips the pipeline cannot use are counted
  per reason and reported.
- One jitted train step: log-mel -> mixup -> SpecAugment -> random token dropping -> encoder with
  stochastic depth -> head -> softmax cross-entropy (single-label) or sigmoid BCE (multi-label) ->
  AdamW with layer-wise lr decay and a warm-up + cosine schedule. Data-parallel over the local
  devices of one process: parameters replicated, the batch split along 'data' (NamedSharding).
- Evaluation: one window per clip from its start (no chunking), softmax / sigmoid scores, then
  accuracy (single-label) or mAP (multi-label, `metrics.mean_average_precision`) on the test split
  or fold. The reported metric is the one after the last step (no selection on the test set).
"""

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from aasp_jax import configuration
from aasp_jax import sharding as sharding_lib
from aasp_jax.audio import fbank_device
from aasp_jax.audio import presets as presets_lib
from aasp_jax.data import clips, manifest, pipeline, sources
from aasp_jax.evaluate import augment, datasets, embeddings, metrics, pretrained
from aasp_jax.models import build
from aasp_jax.train import optimizer as optimizer_lib

_logger = logging.getLogger(__name__)

SAMPLERS = ('none', 'sum', 'rarest')

# Config checks: fail before anything is read or compiled.


def check_config(config: ConfigDict) -> None:
  """Raises configuration.ConfigError naming the key for anything that cannot run."""
  err = configuration.ConfigError
  if not config.init_checkpoint:
    raise err('init_checkpoint is required: a pre-training workdir or checkpoints/<step> folder.')
  if not config.dataset.root:
    raise err('dataset.root is required: the folder of the dataset in its usual layout.')
  if config.dataset.name not in datasets.DATASETS:
    raise err(f'dataset.name={config.dataset.name!r}; choose one of {list(datasets.DATASETS)}.')
  if config.which not in pretrained.WHICH:
    raise err(f'which={config.which!r}; choose one of {list(pretrained.WHICH)}.')
  if config.balanced_sampler not in SAMPLERS:
    raise err(f'balanced_sampler={config.balanced_sampler!r}; choose one of {list(SAMPLERS)}.')
  positive = ('batch_size', 'eval_batch_size', 'target_length', 'log_every')
  for key in positive:
    if config[key] <= 0:
      raise err(f'{key} must be positive, got {config[key]}.')
  if config.steps < 0 or (config.steps == 0 and not config.epochs > 0):
    raise err(f'Set steps > 0 or epochs > 0 (got steps={config.steps}, epochs={config.epochs}).')
  o = config.optimizer
  if not o.lr >= 0 or not 0 < o.layer_decay <= 1 or not o.weight_decay >= 0:
    raise err(
      f'optimizer: need lr >= 0, 0 < layer_decay <= 1 and weight_decay >= 0; got lr={o.lr}, '
      f'layer_decay={o.layer_decay}, weight_decay={o.weight_decay}.'
    )
  if not 0 <= o.warmup_fraction < 1:
    raise err(f'optimizer.warmup_fraction must be in [0, 1), got {o.warmup_fraction}.')
  if config.mixup < 0:
    raise err(f'mixup (the Beta alpha) must be >= 0 (0 = off), got {config.mixup}.')
  if not 0 <= config.token_mask_ratio < 1:
    raise err(f'token_mask_ratio must be in [0, 1), got {config.token_mask_ratio}.')
  if not 0 <= config.drop_path < 1:
    raise err(f'drop_path must be in [0, 1), got {config.drop_path}.')
  for key in ('time_masks', 'time_width', 'freq_masks', 'freq_width'):
    if config.specaug[key] < 0:
      raise err(f'specaug.{key} must be >= 0, got {config.specaug[key]}.')
  if config.eval_every < 0 or config.num_devices < 0 or config.num_workers < 0:
    raise err('eval_every, num_devices and num_workers must be >= 0.')


def finetune_preset(pre: pretrained.Pretrained, target_length: int) -> presets_lib.FrontEndPreset:
  """The checkpoint's front end with the recipe's input length (checked against the encoder)."""
  m = pre.config.model
  if target_length % m.patch_t:
    raise configuration.ConfigError(
      f'target_length={target_length} is not a multiple of the encoder patch ({m.patch_t} '
      f'frames); use {max(m.patch_t, target_length - target_length % m.patch_t)}.'
    )
  if target_length // m.patch_t > m.max_time_patches:
    raise configuration.ConfigError(
      f'target_length={target_length} gives {target_length // m.patch_t} time patches, more '
      f'than the encoder position table holds ({m.max_time_patches}).'
    )
  return dataclasses.replace(pre.preset, target_length=target_length)


# Data.


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


class _TrainStream:
  """Full training batches, pass after pass over the training set, with the skip counts."""

  def __init__(self, entries, options: pipeline.PipelineOptions, weights: np.ndarray | None):
    self.entries, self.options, self.weights = tuple(entries), options, weights
    self.skipped = np.zeros(len(clips.SKIP_REASONS), np.int64)
    self.passes = 0

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
      dataset = pipeline.make_dataset(self._source(self.passes), options, 0, 1)
      batches = 0
      for batch in dataset:
        self.skipped += batch['skipped']
        if 'waveform' not in batch:  # the host-only tail: skip counts only
          continue
        batches += 1
        yield {k: batch[k] for k in ('waveform', 'num_samples', 'labels')}
      self.passes += 1
      if not batches:
        raise ValueError(
          f'A pass over the {len(self.entries)} training clips gave no full batch of '
          f'{self.options.batch_size}: skipped {pipeline.skip_summary(self.skipped)}. Fix the '
          'unreadable clips or lower batch_size.'
        )


# Model.


class ClsHead(nn.Module):
  """A linear classifier on the CLS token, initialised near zero (MAE / Audio-MAE: std 2e-5)."""

  num_classes: int

  @nn.compact
  def __call__(self, cls_bd):
    dense = nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(2e-5))
    return dense(cls_bd.astype(jnp.float32))


class Classifier(nn.Module):
  """Encoder + CLS head; parameters {'encoder': ..., 'head': ...}."""

  encoder: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, x_btf, visible_idx=None, deterministic: bool = True):
    out = self.encoder(x_btf, visible_idx=visible_idx, deterministic=deterministic)
    return ClsHead(self.num_classes, name='head')(out['cls'])


# Optimizer: AdamW with layer-wise lr decay.


def layer_id(path: Sequence[str], depth: int) -> int:
  """The lr-decay layer of a parameter: stem, positions and CLS token 0, block i i + 1, the final
  norm and the head depth + 1 (positions are fixed sin-cos, so they have no parameter)."""
  top, name = path[0], path[1] if len(path) > 1 else ''
  if top == 'head':
    return depth + 1
  if top == 'encoder':
    if name in ('stem', 'cls'):
      return 0
    if name.startswith('blocks_') and name[len('blocks_') :].isdigit():
      return int(name[len('blocks_') :]) + 1
    if name == 'norm':
      return depth + 1
  raise ValueError(f'No lr-decay layer for parameter {"/".join(path)!r}.')


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def layer_scales(params, depth: int, decay: float):
  """The lr multiplier of every parameter: decay ** (depth + 1 - layer_id)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: float(decay ** (depth + 1 - layer_id(_names(path), depth))), params
  )


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update leaf by a constant (the per-layer lr multipliers)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(opt: ConfigDict, params, depth: int, total_steps: int):
  """AdamW whose lr (and so weight decay, as in PyTorch's per-group AdamW) is scaled per layer.
  Returns (transformation, schedule)."""
  warmup = int(opt.warmup_fraction * total_steps)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, opt.lr, warmup, max(total_steps, warmup + 1), end_value=0.0
  )
  clip = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []
  tx = optax.chain(
    *clip,
    optax.scale_by_adam(b1=opt.b1, b2=opt.b2),
    optax.add_decayed_weights(opt.weight_decay, mask=optimizer_lib.weight_decay_mask),
    optax.scale_by_learning_rate(schedule),
    scale_by_tree(layer_scales(params, depth, opt.layer_decay)),
  )
  return tx, schedule


# Step.


@flax.struct.dataclass
class FinetuneState:
  step: jax.Array
  params: dict  # {'encoder', 'head'}
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """The train step's static augmentation settings (hashable)."""

  mixup: float
  time_masks: int
  time_width: int
  freq_masks: int
  freq_width: int
  mask_value: float
  token_mask_ratio: float

  @classmethod
  def from_config(cls, config: ConfigDict) -> 'Augmentation':
    s = config.specaug
    return cls(
      float(config.mixup),
      s.time_masks,
      s.time_width,
      s.freq_masks,
      s.freq_width,
      float(s.mask_value),
      float(config.token_mask_ratio),
    )


def classification_loss(logits_bc, targets_bc, multilabel: bool) -> jax.Array:
  """Mean sigmoid BCE over classes and clips (multi-label) or soft-target softmax CE."""
  logits_bc = logits_bc.astype(jnp.float32)
  if multilabel:
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits_bc, targets_bc))
  return jnp.mean(optax.softmax_cross_entropy(logits_bc, targets_bc))


def augmented_inputs(rng, batch, preset, aug: Augmentation, grid: tuple[int, int]):
  """(features, targets, visible token indices or None) of a training batch."""
  r_mix, r_spec, r_tok = jax.random.split(rng, 3)
  x_btf = fbank_device.features(batch['waveform'], preset, batch['num_samples'])
  y_bc = batch['labels'].astype(jnp.float32)
  if aug.mixup > 0:
    mixed = augment.mixup(r_mix, x_btf, y_bc, aug.mixup)
    x_btf, y_bc = mixed.features, mixed.labels
  if aug.time_masks or aug.freq_masks:
    x_btf = augment.spec_augment(
      r_spec,
      x_btf,
      time_masks=aug.time_masks,
      time_width=aug.time_width,
      freq_masks=aug.freq_masks,
      freq_width=aug.freq_width,
      mask_value=aug.mask_value,
    ).features
  visible = None
  if aug.token_mask_ratio > 0:
    visible = augment.random_keep_indices(
      r_tok, x_btf.shape[0], grid[0] * grid[1], aug.token_mask_ratio
    )
  return x_btf, y_bc, visible


def train_step(state, batch, rng, *, model, preset, tx, schedule, aug, grid, multilabel):
  """(state, batch, base rng) -> (new state, metrics); pure, jitted by `Finetuner`."""
  step_rng = jax.random.fold_in(rng, state.step)
  r_aug, r_drop = jax.random.split(step_rng)
  with nn.logical_axis_rules(()):
    x_btf, y_bc, visible = augmented_inputs(r_aug, batch, preset, aug, grid)

    def loss_fn(params):
      logits = model.apply(
        {'params': params}, x_btf, visible, deterministic=False, rngs={'dropout': r_drop}
      )
      return classification_loss(logits, y_bc, multilabel)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  out = {
    'loss': loss,
    'grad_norm': optax.tree.norm(grads),
    'learning_rate': schedule(state.step),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out


def eval_step(params, batch, *, model, preset, multilabel):
  """Scores [B, C] (sigmoid or softmax) of a batch of waveforms, deterministic."""
  with nn.logical_axis_rules(()):
    x_btf = fbank_device.features(batch['waveform'], preset, batch['num_samples'])
    logits = model.apply({'params': params}, x_btf).astype(jnp.float32)
  return jax.nn.sigmoid(logits) if multilabel else jax.nn.softmax(logits)


# The run.


@dataclasses.dataclass
class FinetuneResult:
  """What a run did and scored.

  Attributes:
    steps: optimizer steps taken.
    train_loss: the training loss of every step (after augmentation).
    metric_name: 'accuracy' (single-label) or 'mAP' (multi-label).
    metric_value: the metric on the test split / fold after the last step.
    skipped: {'train': {reason: n}, 'test': ..., 'valid': ...}; 'train' counts skip events in the
      training stream (a clip is counted once per pass over the data), the others count clips.
    evals: [{'step', 'split', metric_name, 'clips'}] of every evaluation, the final one last.
    num_train / num_test: clips in the training and test sets (before skipping).
    train_passes: passes over the training set started.
    params: the fine-tuned {'encoder', 'head'} parameters (host numpy).
    seconds: wall time of the training loop (compilation included).
  """

  steps: int
  train_loss: list[float]
  metric_name: str
  metric_value: float
  skipped: dict[str, dict[str, int]]
  evals: list[dict]
  num_train: int
  num_test: int
  train_passes: int
  params: dict
  seconds: float

  def summary(self) -> dict:
    """JSON-serialisable summary (everything except the parameters)."""
    out = dataclasses.asdict(self)
    del out['params']
    return out


class Finetuner:
  """Everything a run needs, built (and checked) before anything compiles; `run()` trains."""

  def __init__(self, config: ConfigDict):
    check_config(config)
    self.config = config
    if jax.process_count() > 1:
      raise configuration.ConfigError(
        'Fine-tuning runs in one process (data-parallel over its local devices); '
        f'got {jax.process_count()} processes.'
      )
    self.pretrained = pretrained.load_pretrained(
      config.init_checkpoint, which=config.which, step=config.init_step
    )
    self.preset = finetune_preset(self.pretrained, config.target_length)
    model_cfg = self.pretrained.config.model
    self.depth = model_cfg.depth
    self.grid = (
      config.target_length // model_cfg.patch_t,
      self.preset.num_mel_bins // model_cfg.patch_f,
    )
    self.splits = load_splits(config.dataset)
    self.multilabel = self.splits.multilabel
    self.metric_name = 'mAP' if self.multilabel else 'accuracy'
    encoder = build.build_encoder(model_cfg, drop_path=config.drop_path)
    self.model = Classifier(encoder, len(self.splits.class_names))
    num_train = len(self.splits.train.entries)
    self.total_steps = config.steps or max(
      1, math.ceil(config.epochs * num_train / config.batch_size)
    )

    # Mesh: the batch is split over 'data' (x 'fsdp' = 1); parameters are replicated.
    devices = jax.local_devices()
    n = config.num_devices or len(devices)
    if n > len(devices):
      raise configuration.ConfigError(f'num_devices={n}, but {len(devices)} are available.')
    self.mesh = sharding_lib.make_mesh(
      ConfigDict(dict(data=-1, fsdp=1, tensor=1)), devices=devices[:n]
    )
    for key in ('batch_size', 'eval_batch_size'):
      if config[key] % n:
        raise configuration.ConfigError(
          f'{key}={config[key]} is not divisible by the {n} devices; change it or num_devices.'
        )
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh)
    replicated = NamedSharding(self.mesh, P())

    head = ClsHead(len(self.splits.class_names)).init(
      jax.random.fold_in(jax.random.key(config.seed), 0),
      jnp.zeros((1, model_cfg.width), jnp.float32),
    )['params']
    params = {'encoder': self.pretrained.params, 'head': jax.tree.map(np.asarray, head)}
    self.tx, self.schedule = make_optimizer(config.optimizer, params, self.depth, self.total_steps)
    params = jax.device_put(params, replicated)
    self.state = jax.jit(
      lambda p: FinetuneState(jnp.zeros((), jnp.int32), p, self.tx.init(p)),
      out_shardings=replicated,
    )(params)

    def batch_shardings(keys):
      return {k: self.batch_sharding for k in keys}

    self._train_step = jax.jit(
      lambda state, batch, rng: train_step(
        state,
        batch,
        rng,
        model=self.model,
        preset=self.preset,
        tx=self.tx,
        schedule=self.schedule,
        aug=Augmentation.from_config(config),
        grid=self.grid,
        multilabel=self.multilabel,
      ),
      in_shardings=(
        replicated,
        batch_shardings(('waveform', 'num_samples', 'labels')),
        replicated,
      ),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,),
    )
    self._eval_step = jax.jit(
      lambda params, batch: eval_step(
        params, batch, model=self.model, preset=self.preset, multilabel=self.multilabel
      ),
      in_shardings=(replicated, batch_shardings(('waveform', 'num_samples'))),
      out_shardings=replicated,
    )

  def _device_batch(self, batch: dict) -> dict:
    return pipeline.to_global_arrays(batch, self.batch_sharding)

  def evaluate(self, params, labelled: datasets.LabelledSet) -> tuple[float, dict[str, int], int]:
    """(metric, skipped clips per reason, clips scored) on one window per clip from its start."""
    size = self.config.eval_batch_size
    options = dataclasses.replace(
      embeddings.pipeline_options(self.preset, size), label_vocab=self.splits.class_names
    )
    dataset = pipeline.make_dataset(sources.EntrySource(labelled.entries), options, 0, 1)
    scores, targets = [], []
    skipped = np.zeros(len(clips.SKIP_REASONS), np.int64)
    for batch in dataset:
      skipped += batch['skipped']
      if 'waveform' not in batch:
        continue
      rows = batch['waveform'].shape[0]
      padded = {k: embeddings.pad_rows(batch[k], size) for k in ('waveform', 'num_samples')}
      out = self._eval_step(params, self._device_batch(padded))
      scores.append(np.asarray(out)[:rows])
      targets.append(batch['labels'])
    skip_counts = pipeline.skip_summary(skipped)
    if not scores:
      raise ValueError(
        f'No {labelled.name} clip of {len(labelled.entries)} could be read for evaluation: '
        f'skipped {skip_counts}.'
      )
    scores_nc, targets_nc = np.concatenate(scores), np.concatenate(targets)
    if self.multilabel:
      value = metrics.mean_average_precision(scores_nc, targets_nc)
    else:
      value = metrics.accuracy(scores_nc, np.argmax(targets_nc, axis=1))
    return float(value), skip_counts, len(scores_nc)

  def run(self) -> FinetuneResult:
    c = self.config
    train = self.splits.train
    options = pipeline.PipelineOptions(
      preset=self.preset,
      batch_size=c.batch_size,
      seed=c.seed,
      num_epochs=1,
      shuffle=c.balanced_sampler == 'none',  # weighted draws are already in random order
      crop='random',
      num_workers=c.num_workers,
      min_samples=self.preset.window_length,
      label_vocab=self.splits.class_names,
    )
    weights = None
    if c.balanced_sampler != 'none':
      weights = sampling_weights(train.entries, train.class_names, c.balanced_sampler)
    stream = _TrainStream(train.entries, options, weights)
    rng = jax.device_put(jax.random.key(c.seed), NamedSharding(self.mesh, P()))
    state = self.state
    losses, evals, skipped = [], [], {}
    start = time.perf_counter()
    pending = []
    batches = iter(stream)
    for step in range(1, self.total_steps + 1):
      state, out = self._train_step(state, self._device_batch(next(batches)), rng)
      pending.append(out)
      if step % c.log_every == 0 or step == self.total_steps:
        fetched = jax.device_get(pending)
        pending = []
        if not all(np.isfinite(o['loss']) for o in fetched):
          raise FloatingPointError(f'Non-finite training loss by step {step}: lower the lr.')
        losses.extend(float(o['loss']) for o in fetched)
        elapsed = time.perf_counter() - start
        eta = elapsed / step * (self.total_steps - step)
        _logger.info(
          'step %d/%d: loss %.4f, lr %.3g, grad norm %.3g, %.1f clips/s, ETA %.0f s',
          step,
          self.total_steps,
          losses[-1],
          fetched[-1]['learning_rate'],
          fetched[-1]['grad_norm'],
          step * c.batch_size / elapsed,
          eta,
        )
      if c.eval_every and step % c.eval_every == 0 and step < self.total_steps:
        split = self.splits.valid or self.splits.test
        name = c.dataset.valid_split or c.dataset.test_split
        value, skipped[name], n = self.evaluate(state.params, split)
        evals.append({'step': step, 'split': name, self.metric_name: value, 'clips': n})
        _logger.info('step %d: %s %s = %.4f (%d clips)', step, name, self.metric_name, value, n)
    del batches  # stops the stream's pipeline (and its workers)
    seconds = time.perf_counter() - start
    test_name = 'test' if c.dataset.name in ('esc50', 'us8k') else c.dataset.test_split
    value, skipped['test'], n = self.evaluate(state.params, self.splits.test)
    evals.append(
      {'step': self.total_steps, 'split': test_name, self.metric_name: value, 'clips': n}
    )
    _logger.info('final: %s %s = %.4f (%d clips)', test_name, self.metric_name, value, n)
    skipped['train'] = pipeline.skip_summary(stream.skipped)
    return FinetuneResult(
      steps=self.total_steps,
      train_loss=losses,
      metric_name=self.metric_name,
      metric_value=value,
      skipped=skipped,
      evals=evals,
      num_train=len(train.entries),
      num_test=len(self.splits.test.entries),
      train_passes=stream.passes + 1,
      params=jax.tree.map(np.asarray, jax.device_get(state.params)),
      seconds=seconds,
    )


def finetune(config: ConfigDict) -> FinetuneResult:
  """Fine-tunes and evaluates as `config` says (see the module docstring)."""
  return Finetuner(config).run()


def write_summary(result: FinetuneResult, config: ConfigDict, path: str, source: str) -> None:
  """Writes the run's JSON summary (result, config, checkpoint) to `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  summary = {'checkpoint': source, **result.summary(), 'config': config.to_dict()}
  with open(path, 'w') as f:
    json.dump(summary, f, indent=1)
