"""Ahead-of-time compilation of the real train step for a TPU slice, on any host (a CPU one too).

`compile_for_topology(cfg, 'v5p:4x4x4')` builds the slice's devices from libtpu's topology
description (no TPU needed), lays the config's mesh over them, and compiles the same jitted step the
trainer runs (`step.compile_step`: same shardings, donation and batch). XLA's memory analysis of
that executable is what one chip needs, so a config that does not fit is found before a slice is
booked. The step's FLOPs are counted from its jaxpr (`flops.jaxpr_flops`): XLA's cost analysis
counts a scanned block once, not `depth` times.

  aasp-pretrain --config=configs/pretrain_large.py --workdir=/tmp/aot --compile_only \
      --topology=v5p:4x4x4 --config.global_batch=512

Compiling for a TPU needs libtpu (`pip install -e '.[tpu]'`); `compile_for_local_devices(cfg)`
gives the same report for the devices this process sees.
"""

import dataclasses
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from aasp_jax import sharding
from aasp_jax.configuration import ConfigError
from aasp_jax.train import flops as flops_lib
from aasp_jax.train import objective as objective_lib
from aasp_jax.train import optimizer
from aasp_jax.train import state as state_lib
from aasp_jax.train import step as step_lib

GIB = 2**30

# HBM per chip by the device kind the devices report (a topology's compile-only devices report the
# same kind as the real chips). Nominal capacities: XLA:TPU keeps a little back (it allows 15.75 of
# v5e's 16 GiB) and fails the compile of a step over its own limit, raised as HbmOverflowError.
CHIP_HBM_BYTES = {
  'TPU v4': 32 * GIB,
  'TPU v5 lite': 16 * GIB,  # v5e
  'TPU v5': 95 * GIB,  # v5p
  'TPU v6 lite': 32 * GIB,  # v6e (Trillium)
}

# Generation prefixes libtpu accepts in a topology name ('<prefix>:<chips>', e.g. 'v5p:4x4x4' or
# 'v5e:16x16'), and the device kind each gives. 'v5litepod' is the Cloud name of v5e, but libtpu
# rejects it, so it is not offered.
TOPOLOGY_PREFIXES = {
  'v4': 'TPU v4',
  'v5p': 'TPU v5',
  'v5': 'TPU v5',
  'v5e': 'TPU v5 lite',
  'v6e': 'TPU v6 lite',
}

# v4 exposes each of its two TensorCores as a device unless asked for megacore, which is how JAX
# runs on a v4 VM (one device per chip); v5p is megacore by default, v5e/v6e have one core a chip.
CHIP_CONFIG_NAME = {'v4': 'megacore'}

INSTALL_HINT = "pip install -e '.[tpu]'"


class HbmOverflowError(ConfigError):
  """XLA could not fit the step into one chip's memory (XLA:TPU checks this while compiling)."""


@dataclasses.dataclass(frozen=True)
class AotReport:
  """What one chip needs for one train step, from XLA's analyses of the compiled step.

  Byte counts are per chip (per device). `flops_per_chip` is the step's matmul and convolution
  FLOPs (counted from its jaxpr, scanned blocks `depth` times) divided evenly over the chips:
  sharding splits the work, it does not add any (`flops_global` multiplies it back).
  """

  topology: str  # the topology name, or 'local (<platform>)'
  chip_kind: str  # device_kind, e.g. 'TPU v5'
  num_chips: int
  mesh_shape: dict = dataclasses.field(hash=False)  # {'data': .., 'fsdp': .., 'tensor': ..}
  global_batch: int
  argument_bytes: int  # state + batch + rng shards the step reads
  output_bytes: int  # new state + metrics
  temp_bytes: int  # activations, gradients and other buffers live inside the step
  alias_bytes: int  # outputs written in place of donated arguments (counted once)
  generated_code_bytes: int  # the executable itself, resident in HBM on TPU
  peak_bytes: int  # what the chip needs at once: see peak_bytes()
  hbm_bytes: int | None  # per chip; None where unknown (a CPU host)
  fits: bool | None  # peak_bytes <= hbm_bytes; None where hbm_bytes is unknown
  flops_per_chip: float
  compile_seconds: float

  @property
  def flops_global(self) -> float:
    return self.flops_per_chip * self.num_chips

  @property
  def batch_per_chip(self) -> float:
    return self.global_batch / self.num_chips


