"""Lists of clips to pack or train on: a folder scan, or a CSV / JSON Lines manifest.

Both give `Entry` objects: an absolute path, labels, an optional [start, end) window in seconds and
a clip id. Manifests are read strictly: an unknown column, a bad number or a duplicate id fails with
the manifest's name and line number, because a typo that silently drops labels or clips costs a
whole training run.

CSV (`.csv`, or `.tsv` with tabs) needs a header row with a `path` column; optional columns are
`label` or `labels` (several labels separated by ';'), `start`, `end` (seconds), `id` and `group`
(the source a clip comes from: a kit, speaker, recording or file family; evaluation splits keep
each group on one side, so a probe cannot match near duplicates):

    path,labels,start,end
    speech/a.flac,en;female,,
    music/long.wav,music,30,40

JSON Lines (`.jsonl`, `.ndjson`, `.json`: one object per line) takes the same keys; `labels` may be
a list or a ';'-separated string:

    {"path": "speech/a.flac", "labels": ["en", "female"]}
    {"path": "music/long.wav", "label": "music", "start": 30, "end": 40}

Relative paths resolve against the manifest's folder. Blank lines are skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import logging
import math
import os
from typing import Any, Iterable, MutableMapping

_logger = logging.getLogger(__name__)

# Extensions libsndfile decodes (WAV/AIFF families, FLAC, Ogg Vorbis/Opus, MP3 and the rarer
# formats it supports). Compared lower-case.
AUDIO_EXTENSIONS = frozenset(
  {
    '.aif', '.aifc', '.aiff', '.au', '.caf', '.flac', '.htk', '.mp3', '.oga', '.ogg', '.opus',
    '.paf', '.rf64', '.sd2', '.snd', '.svx', '.voc', '.w64', '.wav', '.wave', '.wve', '.xi',
  }
)  # fmt: skip

CSV_EXTENSIONS = {'.csv': ',', '.tsv': '\t'}
JSONL_EXTENSIONS = ('.jsonl', '.ndjson', '.json')
COLUMNS = ('path', 'label', 'labels', 'start', 'end', 'id', 'group')
LABEL_SEPARATOR = ';'


@dataclasses.dataclass(frozen=True)
class Entry:
  """One clip to read.

  Attributes:
    path: absolute path of the audio file.
    labels: zero or more labels.
    start: window start in seconds (None: the beginning of the file).
    end: window end in seconds, exclusive (None: the end of the file).
    clip_id: unique id; by default the path relative to the folder / manifest folder, plus
      '@start-end' for a window.
    group: the clip's source (kit, speaker, recording, file family) or None; clips of one group
      stay on the same side of every evaluation split.
  """

  path: str
  labels: tuple[str, ...] = ()
  start: float | None = None
  end: float | None = None
  clip_id: str = ''
  group: str | None = None


def scan_folder(
  root: str | os.PathLike,
  ignored: MutableMapping[str, int] | None = None,
  *,
  unreadable: list[str] | None = None,
) -> list[Entry]:
  """Every audio file under `root` (recursively), sorted by relative path.

  Symlinked folders are followed, except a link back to a folder being scanned (a loop), which is
  logged and not entered. Hidden files and folders (names starting with '.') are not visited.
  Files whose extension is not in AUDIO_EXTENSIONS are ignored but counted: the count is logged as
  a warning and, when `ignored` is given, added to it per extension ('' for none). A subfolder
  that cannot be listed (permission denied, ...) is logged as a warning and, when `unreadable` is
  given, appended to it as 'path: reason'. A file that cannot be examined (a broken link, a link
  loop) is listed by its extension like any file; loading it then names the problem.

  Raises:
    NotADirectoryError: if `root` is not a folder.
    OSError: if `root` itself cannot be listed.
  """
  root = os.path.abspath(os.fspath(root))
  if not os.path.isdir(root):
    raise NotADirectoryError(f'not a folder: {root}')
  counts: dict[str, int] = {}
  relpaths = []
  problems: list[str] = []
  loops: list[str] = []
  # Each folder to visit, with the real paths of the folders above it (to recognise a loop).
  stack = [(root, (os.path.realpath(root),))]
  while stack:
    folder, ancestors = stack.pop()
    try:
      with os.scandir(folder) as it:
        items = sorted(it, key=lambda d: d.name)
    except OSError as e:
      if folder == root:
        raise
      problems.append(f'{folder}: {_os_reason(e)}')
      continue
    for item in items:
      if item.name.startswith('.'):
        continue
      if _is_dir(item):  # follows symlinks
        real = os.path.realpath(item.path)
        if real in ancestors:
          loops.append(f'{item.path} -> {real}')
          continue
        stack.append((item.path, ancestors + (real,)))
        continue
      ext = os.path.splitext(item.name)[1].lower()
      if ext in AUDIO_EXTENSIONS:
        relpaths.append(os.path.relpath(item.path, root))
      else:
        counts[ext] = counts.get(ext, 0) + 1
  if counts:
    _logger.warning(
      'ignored %d non-audio file(s) under %s: %s',
      sum(counts.values()),
      root,
      ', '.join(f'{ext or "(no extension)"}: {n}' for ext, n in sorted(counts.items())),
    )
  if problems:
    _logger.warning(
      'could not list %d subfolder(s) under %s; their files are not included: %s',
      len(problems),
      root,
      '; '.join(problems[:5]) + (' ...' if len(problems) > 5 else ''),
    )
  if loops:
    _logger.warning(
      'not following %d symlinked folder(s) under %s that lead back to a folder above them '
      '(symlink loops): %s',
      len(loops),
      root,
      '; '.join(loops[:5]) + (' ...' if len(loops) > 5 else ''),
    )
  if ignored is not None:
    for ext, n in counts.items():
      ignored[ext] = ignored.get(ext, 0) + n
  if unreadable is not None:
    unreadable.extend(problems)
  # Sorting on the '/'-joined path makes the order the same on every OS and file system.
  keyed = sorted((p.replace(os.sep, '/'), p) for p in relpaths)
  return [Entry(path=os.path.join(root, p), clip_id=key) for key, p in keyed]


def _is_dir(item: os.DirEntry) -> bool:
  try:
    return item.is_dir()  # follows symlinks; a broken link or a loop is not a folder
  except OSError:
    return False


def _os_reason(e: OSError) -> str:
  if e.errno in (errno.EACCES, errno.EPERM):
    return 'permission denied'
  if e.errno == errno.ELOOP:
    return 'symlink loop'
  return e.strerror or str(e)


def read_manifest(path: str | os.PathLike) -> list[Entry]:
  """Reads a CSV/TSV or JSON Lines manifest (chosen by extension; see the module docstring).

  Raises:
    FileNotFoundError: if the manifest does not exist.
    ValueError: for an unsupported extension or any bad line; the message names the file and line.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f'manifest not found: {path}')
  ext = os.path.splitext(path)[1].lower()
  if ext in CSV_EXTENSIONS:
    rows = _csv_rows(path, CSV_EXTENSIONS[ext])
  elif ext in JSONL_EXTENSIONS:
    rows = _jsonl_rows(path)
  else:
    raise ValueError(
      f'{path}: unsupported manifest extension {ext!r}; use .csv, .tsv or .jsonl '
      '(or pass a folder to scan it)'
    )
  root = os.path.dirname(path)
  entries = []
  first_line: dict[str, int] = {}
  for line, fields in rows:
    entry = _entry(fields, root, f'{path}:{line}')
    if entry.clip_id in first_line:
      raise ValueError(
        f'{path}:{line}: duplicate id {entry.clip_id!r} (first on line '
        f'{first_line[entry.clip_id]}); give each row a unique id, or distinct start/end windows'
      )
    first_line[entry.clip_id] = line
    entries.append(entry)
  return entries


