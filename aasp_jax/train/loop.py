"""The pre-training loop: mesh, input, state, compile, loop; resumable at any moment.

Checks   every config and workdir problem that can be found without compiling.
Mesh     devices -> ('data', 'fsdp', 'tensor'); the batch must divide the batch shards.
Input    grain, sharded by host; each host feeds its rows of the global batch. Before compiling,
         the source is opened as the pipeline opens it and must yield a usable clip.
State    restored from the newest checkpoint that reads and verifies (onto this mesh, whatever
         mesh or process count wrote it), else born sharded. The input resumes at the checkpoint's
         global batch, so a resized run continues the same global batches.
Compile  the one train step, ahead of time; its memory per device is logged.
Loop     steps, with periodic actions: metrics + progress line, profiler trace, online probe,
         checkpoints (every N steps, on SIGTERM / preemption, and at the end). Batches are read on
         a thread one step ahead; a SIGTERM while the input is starved saves and stops at once.
"""

import dataclasses
import logging
import os
import queue
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from aasp_jax import checkpointing, configuration, sharding
from aasp_jax.data import pipeline, sources
from aasp_jax.train import health, metrics_writer, objective as objective_lib
from aasp_jax.train import optimizer, state as state_lib, step as step_lib
from aasp_jax.train.preemption import PreemptionWatcher


@dataclasses.dataclass
class TrainResult:
  step: int  # the last step trained
  metrics: dict  # the last logged metrics
  state: state_lib.TrainState
  preempted: bool
  workdir: str
  # Stopped by SIGTERM while waiting for input: the input thread may still be blocked in a read,
  # so a command-line caller should end the process with os._exit once it has flushed its logs.
  input_stalled: bool = False


def check_before_compiling(config: ConfigDict, workdir: str) -> None:
  """Config and data problems that would otherwise surface after minutes of compilation."""
  configuration.validate(config)
  if not workdir:
    raise configuration.ConfigError(
      '--workdir is required: checkpoints and logs are written there.'
    )
  if not config.data.train:
    raise configuration.ConfigError(
      'config.data.train is not set: pass --config.data.train=PATH (a folder of audio, a CSV/JSONL '
      'manifest, packed shards from `aasp-data pack` or a glob of them, or a comma-separated list).'
    )
  if config.logging.log_every_steps <= 0 or config.checkpoint.every_steps <= 0:
    raise configuration.ConfigError(
      'logging.log_every_steps and checkpoint.every_steps must be positive.'
    )
  if config.probe.every_steps > 0:
    if not config.probe.tasks:
      raise configuration.ConfigError(
        'probe.every_steps > 0 needs probe.tasks: comma-separated task manifests '
        '(path,label,group), e.g. data/sonicpi/task.csv.'
      )
    for path in probe_task_paths(config):
      if not os.path.isfile(path):
        raise configuration.ConfigError(f'config.probe.tasks: {path!r} does not exist.')


def probe_task_paths(config: ConfigDict) -> list[str]:
  return [p.strip() for p in (config.probe.tasks or '').split(',') if p.strip()]


# The pre-compile data check reads clips until one is usable; a read that blocks (an unresponsive
# network mount) must not hold the start forever.
DATA_CHECK_SECONDS = 20.0


def check_data(spec: str, options: pipeline.PipelineOptions, max_seconds: float = DATA_CHECK_SECONDS):
  """(the opened source, a summary): opens the source once, as the pipeline will, and reads clips
  until one is usable. The pipeline is then built on that source, so a folder is scanned (or a
  manifest read) once per run.

  Raises a one-line ConfigError (data.DataError) naming the source and the skip reasons, also when
  a read blocks for longer than the bound.
  """
  result: dict = {}

  def check():
    try:
      source = sources.open_source(spec)
      result['summary'] = source, pipeline.check_source(source, options, max_seconds=max_seconds)
    except BaseException as e:  # re-raised on the calling thread
      result['error'] = e

  thread = threading.Thread(target=check, name='aasp-data-check', daemon=True)
  thread.start()
  thread.join(max_seconds + 10.0)
  if thread.is_alive():
    raise configuration.ConfigError(
      f'config.data.train={spec!r}: reading its first clips did not finish within '
      f'{max_seconds + 10.0:.0f} s (a blocked read: an unresponsive mount or a pipe?). Check that '
      'the files can be read on this host.'
    )
  if 'error' in result:
    raise result['error']
  return result['summary']


