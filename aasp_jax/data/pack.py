"""`aasp-data pack`: decode a folder or manifest of audio into ArrayRecord shards of clip records.

Reading millions of small files from a bucket is too slow for training, so clips are decoded once
(resampled, averaged to mono, validated by `clips.load_clip`), encoded as `records` (FLAC or int16
PCM) and written into N shards that grain reads with random access.

Nothing is lost without a trace:
  * every entry is either packed or skipped under a named reason, and the report checks
    `entries_in == packed + skipped_total`; `skipped.csv` lists each skipped file and why;
  * resampled, downmixed, split and clipped clips are counted in the report;
  * a file longer than `max_seconds` is split into the fewest pieces of at most `max_seconds`, all
    of equal length (to a frame), so no piece is a tiny tail; piece k has id '<id>#k'.

Entry i (in the source's sorted order) goes to shard i % N, and records keep entry order within a
shard, so a pack is deterministic. `clip_ids.txt` lists the record ids in shard order: line k is
record k of `grain.sources.ArrayRecordDataSource(list_shards(out_dir))`.

Interrupted packs resume: a shard is written under a '.partial' name, renamed when complete, and
then a marker `done/<shard>.json` records its ids and counts. Re-running the same command keeps the
complete shards and redoes the rest; the final report covers all shards. A different command line
(codec, shards, rate, source contents, ...) on a non-empty OUT_DIR fails instead of mixing packs.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader
from array_record.python.array_record_module import ArrayRecordWriter
from rich import console as rich_console
from rich import progress as rich_progress
from rich import text as rich_text

from aasp_jax.data import clips
from aasp_jax.data import manifest
from aasp_jax.data import records

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = 'pack_config.json'
REPORT_FILE = 'pack_report.json'
IDS_FILE = 'clip_ids.txt'
SKIPPED_FILE = 'skipped.csv'
DONE_DIR = 'done'
SHARD_PATTERN = 'clips-{index:05d}-of-{count:05d}.array_record'

# grain reads one record at a time, so each record is its own group (grain warns otherwise). FLAC
# is already compressed. PCM16 is the fast-read codec: zstd saved only ~9% on real speech (the
# Asterisk prompts) but cost ~1 ms a 10 s clip to decompress, a third of the read path.
WRITER_OPTIONS = {'flac': 'group_size:1,uncompressed', 'pcm16': 'group_size:1,uncompressed'}


class PackError(Exception):
  """The pack cannot start or continue; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class PackConfig:
  """What `aasp-data pack` does. The fields in `_FINGERPRINT_FIELDS` must match on resume.

  Attributes:
    source: a folder (scanned recursively) or a CSV / JSON Lines manifest.
    out_dir: output folder; created if missing.
    num_shards: number of ArrayRecord shards.
    workers: decoding processes; 1 decodes in this process.
    codec: 'flac' or 'pcm16' (see `records`).
    sample_rate: rate of the packed clips, Hz.
    max_seconds: longer files are split into pieces of at most this length.
    strict: raise on the first skipped clip instead of counting it.
    min_samples: clips shorter than this after resampling are skipped as 'too_short'.
    silence_rms: clips quieter than this are skipped as 'silent'.
  """

  source: str
  out_dir: str
  num_shards: int
  workers: int = 1
  codec: str = 'flac'
  sample_rate: int = 16000
  max_seconds: float = 120.0
  strict: bool = False
  min_samples: int = clips.DEFAULT_MIN_SAMPLES
  silence_rms: float = clips.DEFAULT_SILENCE_RMS

  def __post_init__(self):
    if self.num_shards < 1:
      raise ValueError(f'--shards must be >= 1, got {self.num_shards}')
    if self.workers < 1:
      raise ValueError(f'--workers must be >= 1, got {self.workers}')
    if self.codec not in records.CODECS:
      raise ValueError(f'--codec must be one of {records.CODECS}, got {self.codec!r}')
    if self.sample_rate <= 0:
      raise ValueError(f'--sample_rate must be positive, got {self.sample_rate}')
    if not self.max_seconds * self.sample_rate >= 2 * max(self.min_samples, 1):
      # Pieces of a split file are at least max_seconds / 2 long; they must pass min_samples.
      raise ValueError(
        f'--max_seconds={self.max_seconds} is too short: it must hold at least twice '
        f'min_samples={self.min_samples} samples at {self.sample_rate} Hz'
      )


