"""Checkpoints of a training run: an orbax `CheckpointManager` in `<workdir>/checkpoints`.

Every checkpoint holds four items, written together and finalised together:
  state          the train state (student, EMA teacher, optimizer state, step) and the base RNG key,
                 as sharded arrays. Restored into whatever shardings the reader asks for, so a
                 checkpoint written on one mesh (or number of processes) loads on any other.
  data_position  the trainer's position in the global input stream: one small JSON dict that does
                 not depend on the number of hosts, written once (by process 0).
  checksums      a 64-bit content hash of every array in `state` (below), as JSON.
  config         the resolved config as JSON: a run can be inspected and resumed without its
                 command.
A trainer may add JSON items of its own (`RunCheckpoints(json_items=...)`): fine-tuning saves the
classifier's labels, front end and encoder config as `classifier` (`finetune/checkpoint.py`).

Orbax writes a checkpoint into a temporary folder and renames it only once every item of every
process is on disk, so a crash mid-save (or a kill) leaves the previous checkpoint as the latest
one; leftover temporary folders are removed on the next start. Saves are asynchronous: the arrays
are copied to host memory, and the writing overlaps the next training steps.

Checksums. An array's words w_i are its bytes read as uint32 (2- and 1-byte elements widened to one
word each, 8-byte elements split into two), at flat row-major positions i. Its checksum is the pair
  ( sum_i w_i * a(i) mod 2^32 , sum_i w_i * b(i) mod 2^32 ),  a(i) = fmix32(i ^ A) | 1,
                                                             b(i) = fmix32(i ^ B) | 1,
with fmix32 MurmurHash3's finaliser. Integer sums mod 2^32 are exact in any order, so one jitted
reduction gives the same value on any mesh and any number of processes, without gathering the
arrays to a host; the weights are odd, so every single-bit error changes both sums. A restore
recomputes the checksums of what it read and compares; float arrays must also be finite.

A checkpoint that cannot be read (a missing or truncated file, unreadable JSON) or that fails the
comparison is never used: the trainer (`restore_latest`) moves it to
`<workdir>/checkpoints_set_aside/` and tries the next older one; readers (`read_step`, used by
`evaluate.pretrained`) skip it without moving anything. Checkpoints written before this format (a
per-process grain `data` item, no checksums) still load, unverified except for finiteness.
"""

import dataclasses
import json
import logging
import os
import re
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from aasp_jax.configuration import ConfigError

STATE, DATA_POSITION, CHECKSUMS, CONFIG = 'state', 'data_position', 'checksums', 'config'
# Written by the importers (export/timm_layout.py): {'imported_from': what the weights came from}.
ORIGIN = 'origin'
LEGACY_DATA = 'data'  # the per-process grain iterator item of checkpoints before data_position
SET_ASIDE = 'checkpoints_set_aside'
CHECKSUM_FORMAT = 'u32-weighted-sum-fmix32-v1'

# Config keys that must match the checkpoint for a resume to continue the same run. The others
# (mesh, logging, checkpoint cadence, number of workers, the probe) may change between restarts.
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


class NoUsableCheckpoint(ConfigError):
  """Checkpoints exist, but none can be used; the message lists each one and why."""


class UnusableCheckpoint(ValueError):
  """One checkpoint failed to read or verify. `reason` is one line naming the file or array."""

  def __init__(self, step_dir: str, reason: str):
    super().__init__(f'{step_dir}: {reason}')
    self.step_dir, self.reason = step_dir, reason


@dataclasses.dataclass
class Restored:
  step: int
  state: Any  # the train state, restored into the given shardings
  rng: jax.Array  # the base key
  data_position: dict | None  # the dict given to save(); None for checkpoints before that format


# ------------------------------------------------------------------------------------------------
# Checksums

_SEED_A, _SEED_B = np.uint32(0x9E3779B9), np.uint32(0x85EBCA77)