class _InputThread:
  """Reads host batches on a thread, up to `depth` ahead of the step, so that the loop waits for
  input with a bound and still notices a SIGTERM while the pipeline is starved."""

  def __init__(self, iterator, depth: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(
      target=self._run, args=(iterator,), name='aasp-input', daemon=True
    )
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.5)
        return True
      except queue.Full:
        continue
    return False

  def _run(self, iterator) -> None:
    try:
      for batch in iterator:
        if not self._put(('batch', batch)):
          return
      self._put(('error', RuntimeError('The training input stream ended; it should repeat.')))
    except BaseException as e:  # raised again by next() on the training thread
      self._put(('error', e))

  def next(self, stop_waiting, poll_seconds: float = 0.25, warn_seconds: float = 60.0):
    """The next host batch, or None once `stop_waiting()` is true while no batch is ready."""
    waited, warned = 0.0, 0
    while True:
      try:
        kind, value = self._queue.get(timeout=poll_seconds)
      except queue.Empty:
        if stop_waiting():
          return None
        waited += poll_seconds
        if waited >= (warned + 1) * warn_seconds:
          warned += 1
          logging.warning('no input batch for %.0f s: the input pipeline is starved.', waited)
        continue
      if kind == 'error':
        raise value
      return value

  def close(self) -> None:
    self._stop.set()


def _pipeline_options(config: ConfigDict, preset, per_host: int) -> pipeline.PipelineOptions:
  d = config.data
  return pipeline.PipelineOptions(
    preset=preset,
    batch_size=per_host,
    seed=config.seed,
    crop=d.crop,
    features=d.features,
    num_workers=d.num_workers,
    read_threads=d.read_threads,
    strict=d.strict,
    min_samples=d.min_samples,
  )


def _device_fields(features: str) -> tuple[str, ...]:
  return ('log_mel', 'num_samples') if features == 'log_mel' else ('waveform', 'num_samples')


def _batch_abstract(config: ConfigDict, options: pipeline.PipelineOptions, mesh) -> dict:
  g = config.global_batch
  shards = sharding.batch_sharding(mesh)
  if options.features == 'log_mel':
    shape = (g, options.preset.target_length, options.preset.num_mel_bins)
    fields = {'log_mel': (shape, np.float32)}
  else:
    fields = {'waveform': ((g, options.num_samples), np.float32)}
  fields['num_samples'] = ((g,), np.int32)
  return {
    k: jax.ShapeDtypeStruct(
      s, d, sharding=jax.sharding.NamedSharding(mesh, jax.P(shards.spec[0], *[None] * (len(s) - 1)))
    )
    for k, (s, d) in fields.items()
  }


class _Progress:
  """Averages the step metrics of one logging interval and prints the progress line."""

  def __init__(self, total_steps: int, global_batch: int, start_step: int):
    self.total, self.batch = total_steps, global_batch
    self.pending: list[dict] = []
    self.skipped = np.zeros(len(pipeline.clips.SKIP_REASONS), np.int64)
    self._t0, self._step0 = time.perf_counter(), start_step

  def summarise(self, step: int) -> dict:
    host = jax.device_get(self.pending)
    scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    now = time.perf_counter()
    steps_per_s = (step - self._step0) / max(now - self._t0, 1e-9)
    scalars['clips_per_s'] = steps_per_s * self.batch
    scalars['steps_per_s'] = steps_per_s
    # Clips skipped by the input pipeline since the start of the run, summed over all hosts.
    for reason, n in pipeline.skip_summary(self.total_skipped()).items():
      scalars[f'skipped/{reason}'] = float(n)
    self.pending, self._t0, self._step0 = [], now, step
    return scalars

  def total_skipped(self) -> np.ndarray:
    """This run's skipped clips per reason, summed over all hosts (a collective)."""
    if jax.process_count() == 1:
      return self.skipped.copy()
    return multihost_utils.process_allgather(self.skipped).reshape(-1, len(self.skipped)).sum(0)

  def line(self, step: int, s: dict) -> str:
    eta = (self.total - step) / max(s['steps_per_s'], 1e-9)
    terms = ' '.join(
      f'{k.removesuffix("_loss")} {s[k]:.4f}' for k in metrics_writer.LOSS_KEYS if k in s
    )
    skipped = int(sum(v for k, v in s.items() if k.startswith('skipped/')))
    return (
      f'step {step}/{self.total} | {s["clips_per_s"]:.1f} clips/s | '
      f'ETA {time.strftime("%H:%M:%S", time.gmtime(eta))} | {terms} | lr {s["learning_rate"]:.2e}'
      + (f' | {skipped} clips skipped' if skipped else '')
    )