def peak_bytes(memory) -> int:
  """Bytes a device holds at once: arguments, outputs and temporaries are live together, donated
  arguments share their buffer with an output (subtract the alias), and on TPU the executable's
  code is loaded into HBM too. (XLA's own `peak_memory_in_bytes` reads below the temporaries alone
  for TPU executables, so this conservative sum is used.)"""
  return int(
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.temp_size_in_bytes
    + memory.generated_code_size_in_bytes
  )


def batch_abstract(cfg: ConfigDict, preset) -> dict:
  """The global batch the trainer feeds the step, as shapes: waveforms of exactly target_length
  frames (log-mel on device), or host log-mel when config.data.features == 'log_mel'."""
  g = cfg.global_batch
  if cfg.data.features == 'log_mel':
    fields = {
      'log_mel': jax.ShapeDtypeStruct((g, preset.target_length, preset.num_mel_bins), jnp.float32)
    }
  else:
    samples = preset.window_length + (preset.target_length - 1) * preset.frame_shift
    fields = {'waveform': jax.ShapeDtypeStruct((g, samples), jnp.float32)}
  fields['num_samples'] = jax.ShapeDtypeStruct((g,), jnp.int32)
  return fields


def topology_devices(topology_name: str) -> list:
  """Compile-only devices of a TPU slice, e.g. 'v5p:4x4x4' (64 chips) or 'v5e:16x16' (256)."""
  prefix, sep, _ = topology_name.partition(':')
  if not sep or prefix not in TOPOLOGY_PREFIXES:
    raise ConfigError(
      f'Unknown TPU topology {topology_name!r}; use <generation>:<chips per axis> with a '
      f'generation in {sorted(TOPOLOGY_PREFIXES)}, e.g. v5p:4x4x4 (64 chips) or v5e:16x16 (256).'
    )
  _require_libtpu()
  # libtpu allows one process per host, to guard the chips, via /tmp/libtpu_lockfile. Compile-only
  # devices never touch a chip, so the lock only makes a second compile on the host (or the tests
  # beside a running benchmark) fail with 'Internal error when accessing libtpu multi-process
  # lockfile'. libtpu reads this when it creates the topology; an explicit setting is kept.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies

  kwargs = {}
  if prefix in CHIP_CONFIG_NAME:
    kwargs['chip_config_name'] = CHIP_CONFIG_NAME[prefix]
  try:
    return list(topologies.get_topology_desc(topology_name, 'tpu', **kwargs).devices)
  except RuntimeError as e:  # JaxRuntimeError (a bad shape) and "TPU support not installed"
    if 'not installed' in str(e):
      raise ConfigError(f'Compiling for {topology_name!r} needs libtpu: {INSTALL_HINT}.') from e
    raise ConfigError(f'libtpu rejected the topology {topology_name!r}: {e}') from e


def _require_libtpu() -> None:
  # jax reports a missing libtpu only deep inside topology creation; say how to install it first.
  if importlib.util.find_spec('libtpu') is None and not os.environ.get('TPU_LIBRARY_PATH'):
    raise ConfigError(
      f'Compiling for a TPU topology needs libtpu, which is not installed: {INSTALL_HINT}.'
    )