def _fmix32(h):
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _flat_index(shape) -> jax.Array:
  """Row-major positions (uint32, wrapping) without reshaping, so sharded arrays stay in place."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * np.uint32(stride % 2**32)
    stride *= shape[dim]
  return index


def _words(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size in (4, 8):  # 8-byte elements -> shape + (2,): the low word, then the high word
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    unsigned = jnp.uint8 if size == 1 else jnp.uint16
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  raise TypeError(f'cannot checksum arrays of dtype {x.dtype}')


def _leaf_digest(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(uint32[2] checksum, int32 number of non-finite values) of one array."""
  words = _words(x)
  index = _flat_index(words.shape)
  a = _fmix32(index ^ _SEED_A) | np.uint32(1)
  b = _fmix32(index ^ _SEED_B) | np.uint32(1)
  digest = jnp.stack([jnp.sum(words * a, dtype=jnp.uint32), jnp.sum(words * b, dtype=jnp.uint32)])
  if jnp.issubdtype(x.dtype, jnp.floating):
    nonfinite = jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)
  else:
    nonfinite = jnp.zeros((), jnp.int32)
  return digest, nonfinite


_digests = jax.jit(lambda leaves: [_leaf_digest(x) for x in leaves])


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  raise TypeError(f'unexpected tree key {key!r}')


def leaf_name(path) -> str:
  """A tree path as orbax names the array on disk: 'train.params.encoder.cls_token'."""
  return '.'.join(_key_name(k) for k in path)


def _host_value(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)  # a replicated result; every process holds the whole value
  return np.asarray(x)


def array_checksums(tree) -> dict[str, dict]:
  """{array name: {'checksum': 16 hex digits, 'nonfinite': count}} of every array in `tree`.

  Sharded arrays are reduced where they live (one jitted call; a collective when they span
  processes, so every process must call it); host (numpy) arrays on this process's first device.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [leaf_name(p) for p, _ in flat]
  on_device = [i for i, (_, x) in enumerate(flat) if isinstance(x, jax.Array)]
  on_host = [i for i, (_, x) in enumerate(flat) if not isinstance(x, jax.Array)]
  results = {}
  if on_device:
    for i, r in zip(on_device, _digests([flat[i][1] for i in on_device]), strict=True):
      results[i] = r
  if on_host:
    local = jax.local_devices()[0]
    values = [jax.device_put(np.asarray(flat[i][1]), local) for i in on_host]
    for i, r in zip(on_host, _digests(values), strict=True):
      results[i] = r
  host = jax.device_get({i: (_host_value(d), _host_value(n)) for i, (d, n) in results.items()})
  out = {}
  for i, name in enumerate(names):
    digest, nonfinite = host[i]
    out[name] = {
      'checksum': f'{int(digest[0]):08x}{int(digest[1]):08x}',
      'nonfinite': int(nonfinite),
    }
  return out


def verify_arrays(tree, expected: dict | None) -> None:
  """Raises ValueError (one line) unless every array of `tree` matches `expected` and is finite.

  `expected` is the checksums item's 'arrays' (None for a checkpoint written without checksums:
  then only finiteness is checked). `tree` may be part of the saved tree (a partial restore).
  """
  got = array_checksums(tree)
  for name, value in got.items():
    if expected is not None:
      want = expected.get(name)
      if want is None:
        raise ValueError(f'array {name}: no checksum recorded for it')
      if value['checksum'] != want['checksum']:
        raise ValueError(
          f'array {name}: checksum {value["checksum"]} != {want["checksum"]} recorded at save '
          '(its file was modified or corrupted)'
        )
    if value['nonfinite']:
      raise ValueError(f'array {name}: {value["nonfinite"]} non-finite values')


# ------------------------------------------------------------------------------------------------
# Reading one checkpoint (trainer and readers)


def _one_line(error: BaseException, limit: int = 300) -> str:
  """The innermost cause of an orbax / TensorStore error, on one line (their own run to pages)."""
  seen = {id(error)}
  while True:
    inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    if inner is None or id(inner) in seen:
      break
    error = inner
    seen.add(id(error))
  text = str(error).strip().splitlines()[0] if str(error).strip() else ''
  text = f'{type(error).__name__}: {text}' if text else type(error).__name__
  return text if len(text) <= limit else text[: limit - 3] + '...'


_ORBAX_READ_TASK = '_read_array_index_and_device_put'
_READ_ERROR = 'Encountered error while reading array index'
_TENSORSTORE_READ_ERROR = re.compile(r'\b[A-Z_]+: Error reading ')


def _is_read_noise(error: BaseException | None) -> bool:
  text = str(error)
  closed = isinstance(error, RuntimeError) and text == 'Event loop is closed'
  return closed or text.startswith(_READ_ERROR) or bool(_TENSORSTORE_READ_ERROR.match(text))


class _AsyncioReadNoise(logging.Filter):
  """asyncio's 'exception was never retrieved' reports of orbax's abandoned array reads."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    error = record.exc_info[1] if record.exc_info else None
    noise = (
      _ORBAX_READ_TASK in message
      or _READ_ERROR in message
      or bool(_TENSORSTORE_READ_ERROR.search(message))
      or _is_read_noise(error)
    )
    return not noise


