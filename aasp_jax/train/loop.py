"""The pre-training loop: mesh, input, state, compile, loop; resumable at any moment.

Checks   every config and workdir problem that can be found without compiling.
Mesh     devices -> ('data', 'fsdp', 'tensor'); the batch must divide the batch shards.
Input    grain, sharded by host; each host feeds its rows of the global batch.
State    restored from the latest complete checkpoint in the workdir, else born sharded.
Compile  the one train step, ahead of time; its memory per device is logged.
Loop     steps, with periodic actions: metrics + progress line, profiler trace, online probe,
         checkpoints (every N steps, on SIGTERM / preemption, and at the end).
"""

import dataclasses
import logging
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from aasp_jax import checkpointing, configuration, sharding
from aasp_jax.data import pipeline
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


def check_before_compiling(config: ConfigDict, workdir: str) -> None:
  """Config and data problems that would otherwise surface after minutes of compilation."""
  configuration.validate(config)
  if not workdir:
    raise configuration.ConfigError(
      '--workdir is required: checkpoints and logs are written there.'
    )
  data = config.data.train
  if not data:
    raise configuration.ConfigError(
      'config.data.train is not set: pass --config.data.train=PATH (a folder of audio, a CSV/JSONL '
      'manifest, or packed shards from `aasp-data pack`).'
    )
  if '://' not in data and not _local_data_exists(data):
    raise configuration.ConfigError(
      f'config.data.train={data!r} does not exist (no such folder, manifest or shard files). '
      'Check the path; relative paths are relative to the current directory.'
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


def _local_data_exists(spec: str) -> bool:
  import glob

  return os.path.exists(spec) or bool(glob.glob(spec)) or bool(glob.glob(spec + '*'))


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
    # Clips skipped by the input pipeline since the start (or resume), summed over all hosts.
    totals = multihost_utils.process_allgather(self.skipped).reshape(-1, len(self.skipped)).sum(0)
    for reason, n in pipeline.skip_summary(totals).items():
      scalars[f'skipped/{reason}'] = float(n)
    self.pending, self._t0, self._step0 = [], now, step
    return scalars

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


def train(config: ConfigDict, workdir: str) -> TrainResult:
  """Pre-trains (or resumes) in `workdir` until config.total_steps or a preemption."""
  # ---------------------------------------------------------------- Checks
  check_before_compiling(config, workdir)
  # Installed first: a SIGTERM during restore or compilation is honoured after the first step.
  preemption = PreemptionWatcher()
  checkpoints = checkpointing.RunCheckpoints(workdir, config.checkpoint)
  latest = checkpoints.latest_step()
  if latest is not None:
    checkpointing.check_resumable(checkpoints.saved_config(latest), config, checkpoints.directory)

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

  # ---------------------------------------------------------------- Input
  options = _pipeline_options(config, objective.preset, per_host)
  data_iterator = iter(pipeline.make_dataset(config.data.train, options))
  batch_abstract = _batch_abstract(config, options, mesh)
  fields = tuple(batch_abstract)
  batch_sharding = sharding.batch_sharding(mesh)

  # ---------------------------------------------------------------- State
  init_rng, rng = jax.random.split(jax.random.key(config.seed))
  if latest is None:
    state = state_lib.init_state(objective, tx, init_rng, mesh, rules)
  else:
    state, rng = checkpoints.restore(latest, abstract, shardings, data_iterator)
  start = int(jax.device_get(state.step))

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
  writer = metrics_writer.MetricsWriter(workdir, resume_step=latest)
  progress = _Progress(config.total_steps, config.global_batch, start)
  log_cfg = config.logging
  profile_dir = os.path.join(workdir, 'profile')
  last_saved = latest
  metrics, step, preempted = {}, start, False
  try:
    while step < config.total_steps:
      if step == log_cfg.profile_start_step and jax.process_index() == 0:
        jax.profiler.start_trace(profile_dir)
      host_batch = next(data_iterator)
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
        checkpoints.save(step, state, rng, data_iterator, config)
        last_saved = step
      if preempted:
        logging.warning(
          'Preemption notice (SIGTERM) at step %d: checkpoint saved; rerun the same command to '
          'resume.',
          step,
        )
        break
  finally:
    # Whatever happened, the checkpoint being written is completed before the process exits.
    checkpoints.wait_until_finished()
    checkpoints.close()
    writer.close()
    preemption.close()
  logging.info('stopped at step %d; latest checkpoint: step %s', step, last_saved)
  return TrainResult(step, metrics, state, preempted, workdir)
