"""The grain input pipeline: a source of clips to per-host batches and global `jax.Array`s.

  source -> shuffle (reshuffled every epoch) -> repeat
  -> usable clip at each global position: decode + validate + crop/pad (+ host log-mel)
  -> shard by JAX process (host p takes rows [p*b, (p+1)*b) of every global batch of P*b clips)
  -> batch -> start at global batch `start_batch` -> to_iter_dataset -> worker-process prefetch
  -> make_array_from_process_local_data

The training stream (`num_epochs=None`) does not depend on the number of processes. Position i of
the infinite, repeated, per-epoch-shuffled stream (epoch e = i // N, slot j = i % N of N clips)
resolves to the first usable clip of a fixed candidate sequence: slots j, j + s, j + 2s, ... (mod N)
of the same epoch, with a stride s coprime to N near 0.618 N, so a replacement comes from elsewhere
in the epoch and every clip of the epoch is tried once before giving up. Try t of position i draws
its crop from a generator seeded with (seed, i, t). Each host resolves only its own rows, and the
global batch k is the same for any number of processes (and workers): a run on 2 hosts x 4 devices
trains on exactly the batches of a run on 1 host x 8 devices, skipped clips included, and
`start_batch=k` starts any of them at global batch k. When all N candidates of a position fail, no
usable clip exists and the stream raises `DataError` (naming the source, the per-reason counts and
one file with its reason) instead of spinning.

Nothing is lost silently. Each example carries the skips its position ran into, and every batch
carries `skipped` (per-reason counts, `clips.SKIP_REASONS` order): the skips of that batch's rows.
Summed over the hosts' batches they are the same for any number of processes. `strict=True`
raises on the first bad clip with its file name instead.

Finite streams (`num_epochs` set: evaluation, one pass over a set) never replace a clip, since a
replacement would show a clip twice: a bad clip becomes a skip marker that the batcher counts and
drops, so the hosts' batches depend on the process count there. The stream ends with one host-only
batch ({'skipped', 'unbatched'}) when skips or an incomplete batch remain after the last full
batch, so even the tail is accounted for.

The iterator's state (`get_state` / `set_state`, JSON-serialisable) restores the exact stream for
the same `start_batch` and process count; `start_batch` alone restores it for any process count.
`check_source` opens a spec exactly as `make_dataset` does and fails in one line, within a time
bound, when it is missing, unreadable, empty or holds no usable clip.
"""

import dataclasses
import logging
import math
import time
from collections.abc import Sequence

import grain
import jax
import numpy as np
import soundfile as sf

from aasp_jax.audio import fbank_host
from aasp_jax.audio import presets as presets_lib
from aasp_jax.data import clips, records, sources
from aasp_jax.data.sources import DataError

SKIPS_KEY = '_skips'  # per-example skip counts; summed into the batch's `skipped`
HOST_FIELDS = ('skipped', 'unbatched')  # per-host bookkeeping, never sent to devices


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  """Everything that shapes the stream. `clip_samples` defaults to the preset's target length."""

  preset: presets_lib.FrontEndPreset
  batch_size: int  # per host
  seed: int = 0
  num_epochs: int | None = None  # None repeats forever
  shuffle: bool = True
  crop: str = 'random'  # 'random' | 'start'
  features: str = 'waveform'  # 'waveform' (log-mel on device) | 'log_mel' (host)
  clip_samples: int | None = None
  num_workers: int = 0
  worker_buffer_size: int = 2
  # Threads that decode elements inside each process (grain's ReadOptions). Decoding is mostly
  # GIL-free numpy/libsndfile work, so a few threads per worker overlap I/O and compute.
  read_threads: int = 4
  read_buffer_size: int = 64
  strict: bool = False
  min_samples: int = 2960
  silence_rms: float = 1e-5
  label_vocab: tuple[str, ...] | None = None
  drop_remainder: bool = True

  def __post_init__(self):
    if self.crop not in ('random', 'start'):
      raise ValueError(f"crop must be 'random' or 'start', got {self.crop!r}.")
    if self.features not in ('waveform', 'log_mel'):
      raise ValueError(f"features must be 'waveform' or 'log_mel', got {self.features!r}.")
    if self.batch_size <= 0:
      raise ValueError(f'batch_size must be positive, got {self.batch_size}.')

  @property
  def num_samples(self) -> int:
    """Samples per clip: enough for exactly `target_length` frames unless set explicitly."""
    if self.clip_samples is not None:
      return self.clip_samples
    p = self.preset
    return p.window_length + (p.target_length - 1) * p.frame_shift