def read_entries(
  path_or_folder: str | os.PathLike,
  ignored: MutableMapping[str, int] | None = None,
  *,
  unreadable: list[str] | None = None,
) -> list[Entry]:
  """A folder is scanned (`scan_folder`, passing `ignored` and `unreadable`); a file is read as a
  manifest."""
  if os.path.isdir(path_or_folder):
    return scan_folder(path_or_folder, ignored, unreadable=unreadable)
  return read_manifest(path_or_folder)


def _csv_rows(path: str, delimiter: str) -> Iterable[tuple[int, dict[str, str]]]:
  # utf-8-sig drops the byte-order mark spreadsheet programs put in front of the header.
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.reader(f, delimiter=delimiter, strict=True)
    header = None
    try:
      for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
          continue
        if header is None:
          header = [c.strip() for c in row]
          _check_columns(header, f'{path}:{reader.line_num}')
          continue
        if len(row) != len(header):
          raise ValueError(
            f'{path}:{reader.line_num}: {len(row)} field(s), but the header has {len(header)} '
            f'({",".join(header)}); quote fields that contain "{delimiter}"'
          )
        yield reader.line_num, dict(zip(header, row, strict=True))
    except csv.Error as e:
      raise ValueError(f'{path}:{reader.line_num}: malformed CSV: {e}') from e
    if header is None:
      raise ValueError(f'{path}: empty manifest; expected a header row with a "path" column')


