"""Readers for the downstream datasets in their standard download layouts.

`read_dataset(name, root)` returns a `LabelledSet`: `manifest.Entry` clips whose labels are class
names, the class list, and each clip's fold (ESC-50, UrbanSound8K) or split ('train' / 'valid' /
'test'). Nothing is decoded here: the input pipeline reads the audio later and counts the clips it
cannot use. The layouts (also in `LAYOUTS`, which the errors quote):

- esc50 (ESC-50-master): `meta/esc50.csv` (filename,fold,target,category,esc10,src_file,take) and
  `audio/<filename>`. 50 classes ordered by `target`; folds 1..5; every clip's split is 'train'
  (evaluate with `fold_split`).
- us8k (UrbanSound8K): `metadata/UrbanSound8K.csv`
  (slice_file_name,fsID,start,end,salience,fold,classID,class) and
  `audio/fold<fold>/<slice_file_name>`. 10 classes ordered by `classID`; folds 1..10; split 'train'.
  The CSV's start/end locate the slice in its Freesound recording; the slice files are already cut,
  so the clips are read whole.
- nsynth: `nsynth-{train,valid,test}/examples.json` ({note_str: {instrument_family,
  instrument_family_str, ...}}) and `nsynth-<split>/audio/<note_str>.wav`. The label is the
  instrument family; the classes are all 11 families in id order (`NSYNTH_FAMILIES`), also those a
  split lacks (synth_lead has no valid / test notes). Whichever split folders exist are read.
- spc2 (Speech Commands v0.02): `<word>/<file>.wav`, `validation_list.txt` and `testing_list.txt`
  (paths relative to the root). Listed files are 'valid' / 'test', every other file 'train'. The
  classes are all word folders, sorted: the standard 35-word SPC-2 task (not the 12-class
  "10 words + silence + unknown" variant). `_background_noise_` (and any folder starting with '_'
  or '.') holds no class and is skipped.
- audioset: segment CSVs `balanced_train_segments.csv`, `unbalanced_train_segments.csv` (split
  'train') and `eval_segments.csv` ('test'), in the released format ('#' comment lines, then
  `YTID, start_seconds, end_seconds, "mid,mid,..."`), `class_labels_indices.csv`
  (index,mid,display_name; classes are the display names in index order), and audio under
  `audio/<csv stem>/`, one file per segment holding just that 10 s segment, named
  `<YTID>_<start_seconds>.<ext>` (start as written in the CSV, e.g. `_30.000`, or in its shortest
  form, `_30`), `<YTID>.<ext>` or `Y<YTID>.<ext>` (PANNs' naming), any audio extension. Multi-label.
  Segments whose audio is missing (videos taken down, failed downloads) are left out, counted in
  `LabelledSet.missing_audio` and logged per CSV; only a CSV with none of its audio is an error.

For the other datasets a listed clip whose file is missing is kept (the pipeline then counts it as
'missing'), counted in `missing_audio` and logged; a layout with none of its audio is an error.

  from aasp_jax.evaluate import datasets
  esc50 = datasets.read_dataset('esc50', '/data/ESC-50-master')
  train, test = esc50.fold_split(1)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np

from aasp_jax.data import manifest

_logger = logging.getLogger(__name__)

DATASETS = ('esc50', 'us8k', 'nsynth', 'spc2', 'audioset')
SPLITS = ('train', 'valid', 'test')

LAYOUTS = {
  'esc50': 'ESC-50: <root>/meta/esc50.csv (filename,fold,target,category,esc10,src_file,take) and '
  '<root>/audio/<filename>',
  'us8k': 'UrbanSound8K: <root>/metadata/UrbanSound8K.csv '
  '(slice_file_name,fsID,start,end,salience,fold,classID,class) and '
  '<root>/audio/fold<fold>/<slice_file_name>',
  'nsynth': 'NSynth: <root>/nsynth-{train,valid,test}/examples.json and '
  '<root>/nsynth-<split>/audio/<note_str>.wav (at least one split folder)',
  'spc2': 'Speech Commands v0.02: <root>/<word>/<file>.wav, <root>/validation_list.txt and '
  '<root>/testing_list.txt',
  'audioset': 'AudioSet: <root>/class_labels_indices.csv, segment CSVs '
  '<root>/{balanced_train,unbalanced_train,eval}_segments.csv and audio files '
  '<root>/audio/<csv stem>/<YTID>_<start>.<ext> or <YTID>.<ext>',
}

# NSynth's instrument families by id (instrument_family -> instrument_family_str).
NSYNTH_FAMILIES = (
  'bass', 'brass', 'flute', 'guitar', 'keyboard', 'mallet', 'organ', 'reed', 'string',
  'synth_lead', 'vocal',
)  # fmt: skip

# AudioSet segment CSVs (stem -> split), in reading order.
AUDIOSET_SEGMENTS = {
  'balanced_train_segments': 'train',
  'unbalanced_train_segments': 'train',
  'eval_segments': 'test',
}
SPC2_LISTS = {'valid': 'validation_list.txt', 'test': 'testing_list.txt'}


@dataclasses.dataclass(frozen=True)
class LabelledSet:
  """Labelled clips of one dataset.

  Attributes:
    name: the dataset name (one of DATASETS).
    entries: the clips; `entries[i].labels` are names from `class_names`.
    class_names: every class of the dataset, in its canonical order (class index = position).
    multilabel: whether a clip may have several labels (AudioSet) or has exactly one.
    folds: each clip's fold (ESC-50 1..5, UrbanSound8K 1..10), or None for datasets without folds.
    splits: each clip's split, 'train' | 'valid' | 'test' (all 'train' for the fold datasets).
    missing_audio: clips the metadata lists whose audio file was not found when the dataset was
      read (AudioSet leaves them out of `entries`; the other datasets keep them for the pipeline
      to count). A subset made by `select` / `split` / `fold_split` keeps the dataset's count.
  """

  name: str
  entries: tuple[manifest.Entry, ...]
  class_names: tuple[str, ...]
  multilabel: bool
  folds: tuple[int, ...] | None
  splits: tuple[str, ...]
  missing_audio: int = 0

  def __post_init__(self):
    if len(self.splits) != len(self.entries):
      raise ValueError(f'{len(self.splits)} splits for {len(self.entries)} entries')
    if self.folds is not None and len(self.folds) != len(self.entries):
      raise ValueError(f'{len(self.folds)} folds for {len(self.entries)} entries')
    unknown_splits = set(self.splits) - set(SPLITS)
    if unknown_splits:
      raise ValueError(f'unknown split(s) {sorted(unknown_splits)}; expected {list(SPLITS)}')
    known = set(self.class_names)
    for e in self.entries:
      if not set(e.labels) <= known:
        raise ValueError(
          f'{self.name}: clip {e.clip_id} has label(s) {sorted(set(e.labels) - known)} that are '
          'not in class_names'
        )

  def __len__(self) -> int:
    return len(self.entries)

  def select(self, indices) -> LabelledSet:
    """The clips at `indices` (integer indices, or a boolean mask over the entries), in that
    order."""
    index = np.asarray(indices)
    if index.dtype == bool:
      if index.shape != (len(self.entries),):
        raise ValueError(
          f'a boolean mask must have one value per entry ({len(self.entries)}); '
          f'got shape {index.shape}'
        )
      index = np.flatnonzero(index)
    elif index.size == 0:
      index = index.astype(np.int64)
    elif index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
      raise ValueError(
        f'select takes a 1-D list of integer indices or a boolean mask; got {indices}'
      )
    index = index.tolist()
    return dataclasses.replace(
      self,
      entries=tuple(self.entries[i] for i in index),
      folds=None if self.folds is None else tuple(self.folds[i] for i in index),
      splits=tuple(self.splits[i] for i in index),
    )

  def fold_split(self, test_fold: int) -> tuple[LabelledSet, LabelledSet]:
    """(train, test): the clips of every other fold, and the clips of `test_fold`.

    Raises:
      ValueError: if the dataset has no folds, or none of its clips is in `test_fold`.
    """
    if self.folds is None:
      present = sorted(set(self.splits))
      raise ValueError(
        f'{self.name} has no folds; it comes in splits {present}: use split(name) instead'
      )
    folds = np.asarray(self.folds)
    if not np.any(folds == test_fold):
      raise ValueError(
        f'{self.name} has no clip in fold {test_fold}; its folds are {sorted(set(self.folds))}'
      )
    return self.select(folds != test_fold), self.select(folds == test_fold)

  def split(self, name: str) -> LabelledSet:
    """The clips of split `name` ('train' | 'valid' | 'test').

    Raises:
      ValueError: for an unknown split name, or a split with no clips in this set.
    """
    if name not in SPLITS:
      raise ValueError(f'unknown split {name!r}; expected one of {list(SPLITS)}')
    mask = np.asarray(self.splits, dtype=object) == name
    if not mask.any():
      present = sorted(set(self.splits))
      hint = ' (it is evaluated by folds: use fold_split)' if self.folds is not None else ''
      raise ValueError(f'{self.name} has no {name!r} clips; its splits are {present}{hint}')
    return self.select(mask)


def read_dataset(
  name: str,
  root: str | os.PathLike,
  split: str | None = None,
  *,
  audioset_segments: Sequence[str] | None = None,
) -> LabelledSet:
  """Reads dataset `name` from its standard layout under `root` (see the module docstring).

  Args:
    name: one of DATASETS.
    root: the dataset's top folder.
    split: only the clips of this split ('train' | 'valid' | 'test'); None reads them all. NSynth
      and AudioSet then read only that split's metadata.
    audioset_segments: AudioSet only: the segment CSV stems to read (keys of AUDIOSET_SEGMENTS),
      e.g. ('balanced_train_segments', 'eval_segments') for AS-20K when the unbalanced CSV sits in
      the same folder. None reads every one that exists.

  Raises:
    ValueError: for an unknown dataset or split name, or a malformed metadata file (the message
      names the file and line).
    FileNotFoundError: when the root, a metadata file, or all of the audio is missing; the message
      names the expected path and the dataset's layout.
  """
  if name not in DATASETS:
    raise ValueError(f'unknown dataset {name!r}; choose one of {list(DATASETS)}')
  if split is not None and split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {list(SPLITS)} or None')
  if audioset_segments is not None and name != 'audioset':
    raise ValueError(f'audioset_segments applies to AudioSet only, not {name!r}')
  root = os.path.abspath(os.fspath(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(f'{name} root folder not found: {root}; expected {LAYOUTS[name]}')
  if name == 'esc50':
    labelled = _read_esc50(root)
  elif name == 'us8k':
    labelled = _read_us8k(root)
  elif name == 'nsynth':
    labelled = _read_nsynth(root, split)
  elif name == 'spc2':
    labelled = _read_spc2(root)
  else:
    labelled = _read_audioset(root, split, audioset_segments)
  return labelled if split is None else labelled.split(split)


# ---------------------------------------------------------------------------- ESC-50 / US8K


def _read_esc50(root: str) -> LabelledSet:
  path = _metadata(root, 'esc50', 'meta', 'esc50.csv')
  entries, folds, classes = [], [], _ClassTable(path, 'target', 'category')
  for where, row in _csv_rows(path, ('filename', 'fold', 'target', 'category')):
    classes.add(_int(row, 'target', where), row['category'], where)
    folds.append(_int(row, 'fold', where))
    relpath = f'audio/{row["filename"]}'
    entries.append(_entry(root, relpath, (row['category'],)))
  return _fold_set('esc50', root, entries, classes.names(), folds)


def _read_us8k(root: str) -> LabelledSet:
  path = _metadata(root, 'us8k', 'metadata', 'UrbanSound8K.csv')
  entries, folds, classes = [], [], _ClassTable(path, 'classID', 'class')
  for where, row in _csv_rows(path, ('slice_file_name', 'fold', 'classID', 'class')):
    classes.add(_int(row, 'classID', where), row['class'], where)
    fold = _int(row, 'fold', where)
    folds.append(fold)
    entries.append(_entry(root, f'audio/fold{fold}/{row["slice_file_name"]}', (row['class'],)))
  return _fold_set('us8k', root, entries, classes.names(), folds)


def _fold_set(name, root, entries, class_names, folds) -> LabelledSet:
  missing = _count_missing(name, root, entries)
  return LabelledSet(
    name=name,
    entries=tuple(entries),
    class_names=class_names,
    multilabel=False,
    folds=tuple(folds),
    splits=('train',) * len(entries),
    missing_audio=missing,
  )


class _ClassTable:
  """Collects (id, name) pairs from metadata rows and checks that they agree."""

  def __init__(self, path: str, id_column: str, name_column: str):
    self._path, self._id_column, self._name_column = path, id_column, name_column
    self._by_id: dict[int, str] = {}
    self._by_name: dict[str, int] = {}

  def add(self, class_id: int, class_name: str, where: str) -> None:
    known_name = self._by_id.setdefault(class_id, class_name)
    known_id = self._by_name.setdefault(class_name, class_id)
    if known_name != class_name or known_id != class_id:
      raise ValueError(
        f'{where}: {self._id_column}={class_id} with {self._name_column}={class_name!r}, but '
        f'earlier rows pair {self._id_column}={class_id} with {known_name!r} and '
        f'{class_name!r} with {self._id_column}={known_id}'
      )

  def names(self) -> tuple[str, ...]:
    if not self._by_id:
      raise ValueError(f'{self._path}: no clips listed')
    return tuple(self._by_id[i] for i in sorted(self._by_id))


# ---------------------------------------------------------------------------- NSynth


def _read_nsynth(root: str, split: str | None) -> LabelledSet:
  wanted = SPLITS if split is None else (split,)
  folders = {s: os.path.join(root, f'nsynth-{s}') for s in wanted}
  present = [s for s in wanted if os.path.isdir(folders[s])]
  if not present:
    expected = ', '.join(folders[s] for s in wanted)
    raise FileNotFoundError(
      f'nsynth: no split folder found (expected {expected}); {LAYOUTS["nsynth"]}'
    )
  entries, splits = [], []
  for s in present:
    path = _metadata(root, 'nsynth', f'nsynth-{s}', 'examples.json')
    for note_str, family in _nsynth_examples(path):
      entries.append(_entry(root, f'nsynth-{s}/audio/{note_str}.wav', (family,)))
      splits.append(s)
  missing = _count_missing('nsynth', root, entries)
  return LabelledSet(
    name='nsynth',
    entries=tuple(entries),
    class_names=NSYNTH_FAMILIES,
    multilabel=False,
    folds=None,
    splits=tuple(splits),
    missing_audio=missing,
  )


def _nsynth_examples(path: str) -> list[tuple[str, str]]:
  """(note_str, family name) of every note in an examples.json, sorted by note_str."""
  try:
    with open(path, encoding='utf-8') as f:
      examples = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: invalid JSON ({e})') from e
  if not isinstance(examples, dict):
    raise ValueError(  # noqa: TRY004 (bad file content, not a bad argument)
      f'{path}: expected a JSON object {{note_str: example}}'
    )
  notes = []
  for note_str in sorted(examples):
    example = examples[note_str]
    where = f'{path}: note {note_str!r}'
    try:
      family_id = example['instrument_family']
      family = example['instrument_family_str']
    except (KeyError, TypeError):
      raise ValueError(f'{where}: needs "instrument_family" and "instrument_family_str"') from None
    valid_id = isinstance(family_id, int) and 0 <= family_id < len(NSYNTH_FAMILIES)
    if not valid_id or NSYNTH_FAMILIES[family_id] != family:
      raise ValueError(
        f'{where}: instrument_family={family_id!r} / instrument_family_str={family!r} does not '
        f'match the NSynth families {list(enumerate(NSYNTH_FAMILIES))}'
      )
    notes.append((note_str, family))
  return notes


# ---------------------------------------------------------------------------- Speech Commands


def _read_spc2(root: str) -> LabelledSet:
  listed = {}  # relative path -> 'valid' | 'test'
  for split_name, filename in SPC2_LISTS.items():
    path = _metadata(root, 'spc2', filename)
    with open(path, encoding='utf-8') as f:
      for line_num, line in enumerate(f, start=1):
        relpath = line.strip().replace('\\', '/')
        if not relpath:
          continue
        if relpath in listed:
          raise ValueError(
            f'{path}:{line_num}: {relpath} is already in the {listed[relpath]} list; a clip '
            'belongs to one split'
          )
        listed[relpath] = split_name
  # Folders starting with '_' (_background_noise_) or '.' are not words.
  words = sorted(
    d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith(('_', '.'))
  )
  if not words:
    raise FileNotFoundError(f'spc2: no word folder under {root}; expected {LAYOUTS["spc2"]}')
  relpaths = set(listed)
  for word in words:
    with os.scandir(os.path.join(root, word)) as it:
      relpaths.update(f'{word}/{f.name}' for f in it if f.name.lower().endswith('.wav'))
  entries, splits = [], []
  for relpath in sorted(relpaths):
    word = relpath.split('/', 1)[0]
    if word not in words:
      raise ValueError(
        f'spc2: {relpath} is listed in {SPC2_LISTS[listed[relpath]]} but {word!r} is not a word '
        f'folder under {root}'
      )
    entries.append(_entry(root, relpath, (word,)))
    splits.append(listed.get(relpath, 'train'))
  missing = _count_missing('spc2', root, entries)
  return LabelledSet(
    name='spc2',
    entries=tuple(entries),
    class_names=tuple(words),
    multilabel=False,
    folds=None,
    splits=tuple(splits),
    missing_audio=missing,
  )


# ---------------------------------------------------------------------------- AudioSet


def _read_audioset(
  root: str, split: str | None, segment_stems: Sequence[str] | None
) -> LabelledSet:
  if split not in (None, *AUDIOSET_SEGMENTS.values()):
    raise ValueError(f'audioset has no {split!r} split; it has train and test segment CSVs')
  if segment_stems is None:
    stems = [s for s in AUDIOSET_SEGMENTS if split in (None, AUDIOSET_SEGMENTS[s])]
    stems = [s for s in stems if os.path.isfile(os.path.join(root, f'{s}.csv'))]
    if not stems:
      wanted = [f'{s}.csv' for s in AUDIOSET_SEGMENTS if split in (None, AUDIOSET_SEGMENTS[s])]
      raise FileNotFoundError(
        f'audioset: no segment CSV under {root} (expected {wanted}); {LAYOUTS["audioset"]}'
      )
  else:
    unknown = [s for s in segment_stems if s not in AUDIOSET_SEGMENTS]
    if unknown:
      raise ValueError(f'unknown AudioSet segment CSV(s) {unknown}; use {list(AUDIOSET_SEGMENTS)}')
    stems = [s for s in segment_stems if split in (None, AUDIOSET_SEGMENTS[s])]
    for s in stems:
      _metadata(root, 'audioset', f'{s}.csv')
  mids, class_names = _audioset_classes(_metadata(root, 'audioset', 'class_labels_indices.csv'))
  class_index = {mid: i for i, mid in enumerate(mids)}
  entries, splits, total_missing = [], [], 0
  for stem in stems:
    path = os.path.join(root, f'{stem}.csv')
    audio_dir = os.path.join(root, 'audio', stem)
    audio_files = _audio_files_by_stem(audio_dir)
    listed = found = 0
    for where, ytid, start_text, labels in _audioset_segments(path):
      listed += 1
      unknown = [m for m in labels if m not in class_index]
      if unknown:
        raise ValueError(f'{where}: label(s) {unknown} are not in class_labels_indices.csv')
      filename = _audioset_audio_file(audio_files, ytid, start_text)
      if filename is None:
        continue
      found += 1
      ordered = sorted({class_index[m] for m in labels})
      entries.append(
        _entry(root, f'audio/{stem}/{filename}', tuple(class_names[i] for i in ordered))
      )
      splits.append(AUDIOSET_SEGMENTS[stem])
    missing = listed - found
    total_missing += missing
    log = _logger.warning if missing else _logger.info
    log(
      'audioset %s.csv: %d of %d listed segments have audio under %s (%d missing, left out)',
      stem, found, listed, audio_dir, missing,
    )  # fmt: skip
    if listed and not found:
      raise FileNotFoundError(
        f'audioset: none of the {listed} segments of {path} has an audio file under {audio_dir}; '
        f'expected files named <YTID>_<start_seconds>.<ext>, <YTID>.<ext> or Y<YTID>.<ext> '
        f'({LAYOUTS["audioset"]})'
      )
  return LabelledSet(
    name='audioset',
    entries=tuple(entries),
    class_names=class_names,
    multilabel=True,
    folds=None,
    splits=tuple(splits),
    missing_audio=total_missing,
  )


def _audioset_classes(path: str) -> tuple[list[str], tuple[str, ...]]:
  """(mids, display names), ordered by index; the indices must be 0..C-1 and names unique."""
  rows = {}
  for where, row in _csv_rows(path, ('index', 'mid', 'display_name')):
    index = _int(row, 'index', where)
    if index in rows:
      raise ValueError(f'{where}: index {index} appears twice')
    rows[index] = (row['mid'].strip(), row['display_name'].strip())
  if sorted(rows) != list(range(len(rows))):
    raise ValueError(f'{path}: the indices must be 0..{len(rows) - 1}, each once')
  mids = [rows[i][0] for i in range(len(rows))]
  names = tuple(rows[i][1] for i in range(len(rows)))
  for values, what in ((mids, 'mid'), (names, 'display_name')):
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
      raise ValueError(f'{path}: {what} values {repeated} appear more than once')
  return mids, names


def _audioset_segments(path: str) -> Iterable[tuple[str, str, str, list[str]]]:
  """(where, YTID, start_seconds as written, label MIDs) of each segment line of a CSV."""
  with open(path, encoding='utf-8') as f:
    lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
  lines = [(n, line) for n, line in lines if not line.lstrip().startswith('#')]
  # skipinitialspace: the released files put a space after each comma, before the quoted labels.
  for (line_num, _), fields in zip(
    lines, csv.reader((line for _, line in lines), skipinitialspace=True)
  ):
    where = f'{path}:{line_num}'
    if len(fields) != 4:
      raise ValueError(
        f'{where}: expected 4 fields (YTID, start_seconds, end_seconds, "positive_labels"), '
        f'got {len(fields)}'
      )
    ytid, start_text, end_text, labels = (x.strip() for x in fields)
    for text, key in ((start_text, 'start_seconds'), (end_text, 'end_seconds')):
      try:
        float(text)
      except ValueError:
        raise ValueError(f'{where}: {key} must be a number, got {text!r}') from None
    mids = [m.strip() for m in labels.split(',') if m.strip()]
    if not ytid or not mids:
      raise ValueError(f'{where}: a segment needs a YTID and at least one label')
    yield where, ytid, start_text, mids


def _audio_files_by_stem(folder: str) -> dict[str, str]:
  """{file name without extension: file name} of the audio files in `folder` ({} if absent)."""
  if not os.path.isdir(folder):
    return {}
  files = {}
  with os.scandir(folder) as it:
    for f in it:
      stem, ext = os.path.splitext(f.name)
      if ext.lower() in manifest.AUDIO_EXTENSIONS and not f.name.startswith('.'):
        files.setdefault(stem, f.name)
  return files


def _audioset_audio_file(files: dict[str, str], ytid: str, start_text: str) -> str | None:
  """The file name of a segment under the naming conventions of the module docstring."""
  shortest = repr(float(start_text)).removesuffix('.0')
  for stem in (f'{ytid}_{start_text}', f'{ytid}_{shortest}', ytid, f'Y{ytid}'):
    if stem in files:
      return files[stem]
  return None


# ---------------------------------------------------------------------------- shared helpers


def _metadata(root: str, name: str, *parts: str) -> str:
  path = os.path.join(root, *parts)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{name}: metadata file not found: {path}; expected {LAYOUTS[name]}')
  return path


def _csv_rows(path: str, required: Sequence[str]) -> Iterable[tuple[str, dict[str, str]]]:
  """(where, row) of each data row of a CSV with a header naming at least `required`."""
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    header = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
      raise ValueError(f'{path}: the header {header} lacks column(s) {missing}')
    reader.fieldnames = header
    for row in reader:
      where = f'{path}:{reader.line_num}'
      if None in row or any(row[c] is None for c in required):
        raise ValueError(f'{where}: the row does not have the {len(header)} fields of the header')
      yield where, row


def _int(row: dict[str, str], key: str, where: str) -> int:
  try:
    return int(row[key].strip())
  except ValueError:
    raise ValueError(f'{where}: {key} must be an integer, got {row[key]!r}') from None


def _entry(root: str, relpath: str, labels: tuple[str, ...]) -> manifest.Entry:
  return manifest.Entry(
    path=os.path.join(root, *relpath.split('/')), labels=labels, clip_id=relpath
  )


def _count_missing(name: str, root: str, entries: Sequence[manifest.Entry]) -> int:
  """How many entries have no file (logged); raises when none has one."""
  listings: dict[str, set[str]] = {}
  missing = 0
  for e in entries:
    folder, filename = os.path.split(e.path)
    if folder not in listings:
      listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    missing += filename not in listings[folder]
  if entries and missing == len(entries):
    raise FileNotFoundError(
      f'{name}: none of the {len(entries)} listed audio files exists (e.g. {entries[0].path}); '
      f'expected {LAYOUTS[name]}'
    )
  if missing:
    _logger.warning(
      '%s: %d of %d listed audio files are missing under %s; they stay in the set and the input '
      'pipeline skips them as "missing"',
      name, missing, len(entries), root,
    )  # fmt: skip
  return missing