def crop_or_pad(wave: np.ndarray, length: int, offset: int) -> tuple[np.ndarray, int]:
  """Returns (wave[offset:offset + length] zero-padded at the end to `length`, true length)."""
  piece = wave[offset : offset + length]
  out = np.zeros(length, np.float32)
  out[: len(piece)] = piece
  return out, len(piece)


class LoadClip:
  """Decodes, validates and crops one element: `load(element, rng)` -> example.

  Raises:
    clips.ClipSkipped: the clip cannot be used (one of clips.SKIP_REASONS).
    DataError: a packed record's sample rate differs from the front end's (a re-pack is needed).
  """

  def __init__(self, options: PipelineOptions):
    self.options = options
    vocab = options.label_vocab or ()
    self._label_index = {name: i for i, name in enumerate(vocab)}

  def _window(self, element: dict, rng: np.random.Generator) -> tuple[float | None, float | None]:
    """For files: the [start, end) seconds to decode, so long files are never read whole."""
    o, sr = self.options, self.options.preset.sample_rate
    start, end = element['start'], element['end']
    try:
      info = sf.info(element['path'])
    except Exception:  # load_clip reports the precise reason (missing, empty, unreadable)
      return start, end
    file_start = start or 0.0
    file_end = end if end is not None else info.frames / info.samplerate
    span = file_end - file_start
    want = o.num_samples / sr
    if span <= want:
      return start, end
    offset = rng.uniform(0.0, span - want) if o.crop == 'random' else 0.0
    # Half a second of slack keeps the resampler's edge effects outside the crop.
    return file_start + offset, min(file_end, file_start + offset + want + 0.5)

  def _labels(self, names: Sequence[str], where: str) -> np.ndarray:
    multi_hot = np.zeros(len(self._label_index), np.float32)
    for name in names:
      if name not in self._label_index:
        raise ValueError(f'{where}: label {name!r} is not in the label vocabulary.')
      multi_hot[self._label_index[name]] = 1.0
    return multi_hot

  def _record(self, element: dict) -> tuple[np.ndarray, Sequence[str], str]:
    sr = self.options.preset.sample_rate
    try:
      rec = records.decode_record(element['record'])
    except ValueError as e:  # a corrupt record is the data's fault: skip it like a bad file
      where = f'record {element["index"]} of {element.get("where", "the pack")}'
      raise clips.ClipSkipped('unreadable', where, ' '.join(str(e).split())) from None
    where = f'record {rec["id"]!r}'
    if rec['sample_rate'] != sr:
      pack_name = element.get('where', 'the pack')
      raise DataError(
        f'{pack_name}: {where} was packed at {rec["sample_rate"]} Hz but the front end needs '
        f'{sr} Hz; re-pack with --sample_rate {sr}.'
      )
    return rec['waveform'], rec['labels'], where

  def __call__(self, element: dict, rng: np.random.Generator) -> dict:
    o = self.options
    if 'record' in element:
      wave, labels, where = self._record(element)
      clips.validate_waveform(wave, where, min_samples=o.min_samples, silence_rms=o.silence_rms)
    else:
      start, end = self._window(element, rng)
      wave, _ = clips.load_clip(
        element['path'],
        o.preset.sample_rate,
        start,
        end,
        min_samples=o.min_samples,
        silence_rms=o.silence_rms,
      )
      labels, where = element['labels'], element['path']
    offset = 0
    if len(wave) > o.num_samples and o.crop == 'random':
      offset = int(rng.integers(0, len(wave) - o.num_samples + 1))
    wave, true_len = crop_or_pad(wave, o.num_samples, offset)
    example = {
      'index': np.int64(element['index']),
      'num_samples': np.int32(true_len),
    }
    if o.features == 'log_mel':
      example['log_mel'] = fbank_host.features(wave[:true_len], o.preset)
    else:
      example['waveform'] = wave
    if o.label_vocab is not None:
      example['labels'] = self._labels(labels, where)
    return example