_FINGERPRINT_FIELDS = (
  'num_shards',
  'codec',
  'sample_rate',
  'max_seconds',
  'min_samples',
  'silence_rms',
)


@dataclasses.dataclass(frozen=True)
class _Settings:
  """The part of PackConfig a worker needs (small: it travels with every task)."""

  codec: str
  sample_rate: int
  max_seconds: float
  min_samples: int
  silence_rms: float


@dataclasses.dataclass
class _Result:
  """What a worker sends back for one entry: its encoded records, or why it was skipped."""

  records: list[tuple[str, bytes]]
  seconds: float = 0.0
  handled: tuple[str, ...] = ()
  skip: clips.ClipSkipped | None = None


def shard_name(index: int, count: int) -> str:
  return SHARD_PATTERN.format(index=index, count=count)


def list_shards(out_dir: str | os.PathLike) -> list[str]:
  """Paths of a complete pack's shards, in shard order (for grain's ArrayRecordDataSource).

  Raises:
    PackError: if `out_dir` holds no finished pack.
  """
  out_dir = os.fspath(out_dir)
  report_path = os.path.join(out_dir, REPORT_FILE)
  if not os.path.isfile(report_path):
    raise PackError(
      f'{out_dir} is not a finished pack ({REPORT_FILE} is missing); run `aasp-data pack` into '
      'it, or re-run the same command to finish an interrupted pack'
    )
  with open(report_path) as f:
    report = json.load(f)
  return [os.path.join(out_dir, name) for name in report['shard_files']]


def pack(
  config: PackConfig,
  *,
  progress: bool = True,
  on_shard_done: Callable[[int], None] | None = None,
) -> dict[str, Any]:
  """Packs `config.source` into `config.out_dir`, resuming a previous run of the same command.

  Args:
    config: what to pack and how.
    progress: show a progress bar (count, clips/s, ETA) on stderr.
    on_shard_done: called with the shard index after each shard is complete on disk.

  Returns:
    The report also written to `pack_report.json`.

  Raises:
    PackError: if the source is missing or empty, out_dir holds a different pack, or no entry
      could be packed (the pack and its report are written first, naming every skipped file).
    clips.ClipSkipped: in strict mode, for the first clip that would be skipped.
  """
  t0 = time.perf_counter()
  ignored: dict[str, int] = {}
  unreadable: list[str] = []
  if not os.path.exists(config.source):
    raise PackError(
      f'{config.source} does not exist; give a folder of audio or a .csv/.tsv/.jsonl manifest'
    )
  try:
    entries = manifest.read_entries(config.source, ignored, unreadable=unreadable)
  except PermissionError:
    raise PackError(f'{config.source}: permission denied; fix its permissions') from None
  if not entries:
    raise PackError(
      f'no audio entries in {config.source} (ignored non-audio files: {ignored}'
      + (f'; unreadable subfolders: {unreadable}' if unreadable else '')
      + ')'
    )
  out_dir = config.out_dir
  fingerprint = _fingerprint(config, entries)
  _claim_out_dir(out_dir, fingerprint)

  n = config.num_shards
  pending = [s for s in range(n) if _load_marker(out_dir, s, n) is None]
  reused = n - len(pending)
  if reused:
    _logger.info('resuming: %d of %d shards are complete and kept', reused, n)
  settings = _Settings(
    config.codec, config.sample_rate, config.max_seconds, config.min_samples, config.silence_rms
  )
  tasks = [(entries[i], settings) for s in pending for i in range(s, len(entries), n)]
  with ProgressBar(len(tasks), 'packing', enabled=progress) as advance:
    with _ResultStream(tasks, config.workers) as results:
      for s in pending:
        _write_shard(out_dir, s, n, entries, results, config, advance)
        if on_shard_done is not None:
          on_shard_done(s)

  report = _finish(out_dir, config, entries, ignored, fingerprint)
  report['unreadable_folders'] = unreadable
  report['wall_seconds'] = round(time.perf_counter() - t0, 3)
  report['shards_reused'] = reused
  _write_json(os.path.join(out_dir, REPORT_FILE), report)
  if report['packed'] == 0:
    raise PackError(_nothing_packed(report, config))
  return report