def compile_for_devices(
  cfg: ConfigDict, devices, topology: str, hbm_bytes: int | None
) -> AotReport:
  """Compiles the real train step for `cfg` over `devices` and reports what one device needs."""
  rules = cfg.logical_axis_rules
  objective = objective_lib.AaSPObjective.from_config(cfg)
  tx, schedule = optimizer.make_optimizer(cfg.optimizer, cfg.global_batch, cfg.total_steps)
  try:  # a mesh the batch or a parameter does not divide fails here, before any tracing
    mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.check_batch(cfg.global_batch, mesh)
    _, shardings = state_lib.state_shardings(objective, tx, mesh, rules)
  except ValueError as e:  # the trainer's CLI reports ConfigErrors without a traceback
    raise ConfigError(f'{topology}: {e}') from e
  batch = batch_abstract(cfg, objective.preset)
  start = time.perf_counter()
  traced = step_lib.trace_step(
    objective, tx, schedule, cfg.optimizer, mesh, rules, shardings, batch
  )
  step_flops = flops_lib.jaxpr_flops(traced.jaxpr)
  try:
    _, memory = step_lib.compile_traced(traced, mesh, rules)
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    xla = str(e).strip().splitlines()[0]
    raise HbmOverflowError(
      f'{topology}: the train step does not fit one chip (global batch {cfg.global_batch}, mesh '
      f'{dict(mesh.shape)}). XLA: {xla} Shard the state over more chips (mesh.fsdp=-1), '
      'rematerialise blocks (model.remat=True) or lower global_batch.'
    ) from e
  seconds = time.perf_counter() - start
  if memory is None:
    raise RuntimeError(f'XLA gives no memory analysis for {devices[0].platform} executables.')
  peak = peak_bytes(memory)
  return AotReport(
    topology=topology,
    chip_kind=devices[0].device_kind,
    num_chips=len(devices),
    mesh_shape=dict(mesh.shape),
    global_batch=cfg.global_batch,
    argument_bytes=int(memory.argument_size_in_bytes),
    output_bytes=int(memory.output_size_in_bytes),
    temp_bytes=int(memory.temp_size_in_bytes),
    alias_bytes=int(memory.alias_size_in_bytes),
    generated_code_bytes=int(memory.generated_code_size_in_bytes),
    peak_bytes=peak,
    hbm_bytes=hbm_bytes,
    fits=None if hbm_bytes is None else peak <= hbm_bytes,
    flops_per_chip=step_flops / len(devices),
    compile_seconds=seconds,
  )


def compile_for_topology(cfg: ConfigDict, topology_name: str) -> AotReport:
  """Compiles the real train step for a TPU slice from this host (needs libtpu, not a TPU).

  Raises ConfigError for an unknown topology, a missing libtpu or a batch that does not divide the
  mesh, and HbmOverflowError (a ConfigError) with XLA's message when the step does not fit a chip.
  """
  devices = topology_devices(topology_name)
  kind = devices[0].device_kind
  return compile_for_devices(cfg, devices, topology_name, CHIP_HBM_BYTES.get(kind))


def compile_for_local_devices(cfg: ConfigDict) -> AotReport:
  """The same report for the devices this process sees (`--compile_only` without `--topology`)."""
  devices = jax.devices()
  return compile_for_devices(
    cfg, devices, f'local ({devices[0].platform})', device_memory_bytes(devices[0])
  )


def device_memory_bytes(device) -> int | None:
  """A real accelerator's usable memory (its allocator limit), else the chip table, else None."""
  stats = device.memory_stats()  # None on CPU
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  return CHIP_HBM_BYTES.get(device.device_kind)


def format_report(report: AotReport) -> str:
  """A human table: per-chip GiB and percent of HBM, step TFLOPs, compile time."""
  r = report
  mesh = ' '.join(f'{k}={v}' for k, v in r.mesh_shape.items())
  hbm = f'{r.hbm_bytes / GIB:.1f} GiB HBM each' if r.hbm_bytes else 'memory size unknown'
  lines = [
    f'{r.topology}: {r.num_chips} x {r.chip_kind} ({hbm}); mesh {mesh}',
    f'global batch {r.global_batch} ({r.batch_per_chip:g} per chip)',
    f'{"per chip":<26}{"GiB":>9}{"% HBM":>9}',
  ]
  rows = [
    ('arguments (state, batch)', r.argument_bytes),
    ('outputs (new state)', r.output_bytes),
    ('aliased (donated, once)', -r.alias_bytes),
    ('temporaries', r.temp_bytes),
    ('generated code', r.generated_code_bytes),
    ('peak', r.peak_bytes),
  ]
  for name, value in rows:
    lines.append(f'  {name:<24}{value / GIB:>9.2f}{_percent(value, r.hbm_bytes):>9}')
  verdict = {True: 'fits', False: 'DOES NOT FIT', None: 'fit unknown (no HBM size)'}[r.fits]
  lines.append(f'{verdict}; headroom {_headroom(r)}')
  lines.append(
    f'step: {r.flops_per_chip / 1e12:.2f} TFLOP per chip, {r.flops_global / 1e12:.1f} TFLOP '
    f'global (matmuls and convolutions); compiled in {r.compile_seconds:.0f} s'
  )
  return '\n'.join(lines)


def _percent(value: int, total: int | None) -> str:
  return f'{100 * value / total:.1f}%' if total else '-'


def _headroom(r: AotReport) -> str:
  return f'{(r.hbm_bytes - r.peak_bytes) / GIB:.2f} GiB' if r.hbm_bytes else '-'