def candidate_stride(n: int) -> int:
  """The stride between a position's candidates: coprime to n (so n tries visit every slot of the
  epoch once) and near 0.618 n (so a replacement comes from far away in the shuffled epoch)."""
  s = max(1, int(n * 0.6180339887498949))
  while math.gcd(s, n) != 1:
    s += 1
  return s


class _Resolution:
  """What resolving one position found: the example (or None) and the skips on the way."""

  def __init__(self):
    self.example: dict | None = None
    self.skips = np.zeros(len(clips.SKIP_REASONS), np.int64)
    self.first_skip: clips.ClipSkipped | None = None
    self.tried = 0

  def summary(self) -> str:
    counts = ', '.join(f'{r} {n}' for r, n in zip(clips.SKIP_REASONS, self.skips) if n)
    example = ' '.join(str(self.first_skip).split()) if self.first_skip else ''
    return f'skipped: {counts}; e.g. {example}'


class UsableClips(grain.MapDataset):
  """Position i of the shuffled, repeated stream -> the example of its first usable candidate.

  `parent` is the shuffled, repeated source (epoch length `n`). With `replace=True` (infinite
  streams), candidate t of position i is slot (i % n + t * candidate_stride(n)) % n of the same
  epoch, and its crop generator is seeded with (seed, i, t); all n candidates failing raises
  DataError. With `replace=False` (finite streams) a failed clip gives a skip marker
  ({SKIPS_KEY: counts}) instead. Every example carries SKIPS_KEY: the skips of its position.
  """

  def __init__(self, parent, n: int, load: LoadClip, seed: int, replace: bool, name: str):
    super().__init__(parent)
    self._n, self._load, self._seed, self._replace, self._name = n, load, seed, replace, name
    self._stride = candidate_stride(n)
    self._reason_index = {r: i for i, r in enumerate(clips.SKIP_REASONS)}

  def __len__(self) -> int:
    return len(self._parent)

  def resolve(self, index: int, deadline: float | None = None) -> _Resolution:
    """Tries the candidates of position `index` until one loads (or, with a `deadline` from
    time.monotonic(), until it passes). Raises ClipSkipped at the first failure in strict mode."""
    found = _Resolution()
    epoch, slot = divmod(index, self._n)
    for t in range(self._n if self._replace else 1):
      element = self._parent[epoch * self._n + (slot + t * self._stride) % self._n]
      rng = np.random.default_rng((self._seed, index, t))
      found.tried += 1
      try:
        found.example = self._load(element, rng)
        return found
      except clips.ClipSkipped as e:
        if self._load.options.strict:
          raise
        found.skips[self._reason_index[e.reason]] += 1
        found.first_skip = found.first_skip or e
      if deadline is not None and time.monotonic() > deadline:
        break
    return found

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    found = self.resolve(index)
    if found.example is not None:
      found.example[SKIPS_KEY] = found.skips
      return found.example
    if not self._replace:
      return {SKIPS_KEY: found.skips}
    raise DataError(
      f'{self._name}: no usable clip: all {self._n} clip(s) failed ({found.summary()}); fix or '
      'remove the bad files (aasp-data pack lists each one in skipped.csv).'
    )

  def __str__(self) -> str:
    return f'UsableClips(n={self._n}, replace={self._replace})'


class HostRowsOfGlobalBatches(grain.MapDataset):
  """Host p's view of a global stream cut into global batches of `process_count * per_host`
  elements: rows [p * per_host, (p + 1) * per_host) of each. Lazy: other hosts' rows are never read.
  """

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent, process_index: int, process_count: int, per_host: int):
    super().__init__(parent)
    self._p, self._per_host = process_index, per_host
    self._global = per_host * process_count
    full, rest = divmod(len(parent), self._global)
    self._length = full * per_host + min(per_host, max(0, rest - process_index * per_host))

  def __len__(self) -> int:
    return self._length

  def _global_index(self, index: int) -> int:
    batch, row = divmod(index, self._per_host)
    return batch * self._global + self._p * self._per_host + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._global_index(index)]

  def _getitems(self, indices):
    return self._parent._getitems([self._global_index(i) for i in indices])  # noqa: SLF001

  def __str__(self) -> str:
    return f'HostRowsOfGlobalBatches(process={self._p}, per_host={self._per_host})'