def _nothing_packed(report: dict[str, Any], config: PackConfig) -> str:
  """Why a pack holds no record: the skip counts, the first skipped file, and a hint for
  manifest paths written relative to the current directory instead of the manifest's folder."""
  skipped = ', '.join(f'{k} {v}' for k, v in report['skipped'].items() if v)
  with open(os.path.join(report['out_dir'], SKIPPED_FILE), newline='') as f:
    first = next(csv.DictReader(f), None)
  example = ''
  if first is not None:
    detail = ' '.join(first['detail'].split())
    example = f'; e.g. {first["path"]}: {first["reason"]} ({detail})'
    if first['reason'] == 'missing' and os.path.isfile(config.source):
      root = os.path.dirname(os.path.abspath(config.source))
      relative = os.path.relpath(first['path'], root)
      if os.path.exists(relative):
        example += (
          f'; {relative} exists relative to the current folder, but manifest paths resolve '
          f'against the manifest\'s folder {root}: write them relative to it, or absolute'
        )
  return (
    f'packed 0 of {report["entries_in"]} entries (skipped: {skipped}{example}); every skipped '
    f'file and why is in {os.path.join(report["out_dir"], SKIPPED_FILE)}; fix the source and '
    'pack into a new folder'
  )


def format_summary(report: dict[str, Any]) -> str:
  """A few human-readable lines about a pack report."""
  skipped = ', '.join(f'{k} {v}' for k, v in report['skipped'].items() if v) or 'none'
  handled = ', '.join(f'{k} {v}' for k, v in report['handled'].items() if v) or 'none'
  lines = [
    f'packed {report["packed"]} of {report["entries_in"]} entries into {report["records"]} records '
    f'({report["seconds_of_audio"] / 3600:.2f} h at {report["sample_rate"]} Hz, {report["codec"]}) '
    f'in {report["shards"]} shards under {report["out_dir"]}',
    f'skipped {report["skipped_total"]}: {skipped} (see {SKIPPED_FILE})',
    f'handled: {handled}',
    f'entries_in == packed + skipped_total: {report["entries_in"]} == {report["packed"]} + '
    f'{report["skipped_total"]} ({"ok" if report["counts_add_up"] else "MISMATCH"})',
    f'wall time {report["wall_seconds"]:.1f} s ({report["shards_reused"]} shards reused)',
  ]
  if report.get('ignored_non_audio'):
    lines.append(f'ignored non-audio files by extension: {report["ignored_non_audio"]}')
  if report.get('unreadable_folders'):
    lines.append(
      f'{len(report["unreadable_folders"])} subfolder(s) could not be listed and were not packed: '
      + '; '.join(report['unreadable_folders'])
    )
  return '\n'.join(lines)


# --- Workers -------------------------------------------------------------------------------------


def _pack_entry(task: tuple[manifest.Entry, _Settings]) -> _Result:
  """Decodes and encodes one entry (runs in a worker process)."""
  entry, s = task
  try:
    pieces, info = _read_pieces(entry, s)
  except clips.ClipSkipped as e:
    return _Result(records=[], skip=e)
  except Exception as e:
    # Anything else is a bug or an environment problem, not a property of the clip: stop, naming it.
    raise RuntimeError(f'packing {entry.path} failed unexpectedly: {e!r}') from e
  handled = list(info.handled())
  if len(pieces) > 1:
    handled.append('split_long')
  out, seconds, clipped = [], 0.0, False
  for k, (start, wave) in enumerate(pieces):
    clip_id = entry.clip_id if len(pieces) == 1 else f'{entry.clip_id}#{k}'
    clipped = clipped or records.count_clipped(wave) > 0
    data = records.encode_record(
      clip_id, wave, s.sample_rate, entry.labels, s.codec, source=entry.path, start=start
    )
    out.append((clip_id, data))
    seconds += wave.shape[0] / s.sample_rate
  if clipped:
    handled.append('clipped')
  return _Result(records=out, seconds=seconds, handled=tuple(handled))