def _encoder_params_on_host(state) -> dict:
  """The student encoder, gathered to every host (a collective: all processes must call it)."""
  params = state.params['encoder']
  if jax.process_count() == 1:
    return jax.device_get(params)
  return multihost_utils.process_allgather(params, tiled=True)


def _online_probe(config, objective, state, writer, step, tasks) -> None:
  """The shared probe protocol (`evaluate.protocol`) on the student encoder: the headline
  feature's linear and kNN accuracy per task, logged as probe/<task>/{linear,knn}."""
  from aasp_jax.evaluate import protocol

  params = _encoder_params_on_host(state)
  if jax.process_index() != 0:
    return
  values = {}
  for task in tasks:
    scores = protocol.score_encoder(
      task,
      objective.encoder,
      params,
      objective.preset,
      names=[protocol.HEADLINE_FEATURE],
      batch_size=config.probe.batch_size,
    )[protocol.HEADLINE_FEATURE]
    for classifier, score in scores.items():
      values[f'probe/{task.name}/{classifier}'] = score.accuracy
  logging.info(
    'step %d: online probe %s', step, ', '.join(f'{k} {v:.4f}' for k, v in values.items())
  )
  writer.write(step, values)


def _data_position(step: int, config: ConfigDict, skipped_totals: np.ndarray) -> dict:
  """The input's place in the global stream, independent of the number of processes: one global
  batch per step, and the clips skipped so far (summed over all hosts)."""
  return {
    'global_batches': int(step),
    'global_batch': int(config.global_batch),
    'skipped': pipeline.skip_summary(skipped_totals),
  }


def train(config: ConfigDict, workdir: str) -> TrainResult:
  """Pre-trains (or resumes) in `workdir` until config.total_steps or a preemption."""
  # ---------------------------------------------------------------- Checks
  check_before_compiling(config, workdir)
  # Installed first: a SIGTERM during restore or compilation is honoured after the first step.
  preemption = PreemptionWatcher()
  checkpoints = None
  try:
    checkpoints = checkpointing.RunCheckpoints(workdir, config.checkpoint)
    return _train(config, workdir, preemption, checkpoints)
  finally:
    # Whatever happened, the checkpoint being written is completed before the process exits.
    if checkpoints is not None:
      checkpoints.wait_until_finished()
      checkpoints.close()
    preemption.close()