class _SkipAccountingBatchIterator(grain.DatasetIterator):
  """Collects `batch_size` examples, counting the skip markers it passes on the way."""

  def __init__(self, parent, batch_size: int, drop_remainder: bool):
    super().__init__(parent)
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder

  def __next__(self) -> dict:
    examples = []
    skipped = np.zeros(len(clips.SKIP_REASONS), np.int64)
    while len(examples) < self._batch_size:
      try:
        element = next(self._parent)
      except StopIteration:
        break
      skipped += element[SKIPS_KEY]
      if 'index' in element:  # not a skip marker
        examples.append(element)
    if len(examples) == self._batch_size or (examples and not self._drop_remainder):
      batch = _stack(examples)
      batch['skipped'] = skipped
      return batch
    # The end of a finite stream. What it still held is reported in a last host-only batch, so the
    # counts stay exact: `unbatched` examples (an incomplete batch under drop_remainder) and skips.
    if examples or skipped.any():
      if examples:
        logging.warning(
          'End of data: %d example(s) after the last full batch of %d were not batched '
          '(drop_remainder=True).',
          len(examples),
          self._batch_size,
        )
      return {'skipped': skipped, 'unbatched': np.int64(len(examples))}
    raise StopIteration

  def get_state(self):
    # A batch is always completed inside one __next__, so the parent's state is the whole state.
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class SkipAccountingBatch(grain.IterDataset):
  def __init__(self, parent, batch_size: int, drop_remainder: bool = True):
    super().__init__(parent)
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder

  def __iter__(self):
    return _SkipAccountingBatchIterator(
      self._parent.__iter__(), self._batch_size, self._drop_remainder
    )

  def __str__(self):
    return f'SkipAccountingBatch(batch_size={self._batch_size})'


def _stack(examples: Sequence[dict]) -> dict:
  """A batch of examples; `skipped` sums the skips the examples carry."""
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != SKIPS_KEY}
  batch['skipped'] = np.sum([e[SKIPS_KEY] for e in examples], axis=0, dtype=np.int64)
  return batch


def _open(spec) -> tuple[str, object]:
  """(name, source): a data spec opened by `sources.open_source`, or a source object as it is."""
  name = sources.describe(spec)
  if isinstance(spec, (str, list, tuple)) or not hasattr(spec, '__getitem__'):
    return name, sources.open_source(spec)
  return name, spec


def _usable_clips(
  source, options: PipelineOptions, name: str, replace: bool | None = None
) -> UsableClips:
  """The global stream of examples: shuffled per epoch, repeated, one usable clip per position."""
  if len(source) == 0:
    raise DataError(f'{name}: the source holds no clips.')
  ds = grain.MapDataset.source(source)
  if options.shuffle:
    # Shuffling before repeat reshuffles every epoch (grain combines the seed with the epoch).
    ds = ds.shuffle(seed=options.seed)
  ds = ds.repeat(options.num_epochs)
  return UsableClips(
    ds,
    len(source),
    LoadClip(options),
    seed=options.seed + 1,
    replace=options.num_epochs is None if replace is None else replace,
    name=name,
  )


