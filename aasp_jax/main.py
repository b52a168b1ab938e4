"""`aasp-pretrain`: parses flags, joins the other processes, logs the devices, and calls the trainer.

  aasp-pretrain --config=configs/pretrain.py:variant=B/16 --workdir=/tmp/aasp \
      --config.data.train=/data/shards/train-*.array_record --config.global_batch=96

Rerunning the same command resumes from the latest complete checkpoint in --workdir. Check that a
config fits a TPU slice without one (prints per-chip memory and the step's FLOPs):

  aasp-pretrain --config=configs/pretrain_base.py --workdir=/tmp/aot --compile_only \
      --topology=v5p:4x4x4 --config.global_batch=512
"""

import logging
import os
import re
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from aasp_jax import configuration

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  None,
  'path/to/config.py[:args]; override fields with --config.key=value.',
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and TensorBoard logs.')
_DISTRIBUTED = flags.DEFINE_enum(
  'distributed',
  'auto',
  ['auto', 'on', 'off'],
  'jax.distributed.initialize(): auto = when a multi-process cluster (SLURM, a TPU pod slice, MPI) '
  'is detected or --coordinator_address is given.',
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0, for clusters JAX does not auto-detect.'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --coordinator_address.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --coordinator_address.')
_COMPILE_ONLY = flags.DEFINE_bool(
  'compile_only', False, 'Compile the train step ahead of time, print its memory and FLOPs, exit.'
)
_TOPOLOGY = flags.DEFINE_string(
  'topology',
  None,
  "With --compile_only: a TPU slice to compile for, e.g. 'v5p:4x4x4' (needs "
  "pip install -e '.[tpu]').",
)


def _in_multiprocess_cluster() -> bool:
  env = os.environ
  hosts = env.get('TPU_WORKER_HOSTNAMES', '')
  return (
    int(env.get('SLURM_NTASKS', '1')) > 1
    or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1
    or ',' in hosts
    or 'MEGASCALE_COORDINATOR_ADDRESS' in env
  )


def _initialize_distributed() -> None:
  if _DISTRIBUTED.value == 'off':
    return
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value == 'on' or _in_multiprocess_cluster():
    jax.distributed.initialize()  # the cluster environment names the coordinator


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # orbax and grain log every checkpoint thread at INFO through absl's logger; keep ours readable.
  logging.getLogger('absl').setLevel(logging.WARNING)
  if _COMPILE_ONLY.value and _TOPOLOGY.value:
    # libtpu is only the compiler here: never open local TPU chips (a training job may hold them).
    jax.config.update('jax_platforms', 'cpu')
  _initialize_distributed()
  logging.info(
    'process %d of %d; %d local / %d global devices: %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.local_devices(),
  )
  config = _CONFIG.value
  try:
    if config is None:
      raise configuration.ConfigError('--config is required, e.g. --config=configs/pretrain.py.')
    if _COMPILE_ONLY.value:
      from aasp_jax.train import aot

      configuration.validate(config)
      report = (
        aot.compile_for_topology(config, _TOPOLOGY.value)
        if _TOPOLOGY.value
        else aot.compile_for_local_devices(config)
      )
      print(aot.format_report(report))
      return
    from aasp_jax.train import loop

    result = loop.train(config, _WORKDIR.value)
  except configuration.ConfigError as e:
    logging.error('%s', e)
    print(f'aasp-pretrain: {e}', file=sys.stderr)
    sys.exit(2)
  if result.input_stalled:
    # Stopped by SIGTERM while an input read was blocked: that read may never return, and the
    # interpreter would wait for its thread at exit. The checkpoint is already complete.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad --config file, key or value as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    message = str(e).strip().strip('"').strip("'")
    if isinstance(e, (KeyError, AttributeError)):
      text = str(e).replace('\\', '')
      names = re.findall(r"'([A-Za-z_][A-Za-z0-9_]*)'", text)
      key = names[0] if names else text
      given = [a for a in argv[1:] if a.startswith('--config.') and key in a] or [
        a for a in argv[1:] if a.startswith('--config.')
      ]
      hint = re.search(r'Did you mean "([^"]+)"', text)
      message = (
        f'unknown config key {key!r} in {" ".join(given)}'
        + (f' (did you mean {hint.group(1)!r}?)' if hint else '')
        + '; `python -m aasp_jax.configuration CONFIG` prints every key.'
      )
    print(f'aasp-pretrain: {message}', file=sys.stderr)
    sys.exit(2)


def run() -> None:
  """Console-script entry point."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