_quieted = False


def _quiet_abandoned_reads() -> None:
  """Drops the echoes of a failed array read, which `read_step` reports in one line instead.

  When one read of an orbax restore fails, orbax stops waiting for the others and closes its event
  loop; the reads still in flight then fail one by one, each printing a TensorStore spec of ~60
  lines (thousands of lines for one damaged file) through `sys.unraisablehook` and the 'asyncio'
  logger, some time after the restore returned. Only those are dropped; anything else passes.
  """
  global _quieted
  if _quieted:
    return
  _quieted = True
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_read_noise(unraisable.exc_value):
      previous(unraisable)

  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(_AsyncioReadNoise())


def _read_json(step_dir: epath.Path, item: str) -> dict:
  path = step_dir / item
  try:
    value = ocp.JsonCheckpointHandler().restore(path)
  except Exception as e:  # noqa: BLE001 - any read or parse failure makes the item unusable
    raise UnusableCheckpoint(str(step_dir), f'{item}: unreadable ({_one_line(e)})') from None
  if not isinstance(value, dict):
    raise UnusableCheckpoint(str(step_dir), f'{item}: not a JSON object')
  return value


def read_config(step_dir: str) -> dict:
  """The resolved config saved with a checkpoint (one small JSON file), or UnusableCheckpoint."""
  return _read_json(epath.Path(step_dir), CONFIG)


def read_item(step_dir: str, item: str) -> dict:
  """A JSON item saved with a checkpoint (e.g. a trainer's own item), or UnusableCheckpoint."""
  return _read_json(epath.Path(step_dir), item)


def _saved_arrays(handler, state_dir: epath.Path, step_dir: str) -> dict:
  """{array name: (shape, dtype)} from the state item's metadata (no array is read)."""
  try:
    tree = handler.metadata(state_dir).tree
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  except Exception as e:  # noqa: BLE001
    raise UnusableCheckpoint(step_dir, f'{STATE}: metadata unreadable ({_one_line(e)})') from None
  return {leaf_name(p): (tuple(m.shape), np.dtype(m.dtype)) for p, m in flat}


def _check_structure(saved: dict, target, partial: bool, step_dir: str) -> None:
  """Every array the target asks for must be saved with that shape and dtype (and, for a full
  restore, nothing else): a difference is a different model or optimizer, not damage."""
  want = {
    leaf_name(p): (tuple(x.shape), np.dtype(x.dtype))
    for p, x in jax.tree_util.tree_flatten_with_path(target)[0]
  }
  problems = [
    f'{n}: saved {saved[n][0]} {saved[n][1]}, expected {want[n][0]} {want[n][1]}'
    for n in sorted(set(want) & set(saved))
    if saved[n] != want[n]
  ]
  problems += [f'{n}: not in the checkpoint' for n in sorted(set(want) - set(saved))]
  if not partial:
    problems += [
      f'{n}: in the checkpoint but not in this state' for n in sorted(set(saved) - set(want))
    ]
  if problems:
    more = f' (and {len(problems) - 4} more)' if len(problems) > 4 else ''
    raise ConfigError(f'{step_dir}: {"; ".join(problems[:4])}{more}')


@dataclasses.dataclass
class StepContents:
  config: dict
  tree: Any  # the restored target tree
  data_position: dict | None
  verified: bool  # False for checkpoints written before checksums (only finiteness was checked)