def _train(config, workdir, preemption, checkpoints) -> TrainResult:
  latest = checkpoints.latest_step()
  checkpoints.check_resumable(config)  # before compiling: another run's workdir is refused

  # ---------------------------------------------------------------- Mesh
  try:
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(config.global_batch, mesh)
    per_host = pipeline.per_host_batch_size(config.global_batch)
  except ValueError as e:  # the mesh does not fit the devices, or the batch does not fit the mesh
    raise configuration.ConfigError(str(e)) from e
  rules = config.logical_axis_rules
  logging.info(
    'mesh %s over %d devices (%d processes); global batch %d',
    dict(mesh.shape),
    mesh.size,
    jax.process_count(),
    config.global_batch,
  )
  objective = objective_lib.AaSPObjective.from_config(config)
  tx, schedule = optimizer.make_optimizer(config.optimizer, config.global_batch, config.total_steps)
  abstract, shardings = state_lib.state_shardings(objective, tx, mesh, rules)
  options = _pipeline_options(config, objective.preset, per_host)
  source, summary = check_data(config.data.train, options)
  logging.info('data %s: %s', config.data.train, summary)

  # ---------------------------------------------------------------- State
  init_rng, rng = jax.random.split(jax.random.key(config.seed))
  skipped_before = np.zeros(len(pipeline.clips.SKIP_REASONS), np.int64)
  restored = checkpoints.restore_latest(abstract, shardings)
  if restored is None:
    state = state_lib.init_state(objective, tx, init_rng, mesh, rules)
    start_batch = 0
  else:
    if restored.step != latest:  # fell back past damaged checkpoints: check the one restored
      checkpointing.check_resumable(
        checkpoints.saved_config(restored.step), config, checkpoints.directory
      )
    state, rng = restored.state, restored.rng
    position = restored.data_position
    # Checkpoints from before the data position was recorded: one global batch per step.
    start_batch = restored.step if position is None else int(position['global_batches'])
    if position is not None and jax.process_index() == 0:  # the totals of all hosts, counted once
      skipped_before = np.asarray(
        [position['skipped'].get(r, 0) for r in pipeline.clips.SKIP_REASONS], np.int64
      )
  start = int(jax.device_get(state.step))

  # ---------------------------------------------------------------- Input
  data_iterator = iter(pipeline.make_dataset(source, options, start_batch=start_batch))
  batch_abstract = _batch_abstract(config, options, mesh)
  fields = tuple(batch_abstract)
  batch_sharding = sharding.batch_sharding(mesh)

  # ---------------------------------------------------------------- Compile
  t0 = time.perf_counter()
  compiled, _ = step_lib.compile_step(
    objective, tx, schedule, config.optimizer, mesh, rules, shardings, batch_abstract
  )
  logging.info('train step compiled in %.1f s', time.perf_counter() - t0)

  # ---------------------------------------------------------------- Loop
  probe_tasks = []
  if config.probe.every_steps > 0 and jax.process_index() == 0:
    from aasp_jax.evaluate import protocol

    probe_tasks = [protocol.ProbeTask.from_manifest(p) for p in probe_task_paths(config)]
  # Metrics logged after the restored step (by the run that wrote a newer, now set-aside,
  # checkpoint, or that was killed) are dropped: those steps are trained again.
  writer = metrics_writer.MetricsWriter(
    workdir, resume_step=restored.step if restored is not None else None
  )
  progress = _Progress(config.total_steps, config.global_batch, start)
  progress.skipped += skipped_before
  log_cfg = config.logging
  profile_dir = os.path.join(workdir, 'profile')
  last_saved = restored.step if restored is not None else None
  metrics, step, preempted, stalled = {}, start, False, False
  inputs = _InputThread(data_iterator)

  def save(step):
    position = _data_position(step, config, progress.total_skipped())
    checkpoints.save(step, state, rng, position, config)

  try:
    while step < config.total_steps:
      if step == log_cfg.profile_start_step and jax.process_index() == 0:
        jax.profiler.start_trace(profile_dir)
      host_batch = inputs.next(lambda: preemption.signalled)
      if host_batch is None:  # SIGTERM while waiting for input
        stalled = preempted = True
        if last_saved != step:
          save(step)
          last_saved = step
        logging.warning(
          'SIGTERM while waiting for input at step %d: checkpoint saved; rerun the same command '
          'to resume.',
          step,
        )
        break
      progress.skipped += host_batch['skipped']
      batch = pipeline.to_global_arrays({k: host_batch[k] for k in fields}, batch_sharding)
      state, step_metrics = compiled(state, batch, rng)
      step += 1
      progress.pending.append(step_metrics)
      profile_end = log_cfg.profile_start_step + log_cfg.profile_num_steps
      if log_cfg.profile_start_step >= 0 and step == profile_end and jax.process_index() == 0:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        logging.info(
          'profiler trace of steps %d..%d in %s',
          step - log_cfg.profile_num_steps,
          step - 1,
          profile_dir,
        )
      if step % log_cfg.log_every_steps == 0 or step == config.total_steps:
        metrics = progress.summarise(step)
        health.check_metrics(metrics, step, config.objective)
        writer.write(step, metrics)
        if jax.process_index() == 0:
          logging.info(progress.line(step, metrics))
      if config.probe.every_steps > 0 and step % config.probe.every_steps == 0:
        _online_probe(config, objective, state, writer, step, probe_tasks)
      preempted = preemption.reached(step)
      if preempted or step % config.checkpoint.every_steps == 0 or step == config.total_steps:
        save(step)
        last_saved = step
      if preempted:
        logging.warning(
          'Preemption notice (SIGTERM) at step %d: checkpoint saved; rerun the same command to '
          'resume.',
          step,
        )
        break
  finally:
    inputs.close()
    checkpoints.wait_until_finished()
    writer.close()
  logging.info('stopped at step %d; latest checkpoint: step %s', step, last_saved)
  return TrainResult(step, metrics, state, preempted, workdir, input_stalled=stalled)