def _check_columns(header: list[str], where: str) -> None:
  unknown = [c for c in header if c not in COLUMNS]
  if unknown:
    raise ValueError(
      f'{where}: unknown column(s) {unknown}; valid columns: {list(COLUMNS)} '
      '(a header row is required)'
    )
  duplicated = sorted({c for c in header if header.count(c) > 1})
  if duplicated:
    raise ValueError(f'{where}: column(s) {duplicated} appear more than once')
  if 'path' not in header:
    raise ValueError(f'{where}: the header has no "path" column (a header row is required)')
  if 'label' in header and 'labels' in header:
    raise ValueError(f'{where}: use either a "label" or a "labels" column, not both')


def _jsonl_rows(path: str) -> Iterable[tuple[int, dict[str, Any]]]:
  with open(path, encoding='utf-8-sig') as f:
    for line_num, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f'{path}:{line_num}'
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: invalid JSON ({e}); expected one JSON object per line') from e
      if not isinstance(obj, dict):
        raise ValueError(f'{where}: expected a JSON object per line, got {type(obj).__name__}')
      _check_columns(list(obj), where)
      yield line_num, obj


def _entry(fields: dict[str, Any], root: str, where: str) -> Entry:
  raw_path = fields.get('path')
  if not isinstance(raw_path, str) or not raw_path.strip():
    raise ValueError(f'{where}: "path" must be a non-empty string, got {raw_path!r}')
  raw_path = raw_path.strip()
  labels = _labels(fields.get('labels', fields.get('label')), where)
  start = _seconds(fields.get('start'), 'start', where)
  end = _seconds(fields.get('end'), 'end', where)
  if end is not None and end <= (start or 0.0):
    raise ValueError(f'{where}: end={end} must be greater than start={start or 0.0}')
  full = os.path.normpath(os.path.join(root, os.path.expanduser(raw_path)))
  clip_id = fields.get('id')
  if clip_id is None or (isinstance(clip_id, str) and not clip_id.strip()):
    clip_id = os.path.relpath(full, root).replace(os.sep, '/')
    if start is not None or end is not None:
      clip_id += f'@{_format_seconds(start or 0.0)}-{"" if end is None else _format_seconds(end)}'
  elif not isinstance(clip_id, str):
    raise ValueError(f'{where}: "id" must be a string, got {clip_id!r}')
  group = fields.get('group')
  if group is not None and not isinstance(group, str):
    raise ValueError(f'{where}: "group" must be a string, got {group!r}')
  group = group.strip() if group and group.strip() else None
  return Entry(
    path=full, labels=labels, start=start, end=end, clip_id=clip_id.strip(), group=group
  )


def _labels(value: Any, where: str) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    parts = value.split(LABEL_SEPARATOR)
  elif isinstance(value, list) and all(isinstance(x, str) for x in value):
    parts = value
  else:
    raise ValueError(f'{where}: labels must be a string or a list of strings, got {value!r}')
  return tuple(p.strip() for p in parts if p.strip())


def _seconds(value: Any, key: str, where: str) -> float | None:
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  if isinstance(value, bool):
    raise ValueError(f'{where}: {key} must be a number of seconds, got {value!r}')
  try:
    seconds = float(value)
  except (TypeError, ValueError):
    raise ValueError(f'{where}: {key} must be a number of seconds, got {value!r}') from None
  if not math.isfinite(seconds) or seconds < 0:
    raise ValueError(f'{where}: {key} must be a finite number >= 0, got {value!r}')
  return seconds


def _format_seconds(seconds: float) -> str:
  """Shortest text that reads back as the same float ('30' for 30.0, '1.25', ...)."""
  text = repr(float(seconds))
  return text[:-2] if text.endswith('.0') else text