def _all_processes_ok(ok: bool) -> bool:
  """True only if every process could do its part (each process reads only its own shards)."""
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))
  return bool(np.all(np.asarray(flags)))


def read_step(
  step_dir: str, make_target: Callable[[dict], Any], *, partial: bool = False
) -> StepContents:
  """Reads and verifies one checkpoint folder `<...>/checkpoints/<step>`.

  Args:
    step_dir: the step's folder.
    make_target: saved config dict -> the tree to restore: `jax.ShapeDtypeStruct`s with the
      shardings to restore into (numpy arrays restore on the host).
    partial: restore only the arrays `make_target` names (e.g. one encoder); else all of them.

  Raises:
    UnusableCheckpoint: a file is missing, truncated or unreadable, or an array fails its checksum
      or holds non-finite values (in multi-process runs: on any process).
    ConfigError: the checkpoint is intact but holds arrays of another model or optimizer.
  """
  path = epath.Path(step_dir)
  problem, contents = None, None
  try:
    config = _read_json(path, CONFIG)
    sums = None
    if (path / CHECKSUMS).exists():
      sums = _read_json(path, CHECKSUMS)
      if sums.get('format') != CHECKSUM_FORMAT or not isinstance(sums.get('arrays'), dict):
        raise UnusableCheckpoint(step_dir, f'{CHECKSUMS}: unknown format {sums.get("format")!r}')
    elif (path / DATA_POSITION).exists():
      raise UnusableCheckpoint(step_dir, f'the {CHECKSUMS} item is missing')
    elif not partial and not (path / LEGACY_DATA).exists():
      # Readers also take encoder-only checkpoints (`timm_layout.write_encoder_checkpoint`).
      raise UnusableCheckpoint(step_dir, f'no {CHECKSUMS} and no {DATA_POSITION} item')
    position = None
    if not partial and sums is not None:
      position = _read_json(path, DATA_POSITION)
    target = make_target(config)
    handler = ocp.PyTreeCheckpointHandler()
    try:
      _check_structure(_saved_arrays(handler, path / STATE, step_dir), target, partial, step_dir)
      restore_args = ocp.checkpoint_utils.construct_restore_args(target)
      _quiet_abandoned_reads()  # before: the echoes may come while the restore still runs
      try:
        tree = handler.restore(
          path / STATE,
          args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=partial
          ),
        )
      except Exception as e:  # noqa: BLE001 - TensorStore / OCDBT errors of every kind
        raise UnusableCheckpoint(step_dir, f'{STATE}: {_one_line(e)}') from None
    finally:
      handler.close()
    contents = StepContents(config, tree, position, verified=sums is not None)
  except UnusableCheckpoint as e:
    problem = e
  if not _all_processes_ok(problem is None):
    raise problem or UnusableCheckpoint(step_dir, 'another process could not read it (see its log)')
  try:
    verify_arrays(contents.tree, sums['arrays'] if sums is not None else None)
  except ValueError as e:
    raise UnusableCheckpoint(step_dir, str(e)) from None
  return contents


def complete_steps(directory: str) -> list[int]:
  """The finished checkpoints in a `checkpoints/` folder, oldest first (orbax renames a step's
  folder into place only when every item of every process is written)."""
  if not os.path.isdir(directory):
    return []
  return sorted(
    int(n)
    for n in os.listdir(directory)
    if n.isdigit() and os.path.isdir(os.path.join(directory, n, STATE))
  )


# ------------------------------------------------------------------------------------------------
# The trainer's checkpoints