def _read_pieces(
  entry: manifest.Entry, s: _Settings
) -> tuple[list[tuple[float, np.ndarray]], clips.ClipInfo]:
  """The entry's waveform as [(start seconds, wave)], split if longer than max_seconds.

  Each piece is decoded on its own (by seeking), so a multi-hour file never sits in memory whole.
  The silence check covers the whole entry, as if it were one clip; a split entry cannot be
  'too_short' (pieces are at least max_seconds / 2 long).
  """
  offset = entry.start or 0.0
  kwargs = dict(min_samples=s.min_samples, silence_rms=s.silence_rms)
  source = clips.probe_clip(entry.path)
  first = int(round(offset * source.sample_rate))
  stop = source.frames
  if entry.end is not None:
    stop = min(stop, int(round(entry.end * source.sample_rate)))
  max_frames = int(s.max_seconds * source.sample_rate)
  num_pieces = max(1, math.ceil((stop - first) / max_frames))
  if num_pieces == 1:
    wave, info = clips.load_clip(entry.path, s.sample_rate, entry.start, entry.end, **kwargs)
    return [(offset, wave)], info

  pieces, moments, info = [], [], None
  n = stop - first
  for k in range(num_pieces):
    a = first + k * n // num_pieces
    b = first + (k + 1) * n // num_pieces
    start = a / source.sample_rate
    # Silence is judged on the whole entry below; NaN/Inf still reject it from any piece.
    wave, info = clips.load_clip(
      entry.path, s.sample_rate, start, b / source.sample_rate, min_samples=0, silence_rms=0.0
    )
    pieces.append((start, wave))
    moments.append(_moments(wave))
  rms = _combined_std(moments)
  if s.silence_rms > 0 and rms < s.silence_rms:
    raise clips.ClipSkipped(
      'silent', entry.path, f'RMS {rms:.3g} is below silence_rms={s.silence_rms:g}'
    )
  info = dataclasses.replace(info, num_samples=sum(w.shape[0] for _, w in pieces))
  return pieces, info


def _moments(wave: np.ndarray) -> tuple[int, float, float]:
  """(count, mean, sum of squared deviations) in float64, for Chan's pairwise combination."""
  mean = float(np.mean(wave, dtype=np.float64))
  return wave.shape[0], mean, float(np.sum(np.square(wave - mean, dtype=np.float64)))


def _combined_std(moments: Sequence[tuple[int, float, float]]) -> float:
  n, mean, m2 = 0, 0.0, 0.0
  for nb, mb, m2b in moments:
    total = n + nb
    delta = mb - mean
    mean += delta * nb / total
    m2 += m2b + delta * delta * n * nb / total
    n = total
  return math.sqrt(m2 / n) if n else 0.0


