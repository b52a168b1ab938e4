"""The grain input pipeline: a source of clips to per-host batches and global `jax.Array`s.

  source -> shuffle (reshuffled every epoch) -> repeat
  -> decode + validate + crop/pad (+ host log-mel), seeded per global position
  -> shard by JAX process (host p takes rows [p*b, (p+1)*b) of every global batch of P*b clips)
  -> to_iter_dataset -> batch with skip accounting -> worker-process prefetch
  -> make_array_from_process_local_data

Because crops are seeded by the global position and hosts take contiguous rows of each global batch,
the global batch is the same for any number of processes: a run on 2 hosts x 4 devices trains on
exactly the batches of a run on 1 host x 8 devices (as long as no clip is skipped; a skipped clip is
replaced by the host's next one).

Nothing is lost silently: a clip that cannot be used becomes a skip marker instead of an example, the
batcher counts markers per reason, and every batch carries `skipped` (counts since the previous batch
of the same worker). Summed over batches they give the exact number of clips skipped upstream of the
batches consumed, also with several worker processes. A finite stream ends with one host-only batch
({'skipped', 'unbatched'}) when skips or an incomplete batch remain after the last full batch, so
even the tail is accounted for. `strict=True` raises on the first bad clip
with its file name instead.

The iterator's state (`get_state` / `set_state`, JSON-serialisable) restores the exact stream.
"""

import dataclasses
import logging
from collections.abc import Sequence

import grain
import jax
import numpy as np
import soundfile as sf

from aasp_jax.audio import fbank_host
from aasp_jax.audio import presets as presets_lib
from aasp_jax.data import clips, records, sources

SKIP_KEY = '_skipped_reason'
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


class LoadClip(grain.transforms.RandomMap):
  """Decodes, validates and crops one element; returns an example or a skip marker."""

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

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    o = self.options
    sr = o.preset.sample_rate
    try:
      if 'record' in element:
        rec = records.decode_record(element['record'])
        wave, labels, where = rec['waveform'], rec['labels'], f'record {rec["id"]!r}'
        if rec['sample_rate'] != sr:
          raise ValueError(
            f'{where} was packed at {rec["sample_rate"]} Hz but the front end needs {sr} Hz; '
            're-pack with --sample_rate.'
          )
        clips.validate_waveform(wave, where, min_samples=o.min_samples, silence_rms=o.silence_rms)
      else:
        start, end = self._window(element, rng)
        wave, _ = clips.load_clip(
          element['path'], sr, start, end, min_samples=o.min_samples, silence_rms=o.silence_rms
        )
        labels, where = element['labels'], element['path']
    except clips.ClipSkipped as e:
      if o.strict:
        raise
      return {SKIP_KEY: e.reason}
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
    self._reason_index = {r: i for i, r in enumerate(clips.SKIP_REASONS)}

  def __next__(self) -> dict:
    examples = []
    skipped = np.zeros(len(clips.SKIP_REASONS), np.int64)
    while len(examples) < self._batch_size:
      try:
        element = next(self._parent)
      except StopIteration:
        break
      if SKIP_KEY in element:
        skipped[self._reason_index[element[SKIP_KEY]]] += 1
      else:
        examples.append(element)
    if len(examples) == self._batch_size or (examples and not self._drop_remainder):
      batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
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


def make_dataset(
  source,
  options: PipelineOptions,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.IterDataset:
  """Builds the per-host dataset of batches. `source` is a path or a grain-compatible source."""
  if isinstance(source, str):
    source = sources.open_source(source)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  ds = grain.MapDataset.source(source)
  if options.shuffle:
    # Shuffling before repeat reshuffles every epoch (grain combines the seed with the epoch).
    ds = ds.shuffle(seed=options.seed)
  ds = ds.repeat(options.num_epochs)
  # Seeded by the global position (before the host split), so a clip gets the same crop whatever
  # the number of processes.
  ds = ds.random_map(LoadClip(options), seed=options.seed + 1)
  ds = HostRowsOfGlobalBatches(ds, process_index, process_count, options.batch_size)
  read_options = grain.ReadOptions(
    num_threads=options.read_threads, prefetch_buffer_size=options.read_buffer_size
  )
  ds = SkipAccountingBatch(
    ds.to_iter_dataset(read_options), options.batch_size, options.drop_remainder
  )
  if options.num_workers > 0:
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=options.num_workers, per_worker_buffer_size=options.worker_buffer_size
      )
    )
  return ds


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
