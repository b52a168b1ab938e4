"""Fine-tuning a pre-trained encoder on a labelled downstream task (EAT-style recipes).

  from aasp_jax.finetune import cli, trainer
  config = cli.parse_config([
      'aasp-finetune', '--config=configs/finetune/esc50.py:test_fold=1',
      '--config.dataset.root=/data/ESC-50-master', '--config.init_checkpoint=runs/pretrain',
      '--config.workdir=runs/ft_esc50'])
  result = trainer.finetune(config)   # FinetuneResult: losses, 'accuracy' or 'mAP', skipped clips

What happens:
- The encoder (architecture, front end, weights) comes from a pre-training checkpoint via
  `pretrained.load_pretrained` (the EMA teacher by default), rebuilt with stochastic depth; a linear
  head on the CLS token (initialised near zero, as MAE / Audio-MAE) maps it to the classes. Only
  the input length changes (`target_length`): fixed sin-cos positions are cropped to it (a learned
  table from an import is cropped too, and must cover it) and AaPE's Lambda encoder pools its
  modulation spectrum into fixed bands.
- Audio is read by the training input pipeline (`data.py`, `data/pipeline.py`: random crops for
  training, crops from the start for evaluation, multi-hot labels from the class names); log-mel is
  computed on device. Training reads the set in passes (epochs), each reshuffled (or, with a
  balanced sampler, redrawn with inverse label-frequency weights); clips the pipeline cannot use
  are counted per reason and reported.
- One jitted train step (`step.py`), data-parallel over the local devices of one process:
  parameters replicated, the batch split along 'data' (NamedSharding).
- Checkpoints (`checkpoint.py`, through `checkpointing.RunCheckpoints`): at every evaluation, every
  `checkpoint.every_steps`, on SIGTERM and at the end, into `<workdir>/checkpoints`. A run started
  again with the same workdir resumes from the newest one that verifies (the config must match on
  `RESUME_KEYS`); a finished run is only evaluated again. Metrics go to `<workdir>/metrics.jsonl`
  and TensorBoard (`train/metrics_writer.py`).
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

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from aasp_jax import checkpointing, configuration
from aasp_jax import sharding as sharding_lib
from aasp_jax.audio import presets as presets_lib
from aasp_jax.data import clips, pipeline, sources
from aasp_jax.evaluate import datasets, embeddings, metrics, pretrained
from aasp_jax.finetune import checkpoint
from aasp_jax.finetune import data as data_lib
from aasp_jax.finetune import step as step_lib
from aasp_jax.models import build
from aasp_jax.train import metrics_writer
from aasp_jax.train.preemption import PreemptionWatcher

_logger = logging.getLogger(__name__)

# Config keys that must match the checkpoint for a restart to continue the same run (the others:
# logging, evaluation and checkpoint cadence, devices and workers, may change).
RESUME_KEYS = (
  'init_checkpoint',
  'init_step',
  'which',
  'dataset',
  'target_length',
  'batch_size',
  'epochs',
  'steps',
  'optimizer',
  'mixup',
  'specaug',
  'token_mask_ratio',
  'drop_path',
  'balanced_sampler',
  'seed',
)

# ---------------------------------------------------------------- Checks (before anything is read)


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
  if config.balanced_sampler not in data_lib.SAMPLERS:
    raise err(
      f'balanced_sampler={config.balanced_sampler!r}; choose one of {list(data_lib.SAMPLERS)}.'
    )
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
  if config.checkpoint.every_steps < 0 or config.checkpoint.keep <= 0:
    raise err('checkpoint.every_steps must be >= 0 and checkpoint.keep positive.')
  if not config.workdir:
    raise err('workdir is required: the checkpoints, metrics and summary are written there.')


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


# ---------------------------------------------------------------- The run


@dataclasses.dataclass
class FinetuneResult:
  """What a run did and scored.

  Attributes:
    steps: the step the run reached: its total steps (the final evaluation's), unless preempted.
    train_loss: the training loss of every step this invocation trained (after augmentation);
      after a resume, from the restored step on (metrics.jsonl holds the whole run).
    metric_name: 'accuracy' (single-label) or 'mAP' (multi-label).
    metric_value: the metric on the test split / fold after the last step (NaN if preempted).
    skipped: {'train': {reason: n}, 'test': ..., 'valid': ...}; 'train' counts skip events in the
      training stream (a clip is counted once per pass over the data), the others count clips.
    evals: [{'step', 'split', metric_name, 'clips'}] of this invocation's evaluations, the final
      one last.
    num_train / num_test: clips in the training and test sets (before skipping).
    train_passes: passes over the training set started.
    params: the fine-tuned {'encoder', 'head'} parameters (host numpy).
    seconds: wall time of the training loop (compilation included).
    start_step: the step this invocation started from (0, or the restored checkpoint's).
    checkpoint_step: the step of the last checkpoint written or restored.
    preempted: stopped by SIGTERM after saving a checkpoint; rerun the command to go on.
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
  start_step: int = 0
  checkpoint_step: int | None = None
  preempted: bool = False

  def summary(self) -> dict:
    """JSON-serialisable summary (everything except the parameters)."""
    out = dataclasses.asdict(self)
    del out['params']
    return out


class Finetuner:
  """Everything a run needs, built (and checked) before anything compiles; `run()` trains (or
  resumes) and evaluates. `run()` may be called again: it resumes from the workdir."""

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
    self.splits = data_lib.load_splits(config.dataset)
    self.multilabel = self.splits.multilabel
    self.metric_name = 'mAP' if self.multilabel else 'accuracy'
    encoder = build.build_encoder(model_cfg, drop_path=config.drop_path)
    self.model = step_lib.Classifier(encoder, len(self.splits.class_names))
    num_train = len(self.splits.train.entries)
    self.total_steps = config.steps or max(
      1, math.ceil(config.epochs * num_train / config.batch_size)
    )
    self.classifier_item = checkpoint.classifier_item(
      self.splits.class_names,
      self.multilabel,
      model_cfg,
      self.preset,
      {
        'checkpoint': self.pretrained.source,
        'which': config.which,
        'step': self.pretrained.step,
        'origin': self.pretrained.origin,
      },
      data=f'{config.dataset.name} ({os.path.basename(os.path.normpath(config.dataset.root))})',
    )

    # ---------------------------------------------------------------- Mesh
    # The batch is split over 'data' (x 'fsdp' = 1); parameters are replicated.
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
    self.replicated = replicated = NamedSharding(self.mesh, P())

    # ---------------------------------------------------------------- State
    head = step_lib.ClsHead(len(self.splits.class_names)).init(
      jax.random.fold_in(jax.random.key(config.seed), 0),
      jnp.zeros((1, model_cfg.width), jnp.float32),
    )['params']
    self.initial_params = {
      'encoder': self.pretrained.params,
      'head': jax.tree.map(np.asarray, head),
    }
    self.tx, self.schedule = step_lib.make_optimizer(
      config.optimizer, self.initial_params, self.depth, self.total_steps
    )
    self._init_state = jax.jit(
      lambda p: step_lib.FinetuneState(jnp.zeros((), jnp.int32), p, self.tx.init(p)),
      out_shardings=replicated,
    )

    # ---------------------------------------------------------------- Step
    def batch_shardings(keys):
      return {k: self.batch_sharding for k in keys}

    self._train_step = jax.jit(
      lambda state, batch, rng: step_lib.train_step(
        state,
        batch,
        rng,
        model=self.model,
        preset=self.preset,
        tx=self.tx,
        schedule=self.schedule,
        aug=step_lib.Augmentation.from_config(config),
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
      lambda params, batch: step_lib.eval_step(
        params, batch, model=self.model, preset=self.preset, multilabel=self.multilabel
      ),
      in_shardings=(replicated, batch_shardings(('waveform', 'num_samples'))),
      out_shardings=replicated,
    )

  def initial_state(self) -> step_lib.FinetuneState:
    """Step 0: the checkpoint's encoder, the new head and fresh optimizer moments (replicated)."""
    return self._init_state(jax.device_put(self.initial_params, self.replicated))

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
    """Trains from step 0 or the newest checkpoint in the workdir, then evaluates on the test set.

    A SIGTERM saves a checkpoint after the current step and returns (`preempted`) without the
    final evaluation; every checkpoint save is complete when this returns.
    """
    preemption = PreemptionWatcher()
    checkpoints = None
    try:
      checkpoints = checkpointing.RunCheckpoints(
        self.config.workdir, self.config.checkpoint, json_items=(checkpoint.CLASSIFIER,)
      )
      return self._run(preemption, checkpoints)
    finally:
      if checkpoints is not None:
        checkpoints.wait_until_finished()
        checkpoints.close()
      preemption.close()

  def _restore(self, checkpoints: checkpointing.RunCheckpoints):
    """(state, base rng, data position or None, restored step or None)."""
    checkpoints.check_resumable(self.config, RESUME_KEYS)
    abstract = jax.eval_shape(self._init_state, self.initial_params)
    shardings = jax.tree.map(lambda _: self.replicated, abstract)
    restored = checkpoints.restore_latest(abstract, shardings)
    if restored is None:
      return self.initial_state(), jax.random.key(self.config.seed), None, None
    _logger.info('resuming fine-tuning from step %d of %s', restored.step, checkpoints.directory)
    return restored.state, restored.rng, restored.data_position, restored.step

  def _run(self, preemption: PreemptionWatcher, checkpoints) -> FinetuneResult:
    c = self.config
    train = self.splits.train
    state, rng, position, restored_step = self._restore(checkpoints)
    rng = jax.device_put(rng, self.replicated)
    start_step = int(jax.device_get(state.step))

    # ---------------------------------------------------------------- Input
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
      weights = data_lib.sampling_weights(train.entries, train.class_names, c.balanced_sampler)
    stream = data_lib.TrainStream(train.entries, options, weights, position=position)

    # ---------------------------------------------------------------- Loop
    writer = metrics_writer.MetricsWriter(c.workdir, resume_step=restored_step)
    losses, evals, skipped, pending = [], [], {}, []
    last_saved, preempted, step = restored_step, False, start_step
    start = time.perf_counter()

    def save(step):
      position = {'step': step, **stream.position()}
      items = {checkpoint.CLASSIFIER: self.classifier_item}
      checkpoints.save(step, state, rng, position, c, items=items)

    batches = iter(stream)
    try:
      try:
        while step < self.total_steps:
          state, out = self._train_step(state, self._device_batch(next(batches)), rng)
          step += 1
          pending.append(out)
          if step % c.log_every == 0 or step == self.total_steps:
            fetched = jax.device_get(pending)
            pending = []
            if not all(np.isfinite(o['loss']) for o in fetched):
              raise FloatingPointError(f'Non-finite training loss by step {step}: lower the lr.')
            losses.extend(float(o['loss']) for o in fetched)
            elapsed = time.perf_counter() - start
            clips_per_s = (step - start_step) * c.batch_size / elapsed
            writer.write(
              step,
              {
                'loss': np.mean([o['loss'] for o in fetched]),
                'learning_rate': fetched[-1]['learning_rate'],
                'grad_norm': fetched[-1]['grad_norm'],
                'clips_per_s': clips_per_s,
              },
            )
            _logger.info(
              'step %d/%d: loss %.4f, lr %.3g, grad norm %.3g, %.1f clips/s, ETA %.0f s',
              step,
              self.total_steps,
              losses[-1],
              fetched[-1]['learning_rate'],
              fetched[-1]['grad_norm'],
              clips_per_s,
              elapsed / (step - start_step) * (self.total_steps - step),
            )
          evaluate = c.eval_every and step % c.eval_every == 0 and step < self.total_steps
          if evaluate:
            split = self.splits.valid or self.splits.test
            name = c.dataset.valid_split or c.dataset.test_split
            value, skipped[name], n = self.evaluate(state.params, split)
            evals.append({'step': step, 'split': name, self.metric_name: value, 'clips': n})
            writer.write(step, {f'{name}/{self.metric_name}': value})
            _logger.info('step %d: %s %s = %.4f (%d clips)', step, name, self.metric_name, value, n)
          preempted = preemption.reached(step)
          every = c.checkpoint.every_steps
          if preempted or evaluate or step == self.total_steps or (every and step % every == 0):
            save(step)
            last_saved = step
          if preempted:
            _logger.warning(
              'SIGTERM at step %d: checkpoint saved; rerun the same command to resume.', step
            )
            break
      finally:
        del batches  # stops the stream's pipeline (and its workers)
      seconds = time.perf_counter() - start
      skipped['train'] = pipeline.skip_summary(stream.skipped)
      value = float('nan')
      test_name = 'test' if c.dataset.name in ('esc50', 'us8k') else c.dataset.test_split
      if not preempted:
        value, skipped['test'], n = self.evaluate(state.params, self.splits.test)
        evals.append({'step': step, 'split': test_name, self.metric_name: value, 'clips': n})
        writer.write(step, {f'{test_name}/{self.metric_name}': value})
        _logger.info('final: %s %s = %.4f (%d clips)', test_name, self.metric_name, value, n)
    finally:
      writer.close()
    return FinetuneResult(
      steps=step,
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
      start_step=start_step,
      checkpoint_step=last_saved,
      preempted=preempted,
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
