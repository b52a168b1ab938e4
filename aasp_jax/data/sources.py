"""Random-access sources for grain: audio files (a folder or a manifest) and packed ArrayRecord shards.

Both return light, picklable dicts (paths or encoded bytes); decoding happens later in the pipeline's
worker processes, never in the training process.
"""

import glob
import os
from collections.abc import Sequence

import grain

from aasp_jax.data import manifest, pack

SHARD_PATTERN = '*.array_record'


class EntrySource:
  """Files listed by a manifest or found in a folder: element = {'index', 'path', 'labels', ...}."""

  def __init__(self, entries: Sequence[manifest.Entry]):
    if not entries:
      raise ValueError('The audio source is empty: no manifest rows or audio files were found.')
    self._entries = tuple(entries)

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

  def __init__(self, shard_paths: Sequence[str]):
    if not shard_paths:
      raise ValueError('No ArrayRecord shards given.')
    self._paths = tuple(shard_paths)  # shard order = the pack's clip_ids.txt order
    self._source = grain.sources.ArrayRecordDataSource(list(self._paths))

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return {'index': int(index), 'record': self._source[index]}

  def __getstate__(self):
    # Readers hold file handles; worker processes reopen the shards themselves.
    return {'paths': self._paths}

  def __setstate__(self, state):
    self.__init__(state['paths'])

  def __repr__(self) -> str:
    return f'RecordSource({len(self._paths)} shards)'


def open_source(spec: str):
  """A folder of shards, a folder of audio files, or a manifest file (CSV / JSONL)."""
  if not os.path.exists(spec):
    raise FileNotFoundError(
      f'Data source {spec!r} does not exist; give a folder of audio, a manifest, or a pack folder.'
    )
  if os.path.isdir(spec):
    is_pack = glob.glob(os.path.join(spec, SHARD_PATTERN)) or os.path.exists(
      os.path.join(spec, pack.CONFIG_FILE)
    )
    if is_pack:
      # Refuses an unfinished pack instead of silently training on its completed shards.
      return RecordSource(pack.list_shards(spec))
  return EntrySource(manifest.read_entries(spec))
