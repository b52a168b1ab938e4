"""Checkpoints of a training run: an orbax `CheckpointManager` in `<workdir>/checkpoints`.

Every checkpoint holds three items, written together and finalised together:
  state   the train state (student, EMA teacher, optimizer state, step) and the base RNG key, as
          sharded arrays; restored straight into the current mesh's shardings.
  data    the grain iterator's position, one JSON file per process.
  config  the resolved config as JSON, so a run can be inspected and resumed without its command.

Orbax writes a checkpoint into a temporary folder and renames it only once every item of every
process is on disk, so a crash mid-save (or a kill) leaves the previous checkpoint as the latest one;
leftover temporary folders are removed on the next start. Saves are asynchronous: the arrays are
copied to host memory, and the writing overlaps the next training steps.
"""

import json
import logging
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from aasp_jax.configuration import ConfigError

STATE, DATA, CONFIG = 'state', 'data', 'config'

# Config keys that must match the checkpoint for a resume to continue the same run. The others (mesh,
# logging, checkpoint cadence, number of workers, the probe) may change between restarts.
RESUME_KEYS = (
  'model',
  'frontend',
  'objective',
  'optimizer',
  'seed',
  'global_batch',
  'total_steps',
  'data.train',
  'data.features',
  'data.crop',
)


class RunCheckpoints:
  """Save / find / restore the checkpoints of one workdir."""

  def __init__(self, workdir: str, ckpt_cfg: ConfigDict):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_cfg.keep,
      enable_async_checkpointing=ckpt_cfg.async_save,
      create=True,
      cleanup_tmp_directories=True,  # what a crashed save left behind
    )
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        STATE: ocp.StandardCheckpointHandler(),
        DATA: grain.checkpoint.CheckpointHandler(),
        CONFIG: ocp.JsonCheckpointHandler(),
      },
    )

  def latest_step(self) -> int | None:
    """The newest complete checkpoint (unfinished saves are never listed)."""
    return self.manager.latest_step()

  def saved_config(self, step: int) -> dict:
    """The config stored with `step`; reads one small JSON file, no arrays."""
    restored = self.manager.restore(
      step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
    )
    return restored[CONFIG]

  def save(self, step: int, state, rng, data_iterator, config: ConfigDict) -> bool:
    """Starts an (async) save of everything needed to continue at `step`."""
    saved = self.manager.save(
      step,
      args=ocp.args.Composite(
        **{
          # The base key is the same on every host; as numpy it is saved once, by process 0.
          STATE: ocp.args.StandardSave(
            {'train': state, 'rng': np.asarray(jax.random.key_data(rng))}
          ),
          DATA: grain.checkpoint.CheckpointSave(data_iterator),
          CONFIG: ocp.args.JsonSave(json.loads(config.to_json())),
        }
      ),
      force=True,
    )
    if saved:
      logging.info('checkpoint: saving step %d to %s', step, self.directory)
    return saved

  def restore(self, step: int, abstract_state, state_shardings, data_iterator):
    """(state, rng) at `step`, restored into `state_shardings`; the iterator is moved in place."""
    target = {
      'train': jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state,
        state_shardings,
      ),
      'rng': np.zeros((2,), np.uint32),
    }
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        **{
          STATE: ocp.args.StandardRestore(target),
          DATA: grain.checkpoint.CheckpointRestore(data_iterator),
        }
      ),
    )
    logging.info('checkpoint: restored step %d from %s', step, self.directory)
    rng = jax.random.wrap_key_data(np.asarray(restored[STATE]['rng']))
    return restored[STATE]['train'], rng

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def check_resumable(saved: dict, config: ConfigDict, directory: str) -> None:
  """Refuses to resume a run whose model, objective, optimizer or data differ from the checkpoint.

  Raises ConfigError listing every differing key, before anything is compiled.
  """
  current = _flatten(json.loads(config.to_json()))
  before = _flatten(saved)
  differing = []
  for key in sorted(set(current) | set(before)):
    if not any(key == k or key.startswith(k + '.') for k in RESUME_KEYS):
      continue
    if current.get(key, '<absent>') != before.get(key, '<absent>'):
      differing.append(
        f'  {key}: checkpoint {before.get(key, "<absent>")!r}, now {current.get(key, "<absent>")!r}'
      )
  if differing:
    raise ConfigError(
      f'The workdir already holds checkpoints of a different run ({directory}):\n'
      + '\n'.join(differing)
      + "\nUse a new --workdir, or set these keys back to the checkpoint's values to resume it."
    )
