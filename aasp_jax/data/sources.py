"""Random-access grain sources: audio files (a folder or a manifest) and packed ArrayRecord shards.

A data spec (`data.train`, `make_dataset`, `check_source`) is one of, or a list of:

  * a folder of audio files, scanned recursively (symlinked folders are followed);
  * a CSV / TSV / JSON Lines manifest (relative paths resolve against the manifest's folder);
  * a folder written by `aasp-data pack` (refused while unfinished);
  * ArrayRecord shard files, or a glob of them ('packs/demo/clips-*.array_record'); a glob may
    also match folders and manifests.

A list is a Python list/tuple or a comma-separated string (config values are strings); its parts
are concatenated into one source, in the order given (a glob's matches in sorted order).

`gs://` paths are refused with a one-line error: a manifest, a pack's report or an audio file cannot
be read from a bucket without a file system, so buckets are mounted with Cloud Storage FUSE (the
TPU launchers do it under /gcs/BUCKET) and the mounted path is given instead.

Elements are light, picklable dicts (paths or encoded bytes); decoding happens later in the
pipeline's worker processes, never in the training process. Every problem with the spec itself is
a `DataError`: one line naming the path and what to do.
"""

import bisect
import errno
import glob
import json
import os
from collections.abc import Sequence

import grain

from aasp_jax import configuration
from aasp_jax.data import manifest, pack

SHARD_SUFFIX = '.array_record'
SHARD_PATTERN = '*' + SHARD_SUFFIX
GCS_MOUNT_ROOT = '/gcs'  # where launch/tpu_vm.sh and launch/xpk.sh mount --data-bucket
_GLOB_CHARS = frozenset('*?[')
_KINDS = 'a folder of audio, a manifest (.csv/.tsv/.jsonl), a pack folder, shard files or a glob'


class DataError(configuration.ConfigError):
  """The data cannot be used as given; the one-line message names the source and what to do."""


class EntrySource:
  """Files listed by a manifest or found in a folder: element = {'index', 'path', 'labels', ...}.

  Attributes:
    name: what error messages call the source.
    unreadable_folders: subfolders a folder scan could not list ('path: reason').
  """

  def __init__(
    self,
    entries: Sequence[manifest.Entry],
    name: str = 'the audio source',
    unreadable_folders: Sequence[str] = (),
  ):
    if not entries:
      raise DataError(f'{name}: no manifest rows or audio files were found; check the path.')
    self._entries = tuple(entries)
    self.name = name
    self.unreadable_folders = tuple(unreadable_folders)

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, index: int) -> dict:
    e = self._entries[index]
    return {
      'index': int(index),
      'id': e.clip_id,
      'path': e.path,
      'labels': tuple(e.labels),
      'start': e.start,
      'end': e.end,
    }

  def __repr__(self) -> str:
    return f'EntrySource({len(self)} files)'


class RecordSource:
  """Packed clips in ArrayRecord shards (`aasp-data pack`): element = {'index', 'record': bytes}."""

  def __init__(self, shard_paths: Sequence[str], name: str | None = None):
    if not shard_paths:
      raise DataError(f'{name or "the record source"}: no ArrayRecord shards given.')
    self._paths = tuple(shard_paths)  # shard order = the pack's clip_ids.txt order
    folder = os.path.dirname(self._paths[0])
    self.name = name or (self._paths[0] if len(self._paths) == 1 else folder)
    self.unreadable_folders = ()
    try:
      self._source = grain.sources.ArrayRecordDataSource(list(self._paths))
    except (RuntimeError, OSError, ValueError) as e:
      detail = ' '.join(str(e).split())
      raise DataError(
        f'{self.name}: cannot open its ArrayRecord shards ({detail}); re-pack with aasp-data pack.'
      ) from None

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return {'index': int(index), 'record': self._source[index], 'where': self.name}

  def __getstate__(self):
    # Readers hold file handles; worker processes reopen the shards themselves.
    return {'paths': self._paths, 'name': self.name}

  def __setstate__(self, state):
    self.__init__(state['paths'], state['name'])

  def __repr__(self) -> str:
    return f'RecordSource({len(self._paths)} shards)'