class RunCheckpoints:
  """Save / find / restore the checkpoints of one workdir.

  `json_items` names extra JSON items the trainer saves with every checkpoint (`save(items=...)`).
  """

  def __init__(self, workdir: str, ckpt_cfg: ConfigDict, json_items: tuple[str, ...] = ()):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, 'checkpoints')
    self.set_aside_directory = os.path.join(self.workdir, SET_ASIDE)
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
        DATA_POSITION: ocp.JsonCheckpointHandler(),
        CHECKSUMS: ocp.JsonCheckpointHandler(),
        CONFIG: ocp.JsonCheckpointHandler(),
        **{item: ocp.JsonCheckpointHandler() for item in json_items},
      },
    )
    self.json_items = tuple(json_items)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint (unfinished saves are never listed)."""
    return self.manager.latest_step()

  def saved_config(self, step: int) -> dict:
    """The config stored with `step`; reads one small JSON file, no arrays.

    If that file is unreadable, the config of the newest older checkpoint that reads (a run's
    checkpoints share their RESUME_KEYS); `restore_latest` then sets the damaged one aside.
    """
    steps = [s for s in self.manager.all_steps() if s <= step]
    failures = []
    for s in sorted(steps, reverse=True):
      try:
        return read_config(os.path.join(self.directory, str(s)))
      except UnusableCheckpoint as e:
        logging.warning('checkpoint: step %d: %s', s, e.reason)
        failures.append(f'step {s}: {e.reason}')
    raise NoUsableCheckpoint(
      f'No checkpoint config in {self.directory} can be read ({"; ".join(failures) or "none"}). '
      'Move the damaged step folders away, or use a new --workdir.'
    )

  def check_resumable(self, config: ConfigDict, keys: tuple[str, ...] = RESUME_KEYS) -> None:
    """Refuses (ConfigError) a config whose `keys` differ from the newest checkpoint's; no-op for
    an empty workdir or an unreadable config (the restore reports a damaged checkpoint)."""
    latest = self.latest_step()
    if latest is None:
      return
    try:
      saved = self.saved_config(latest)
    except Exception:  # noqa: BLE001 -- a damaged checkpoint is reported by the restore
      return
    check_resumable(saved, config, self.directory, keys)

  def save(
    self,
    step: int,
    state,
    rng,
    data_position: dict,
    config: ConfigDict,
    items: dict[str, dict] | None = None,
  ) -> bool:
    """Starts an (async) save of everything needed to continue at `step`.

    `data_position` is the trainer's position in the global input stream (a small JSON-able dict,
    the same on every process); `items` the trainer's own JSON items, one for each of
    `json_items`. The arrays' checksums are computed first, on the devices.
    """
    items = dict(items or {})
    if set(items) != set(self.json_items):
      raise ValueError(f'checkpoint step {step}: items {sorted(items)}, expected {self.json_items}')
    try:
      position = json.loads(json.dumps(data_position))
    except (TypeError, ValueError) as e:
      raise TypeError(
        f'checkpoint step {step}: data_position must be a JSON-able dict ({e})'
      ) from None
    if not isinstance(position, dict):
      raise TypeError(
        f'checkpoint step {step}: data_position must be a dict, got {type(data_position)}'
      )
    # The base key is the same on every host; as numpy it is saved once, by process 0.
    tree = {'train': state, 'rng': np.asarray(jax.random.key_data(rng))}
    sums = {'format': CHECKSUM_FORMAT, 'arrays': array_checksums(tree)}
    saved = self.manager.save(
      step,
      args=ocp.args.Composite(
        **{
          STATE: ocp.args.StandardSave(tree),
          DATA_POSITION: ocp.args.JsonSave(position),
          CHECKSUMS: ocp.args.JsonSave(sums),
          CONFIG: ocp.args.JsonSave(json.loads(config.to_json())),
          **{name: ocp.args.JsonSave(value) for name, value in items.items()},
        }
      ),
      force=True,
    )
    if saved:
      logging.info('checkpoint: saving step %d to %s', step, self.directory)
    return saved

  def restore_latest(self, abstract_state, state_shardings) -> Restored | None:
    """The newest checkpoint that reads and verifies, restored into `state_shardings`.

    None when the workdir has no checkpoint. A checkpoint that fails to read or verify is logged
    (one line), moved to `<workdir>/checkpoints_set_aside/` by process 0, and the next older one
    is tried.

    Raises:
      NoUsableCheckpoint: checkpoints exist (or were set aside earlier) but none can be used.
      ConfigError: an intact checkpoint holds another state (model, optimizer) than the target;
        nothing is moved.
    """
    target = {
      'train': jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state,
        state_shardings,
      ),
      'rng': np.zeros((2,), np.uint32),
    }
    failures = []
    while (step := self.manager.latest_step()) is not None:
      step_dir = os.path.join(self.directory, str(step))
      try:
        got = read_step(step_dir, lambda _: target)
      except ConfigError as e:
        raise ConfigError(
          f'The checkpoint holds another state than this code and config build ({e}). Resume it '
          'with the code and config that wrote it, or use a new --workdir.'
        ) from None
      except UnusableCheckpoint as e:
        moved = self._set_aside(step)
        logging.warning(
          'checkpoint: step %d is unusable, %s; moved to %s, trying the previous one',
          step, e.reason, moved,
        )  # fmt: skip
        failures.append(f'step {step}: {e.reason}')
        continue
      if failures:
        logging.warning(
          'checkpoint: resuming from step %d instead (%d set aside)', step, len(failures)
        )
      if not got.verified:
        logging.warning(
          'checkpoint: step %d predates checksums and data positions: restored unverified '
          '(only checked to be finite), without a data position',
          step,
        )
      else:
        logging.info(
          'checkpoint: restored step %d from %s (checksums verified)', step, self.directory
        )
      rng = jax.random.wrap_key_data(np.asarray(got.tree['rng']))
      return Restored(step, got.tree['train'], rng, got.data_position)
    if failures or self._set_aside_steps():
      listed = '; '.join(failures) or (
        f'steps {self._set_aside_steps()} were set aside by an earlier start'
      )
      raise NoUsableCheckpoint(
        f'No usable checkpoint in {self.directory}: {listed}. The damaged checkpoints are kept in '
        f'{self.set_aside_directory}. To start this run over from step 0, move that folder away '
        '(or use a new --workdir); nothing was trained.'
      )
    return None

  def _set_aside_steps(self) -> list[str]:
    if not os.path.isdir(self.set_aside_directory):
      return []
    return sorted(os.listdir(self.set_aside_directory))

  def _set_aside(self, step: int) -> str:
    """Moves a damaged step folder out of the manager's sight (never deletes it)."""
    target = os.path.join(self.set_aside_directory, str(step))
    if jax.process_index() == 0:
      os.makedirs(self.set_aside_directory, exist_ok=True)
      n = 1
      while os.path.exists(target):
        n += 1
        target = os.path.join(self.set_aside_directory, f'{step}.{n}')
      os.rename(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint: set aside step {step}')
    self.manager.reload()
    return target

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    # The manager removes leftover temporary folders on a thread it starts at construction and
    # close() does not wait for; a run that stops at once (a config error) would exit under it,
    # and the thread then prints "cannot schedule new futures after interpreter shutdown".
    await_cleanup = getattr(self.manager, '_maybe_await_cleanup_tmp_directory', None)
    if await_cleanup is not None:
      await_cleanup()
    self.manager.close()


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def check_resumable(
  saved: dict, config: ConfigDict, directory: str, keys: tuple[str, ...] = RESUME_KEYS
) -> None:
  """Refuses to resume a run whose model, objective, optimizer or data differ from the checkpoint.

  `keys` are the config keys (or sections) that must match: pre-training's by default.
  Raises ConfigError listing every differing key, before anything is compiled.
  """
  current = _flatten(json.loads(config.to_json()))
  before = _flatten(saved)
  # A checkpoint written before a field existed was made with that field's default.
  from aasp_jax import configuration  # flax is only needed here, not to read checkpoints

  for key, default in configuration.LATER_FIELDS.items():
    if key in current and key not in before:  # (fine-tuning configs have other sections)
      before[key] = current[key] if default is configuration.ANY else default
  differing = []
  for key in sorted(set(current) | set(before)):
    if not any(key == k or key.startswith(k + '.') for k in keys):
      continue
    if current.get(key, '<absent>') != before.get(key, '<absent>'):
      differing.append(
        f'  {key}: checkpoint {before.get(key, "<absent>")!r}, now {current.get(key, "<absent>")!r}'
      )
  if differing:
    raise ConfigError(
      f'The workdir already holds checkpoints of a different run ({directory}):\n'
      + '\n'.join(differing)
      + '\nUse a new --workdir (aasp-finetune: --config.workdir), or set these keys back to the '
      "checkpoint's values to resume it."
    )