class _ResultStream:
  """Context manager yielding an iterator of `_Result`s in task order (a process pool or inline)."""

  def __init__(self, tasks: list, workers: int):
    self._tasks = tasks
    self._workers = min(workers, max(1, len(tasks)))
    self._pool = None

  def __enter__(self) -> Iterator[_Result]:
    if self._workers <= 1 or not self._tasks:
      return map(_pack_entry, self._tasks)
    # spawn: workers start clean, never sharing a forked copy of the parent's threads or JAX state.
    self._pool = multiprocessing.get_context('spawn').Pool(self._workers)
    chunk = max(1, min(16, len(self._tasks) // (8 * self._workers)))
    return self._pool.imap(_pack_entry, self._tasks, chunksize=chunk)

  def __exit__(self, exc_type, exc, tb):
    if self._pool is not None:
      if exc_type is None:
        self._pool.close()
      else:
        self._pool.terminate()
      self._pool.join()
    return False


# --- Shards and markers --------------------------------------------------------------------------


def _write_shard(out_dir, s, n, entries, results, config, advance) -> None:
  """Writes shard `s` from the next results, then renames it into place and writes its marker."""
  path = os.path.join(out_dir, shard_name(s, n))
  partial = path + '.partial'
  ids, skipped_rows = [], []
  skipped = clips.SkipCounter()
  handled = clips.SkipCounter(clips.HANDLED)
  packed, seconds, num_entries = 0, 0.0, 0
  writer = ArrayRecordWriter(partial, WRITER_OPTIONS[config.codec])
  try:
    for i in range(s, len(entries), n):
      result = next(results)
      num_entries += 1
      if result.skip is not None:
        if config.strict:
          raise result.skip
        skipped.add(result.skip.reason)
        skipped_rows.append(
          [entries[i].path, result.skip.reason, result.skip.detail, entries[i].clip_id]
        )
      else:
        for clip_id, data in result.records:
          writer.write(data)
          ids.append(clip_id)
        packed += 1
        seconds += result.seconds
        for name in result.handled:
          handled.add(name)
      advance()
  finally:
    writer.close()
  os.replace(partial, path)
  marker = {
    'shard': s,
    'num_shards': n,
    'file': os.path.basename(path),
    'records': len(ids),
    'entries': num_entries,
    'packed': packed,
    'skipped': skipped.as_dict(),
    'handled': handled.as_dict(),
    'seconds': seconds,
    'bytes': os.path.getsize(path),
    'ids': ids,
    'skipped_rows': skipped_rows,
  }
  os.makedirs(os.path.join(out_dir, DONE_DIR), exist_ok=True)
  _write_json(_marker_path(out_dir, s, n), marker)


def _marker_path(out_dir: str, s: int, n: int) -> str:
  return os.path.join(out_dir, DONE_DIR, shard_name(s, n) + '.json')


def _load_marker(out_dir: str, s: int, n: int) -> dict[str, Any] | None:
  """The marker of a complete shard, or None if the shard must be (re)written."""
  try:
    with open(_marker_path(out_dir, s, n)) as f:
      marker = json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None
  path = os.path.join(out_dir, shard_name(s, n))
  if not os.path.isfile(path) or os.path.getsize(path) != marker.get('bytes'):
    return None
  reader = ArrayRecordReader(path)
  try:
    complete = reader.num_records() == marker.get('records')
  finally:
    reader.close()
  return marker if complete else None


def _fingerprint(config: PackConfig, entries: list[manifest.Entry]) -> dict[str, Any]:
  """Everything that determines the pack's content; a resumed run must match it exactly."""
  digest = hashlib.sha256()
  for e in entries:
    digest.update(json.dumps(dataclasses.astuple(e)).encode())
    digest.update(b'\n')
  fp = {'format_version': FORMAT_VERSION, 'source': os.path.abspath(config.source)}
  fp.update({k: getattr(config, k) for k in _FINGERPRINT_FIELDS})
  fp.update({'entries_in': len(entries), 'entries_sha256': digest.hexdigest()})
  return fp


def _claim_out_dir(out_dir: str, fingerprint: dict[str, Any]) -> None:
  """Creates out_dir, or checks that it holds (part of) the same pack."""
  config_path = os.path.join(out_dir, CONFIG_FILE)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not os.path.isfile(config_path):
      raise PackError(
        f'{out_dir} is not empty and holds no {CONFIG_FILE}; pack into a new or empty folder'
      )
    with open(config_path) as f:
      previous = json.load(f)
    if previous != fingerprint:
      diffs = [
        f'{k}: {previous.get(k)!r} there, {fingerprint.get(k)!r} now'
        for k in sorted(set(previous) | set(fingerprint))
        if previous.get(k) != fingerprint.get(k)
      ]
      raise PackError(
        f'{out_dir} holds a different pack ({"; ".join(diffs)}); re-run its original command to '
        'resume it, or pack into a new folder'
      )
    return
  os.makedirs(out_dir, exist_ok=True)
  _write_json(config_path, fingerprint)


def _finish(out_dir, config, entries, ignored, fingerprint) -> dict[str, Any]:
  """Merges the shard markers into clip_ids.txt, skipped.csv and the report."""
  n = config.num_shards
  markers = []
  for s in range(n):
    marker = _load_marker(out_dir, s, n)
    if marker is None:
      raise PackError(f'shard {s} of {out_dir} is not complete after packing; re-run the command')
    markers.append(marker)
  skipped = clips.SkipCounter()
  handled = clips.SkipCounter(clips.HANDLED)
  seen: set[str] = set()
  for m in markers:
    skipped.update(m['skipped'])
    handled.update(m['handled'])
    for clip_id in m['ids']:
      if clip_id in seen:
        # Entry ids are unique, but an entry named like a piece ('x#1') can meet a split 'x'.
        raise PackError(f'two records of {out_dir} have the id {clip_id!r}; rename that entry')
      seen.add(clip_id)
  with open(os.path.join(out_dir, IDS_FILE) + '.partial', 'w') as f:
    for m in markers:
      f.writelines(f'{clip_id}\n' for clip_id in m['ids'])
  os.replace(os.path.join(out_dir, IDS_FILE) + '.partial', os.path.join(out_dir, IDS_FILE))
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator='\n')
  writer.writerow(['path', 'reason', 'detail', 'id'])
  for m in markers:
    writer.writerows(m['skipped_rows'])
  _write_text(os.path.join(out_dir, SKIPPED_FILE), buf.getvalue())

  packed = sum(m['packed'] for m in markers)
  report = {
    'format_version': FORMAT_VERSION,
    'source': fingerprint['source'],
    'out_dir': os.path.abspath(out_dir),
    'entries_in': len(entries),
    'packed': packed,
    'records': sum(m['records'] for m in markers),
    'skipped_total': skipped.total,
    'skipped': skipped.as_dict(),
    'handled': handled.as_dict(),
    'ignored_non_audio': dict(sorted(ignored.items())),
    'shards': n,
    'shard_files': [m['file'] for m in markers],
    'records_per_shard': [m['records'] for m in markers],
    'codec': config.codec,
    'sample_rate': config.sample_rate,
    'max_seconds': config.max_seconds,
    'seconds_of_audio': round(sum(m['seconds'] for m in markers), 3),
    'bytes': sum(m['bytes'] for m in markers),
    'counts_add_up': len(entries) == packed + skipped.total,
  }
  # A mismatch means an entry was lost between workers and shards: a bug, never a data problem.
  if sum(m['entries'] for m in markers) != len(entries) or not report['counts_add_up']:
    raise PackError(
      f'count mismatch in {out_dir}: {len(entries)} entries in, {packed} packed + '
      f'{skipped.total} skipped; this is a bug in aasp-data pack'
    )
  return report


def _write_text(path: str, text: str) -> None:
  """Writes via a temporary name so a crash never leaves a half-written file under `path`."""
  with open(path + '.partial', 'w') as f:
    f.write(text)
  os.replace(path + '.partial', path)


def _write_json(path: str, obj: Any) -> None:
  _write_text(path, json.dumps(obj, indent=1) + '\n')


# --- Progress ------------------------------------------------------------------------------------


class _RateColumn(rich_progress.ProgressColumn):
  """Items per second (rich's own speed column speaks in bytes)."""

  def __init__(self, unit: str):
    super().__init__()
    self._unit = unit

  def render(self, task) -> rich_text.Text:
    speed = task.finished_speed or task.speed
    return rich_text.Text('-' if speed is None else f'{speed:.1f} {self._unit}/s')


class ProgressBar:
  """A progress bar (count, rate, elapsed, ETA) on stderr: `with ProgressBar(n, 'x') as advance:`.

  Disabled, it costs nothing, so callers need no second code path for tests and pipes.
  """

  def __init__(self, total: int, what: str, enabled: bool = True, unit: str = 'clips'):
    self._total, self._what, self._enabled, self._unit = total, what, enabled, unit
    self._progress = None

  def __enter__(self) -> Callable[[], None]:
    if not self._enabled:
      return lambda: None
    self._progress = rich_progress.Progress(
      rich_progress.TextColumn('{task.description}'),
      rich_progress.BarColumn(),
      rich_progress.MofNCompleteColumn(),
      _RateColumn(self._unit),
      rich_progress.TimeElapsedColumn(),
      rich_progress.TextColumn('ETA'),
      rich_progress.TimeRemainingColumn(),
      console=rich_console.Console(file=sys.stderr),
    )
    self._progress.start()
    task = self._progress.add_task(self._what, total=self._total)
    return lambda: self._progress.advance(task)

  def __exit__(self, *exc):
    if self._progress is not None:
      self._progress.stop()
    return False