class ConcatSource:
  """Several sources as one: element i of the concatenation, with 'index' = i."""

  def __init__(self, parts: Sequence, name: str = 'the data sources'):
    self._parts = tuple(parts)
    self._offsets = [0]
    for part in self._parts:
      self._offsets.append(self._offsets[-1] + len(part))
    self.name = name
    self.unreadable_folders = tuple(
      f for part in self._parts for f in getattr(part, 'unreadable_folders', ())
    )

  def __len__(self) -> int:
    return self._offsets[-1]

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(f'index {index} out of range for {len(self)} elements')
    k = bisect.bisect_right(self._offsets, index) - 1
    element = dict(self._parts[k][index - self._offsets[k]])
    element['index'] = int(index)
    return element

  def __repr__(self) -> str:
    return f'ConcatSource({", ".join(map(repr, self._parts))})'


def spec_paths(spec) -> list[str]:
  """The parts of a data spec: a path, a comma-separated string of them, or a list/tuple of them."""
  if isinstance(spec, os.PathLike):
    spec = os.fspath(spec)
  if isinstance(spec, str):
    text = spec.strip()
    # A path that exists keeps its commas; anything else with commas is a list.
    parts = [text] if os.path.exists(text) else text.split(',')
  elif isinstance(spec, (list, tuple)):
    parts = []
    for item in spec:
      if not isinstance(item, (str, os.PathLike)):
        raise DataError(f'data source list item {item!r} is not a path; give paths or globs.')
      parts.append(os.fspath(item))
  else:
    raise DataError(
      f'data source {spec!r} is not a path, a comma-separated string or a list of paths.'
    )
  parts = [p.strip() for p in parts if p.strip()]
  if not parts:
    raise DataError(f'no data source given ({spec!r}); give {_KINDS}.')
  return parts


def describe(spec) -> str:
  """What messages call a spec: its paths joined by commas, or a source object's name."""
  if isinstance(spec, (str, os.PathLike, list, tuple)):
    try:
      return ','.join(spec_paths(spec))
    except DataError:
      return repr(spec)
  return getattr(spec, 'name', repr(spec))


def open_source(spec):
  """Opens a data spec (see the module docstring) as one random-access source.

  Raises:
    DataError: for a missing, unreadable or empty path, an unfinished or empty pack, a glob that
      matches nothing, a bad manifest or a gs:// path; one line naming the path and what to do.
  """
  parts = [src for path in spec_paths(spec) for src in _open_one(path)]
  if len(parts) == 1:
    return parts[0]
  return ConcatSource(parts, name=describe(spec))


def _open_one(path: str) -> list:
  if '://' in path:
    if path.startswith('gs://'):
      bucket, _, rest = path[len('gs://') :].partition('/')
      raise DataError(
        f'{path}: gs:// paths are not read directly; mount the bucket with Cloud Storage FUSE '
        f'(launch/tpu_vm.sh and launch/xpk.sh do it with --data-bucket={bucket}) and give the '
        f'mounted path {GCS_MOUNT_ROOT}/{bucket}/{rest}.'
      )
    raise DataError(f'{path}: URLs are not supported; give a local or mounted path ({_KINDS}).')
  path = os.path.expanduser(path)
  if _GLOB_CHARS & set(path) and not os.path.lexists(path):
    matches = sorted(glob.glob(path, recursive=True))
    if not matches:
      raise DataError(
        f'{path}: the pattern matches no file; check the folder and the pattern (pack shards '
        f'are named {pack.shard_name(0, 64)} ... {pack.shard_name(63, 64)}).'
      )
    return _open_matches(path, matches)
  return [_open_path(path)]


def _open_matches(pattern: str, matches: list[str]) -> list:
  """Consecutive shard files become one RecordSource; folders and manifests open on their own."""
  opened, shards = [], []
  for match in matches + [None]:
    if match is not None and match.endswith(SHARD_SUFFIX) and os.path.isfile(match):
      shards.append(match)
      continue
    if shards:
      for folder in sorted({os.path.dirname(s) for s in shards}):
        _refuse_unfinished_pack(folder)
      opened.append(RecordSource(shards, name=pattern))
      shards = []
    if match is not None:
      opened.append(_open_path(match))
  return opened