def make_dataset(
  source,
  options: PipelineOptions,
  process_index: int | None = None,
  process_count: int | None = None,
  start_batch: int = 0,
) -> grain.IterDataset:
  """Builds the per-host dataset of batches.

  Args:
    source: a data spec (a path, a glob, a comma-separated string or a list of them; see
      `sources`) or a grain-compatible random-access source.
    options: what shapes the stream.
    process_index: this host (default jax.process_index()).
    process_count: the number of hosts (default jax.process_count()).
    start_batch: the first global batch of the stream. The trainer takes one global batch per
      step, so resuming at step k with start_batch=k continues the stream exactly, whatever the
      number of processes before and after. In a finite stream it skips start_batch * global
      batch positions (exactly start_batch batches when no clip is dropped).

  Raises:
    DataError: the spec cannot be opened (see `sources.open_source`); while iterating, a source
      without any usable clip.
  """
  name, source = _open(source)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count}).')
  if start_batch < 0:
    raise ValueError(f'start_batch must be >= 0, got {start_batch}.')
  b = options.batch_size
  ds = _usable_clips(source, options, name)
  # Rows are picked after the clips are resolved per global position, so a host's rows hold the
  # same examples, crops and skips whatever the number of processes.
  ds = HostRowsOfGlobalBatches(ds, process_index, process_count, b)
  if options.num_epochs is None:
    # Batches are formed before the iterator, so grain's worker processes (which take every
    # num_workers-th element) hand out whole batches in order, and batch k is global batch k.
    ds = ds.batch(b, drop_remainder=True, batch_fn=_stack)[start_batch:]
    read_options = grain.ReadOptions(
      num_threads=options.read_threads,
      prefetch_buffer_size=max(options.read_threads, math.ceil(options.read_buffer_size / b), 1),
    )
    ds = ds.to_iter_dataset(read_options)
  else:
    read_options = grain.ReadOptions(
      num_threads=options.read_threads, prefetch_buffer_size=options.read_buffer_size
    )
    ds = SkipAccountingBatch(
      ds[start_batch * b :].to_iter_dataset(read_options), b, options.drop_remainder
    )
  if options.num_workers > 0:
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=options.num_workers, per_worker_buffer_size=options.worker_buffer_size
      )
    )
  return ds


def check_source(spec, options: PipelineOptions, max_seconds: float = 20.0) -> dict:
  """Checks that a data spec can feed `make_dataset`, before anything expensive starts.

  Opens the spec exactly as `make_dataset` does, then tries clips in the stream's order (the
  candidates of position 0: every clip of the first shuffled epoch) until one is usable, for at
  most `max_seconds` and at most the source's size.

  Returns:
    {'source': name, 'clips': clips in the source, 'checked': clips tried, 'skipped': {reason:
    count} among them, 'unreadable_folders': subfolders a folder scan could not list}.

  Raises:
    DataError: one line, for a missing or unreadable path, an unfinished or empty pack, a source
      with zero entries, or no usable clip among those checked (saying how many and why).
  """
  name, source = _open(spec)
  n = len(source)
  clips_ds = _usable_clips(source, dataclasses.replace(options, strict=False), name, replace=True)
  found = clips_ds.resolve(0, deadline=time.monotonic() + max_seconds)
  unreadable = list(getattr(source, 'unreadable_folders', ()))
  if found.example is None:
    if found.tried < n:
      raise DataError(
        f'{name}: no usable clip among the first {found.tried} of {n} checked in '
        f'{max_seconds:g} s ({found.summary()}); fix or remove the bad files.'
      )
    raise DataError(
      f'{name}: no usable clip: all {n} clip(s) failed ({found.summary()}); fix or remove the '
      'bad files.'
    )
  if unreadable:
    logging.warning(
      '%s: %d subfolder(s) could not be listed and are not used: %s',
      name,
      len(unreadable),
      '; '.join(unreadable[:3]),
    )
  return {
    'source': name,
    'clips': n,
    'checked': found.tried,
    'skipped': skip_summary(found.skips),
    'unreadable_folders': unreadable,
  }


def skip_summary(batches_skipped: np.ndarray) -> dict[str, int]:
  """Names the per-reason counts of a `skipped` vector (or a sum of them)."""
  return {r: int(n) for r, n in zip(clips.SKIP_REASONS, np.asarray(batches_skipped))}


def per_host_batch_size(global_batch: int, process_count: int | None = None) -> int:
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch % process_count:
    raise ValueError(
      f'The global batch ({global_batch}) must be divisible by the number of JAX processes '
      f'({process_count}); change the batch size.'
    )
  return global_batch // process_count


def to_global_arrays(batch: dict, sharding: jax.sharding.NamedSharding) -> dict:
  """Assembles per-host numpy batches into global jax.Arrays sharded along the batch axis.

  Host-only fields (`skipped`) stay numpy on the host. Each device field's leading axis is the
  per-host batch; the global batch is that times the number of processes.
  """
  out = {}
  for key, value in batch.items():
    if key in HOST_FIELDS:
      continue
    spec = jax.sharding.PartitionSpec(sharding.spec[0], *([None] * (value.ndim - 1)))
    field_sharding = jax.sharding.NamedSharding(sharding.mesh, spec)
    out[key] = jax.make_array_from_process_local_data(field_sharding, value)
  return out