def _refuse_unfinished_pack(folder: str) -> None:
  config = os.path.join(folder, pack.CONFIG_FILE)
  if os.path.isfile(config) and not os.path.isfile(os.path.join(folder, pack.REPORT_FILE)):
    raise DataError(
      f'{folder} is an unfinished pack ({pack.REPORT_FILE} is missing); re-run its '
      '`aasp-data pack` command to finish it before training on its shards.'
    )


def _open_path(path: str):
  _check_path(path)
  if os.path.isdir(path):
    try:
      names = os.listdir(path)
    except OSError as e:
      raise DataError(f'{path}: cannot list the folder ({_reason(e)}).') from None
    if pack.CONFIG_FILE in names or pack.REPORT_FILE in names:
      return _open_pack(path)
    shards = sorted(n for n in names if n.endswith(SHARD_SUFFIX))
    if shards:  # shard files without a pack's bookkeeping, e.g. copied on their own
      return RecordSource([os.path.join(path, n) for n in shards], name=path)
    unreadable: list[str] = []
    ignored: dict[str, int] = {}
    try:
      entries = manifest.scan_folder(path, ignored, unreadable=unreadable)
    except OSError as e:
      raise DataError(f'{path}: cannot scan the folder ({_reason(e)}).') from None
    if not entries:
      found = ', '.join(f'{ext or "(no extension)"}: {n}' for ext, n in sorted(ignored.items()))
      raise DataError(
        f'{path}: no audio files found (non-audio files: {found or "none"}'
        + (f'; unreadable subfolders: {len(unreadable)}' if unreadable else '')
        + f'); give {_KINDS}.'
      )
    return EntrySource(entries, name=path, unreadable_folders=unreadable)
  if path.endswith(SHARD_SUFFIX):
    _refuse_unfinished_pack(os.path.dirname(path) or '.')
    return RecordSource([path], name=path)
  try:
    entries = manifest.read_manifest(path)
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f'{path}: cannot read the manifest ({_reason(e)}).') from None
  except ValueError as e:  # the message names the file and line already
    raise DataError(' '.join(str(e).split())) from None
  if not entries:
    raise DataError(f'{path}: the manifest lists no clips; add rows under its header.')
  return EntrySource(entries, name=path)


def _open_pack(path: str) -> RecordSource:
  try:
    shards = pack.list_shards(path)
  except pack.PackError as e:
    raise DataError(str(e)) from None
  except (OSError, ValueError, KeyError) as e:
    raise DataError(f'{path}: cannot read {pack.REPORT_FILE} ({_reason(e)}); re-pack.') from None
  with open(os.path.join(path, pack.REPORT_FILE)) as f:
    report = json.load(f)
  if not report.get('records'):
    skipped = ', '.join(f'{k} {v}' for k, v in report.get('skipped', {}).items() if v) or 'none'
    raise DataError(
      f'{path}: the pack holds no records (0 of {report.get("entries_in", "?")} entries packed; '
      f'skipped: {skipped}; see {os.path.join(path, pack.SKIPPED_FILE)}); fix the source and '
      're-pack into a new folder.'
    )
  return RecordSource(shards, name=path)


def _check_path(path: str) -> None:
  """A missing path, a broken symlink, a symlink loop or a permission problem, in one line."""
  try:
    os.stat(path)
  except FileNotFoundError:
    if os.path.islink(path):
      raise DataError(
        f'{path} is a broken symlink (to {os.readlink(path)!r}); fix the link or the path.'
      ) from None
    raise DataError(f'{path} does not exist; give {_KINDS}.') from None
  except OSError as e:
    raise DataError(f'{path}: {_reason(e)}; fix the path or its permissions.') from None
  try:
    if os.path.isdir(path):
      os.scandir(path).close()
    else:
      open(path, 'rb').close()
  except OSError as e:
    raise DataError(f'{path}: {_reason(e)}; fix its permissions or give another path.') from None


def _reason(e: BaseException) -> str:
  if isinstance(e, OSError):
    if e.errno == errno.ELOOP:
      return 'symlink loop (too many levels of symbolic links)'
    if e.errno in (errno.EACCES, errno.EPERM):
      return 'permission denied'
    if e.strerror:
      return e.strerror.lower()
  return ' '.join(str(e).split())
