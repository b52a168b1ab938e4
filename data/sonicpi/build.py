"""Regenerates this folder (16 kHz mono 16-bit FLACs + manifests) from the Sonic Pi source folder.

The source is the 206-clip CC0 Sonic Pi set (npm `supersonic-scsynth-samples` 0.84.2:
`audio/*.flac`, `labels.csv` with `path,category,...`, `LICENSE`, `PROVENANCE.md`). Every clip is
decoded with the repo's own loader (`aasp_jax.audio.decode.load_audio`: channels averaged, soxr
resampling) at the front end's 16 kHz, so training reads the bundled files without resampling, and
written as 16-bit FLAC. The manifests are written next to the audio:

  labels.csv       all clips, `path,label` (label = the Sonic Pi sample-group prefix)
  probe_train.csv  the categories with >= PROBE_MIN_CLIPS clips, minus probe_test.csv
  probe_test.csv   within each of those categories, sorted by file name: positions i % 4 == 3
  task.csv         the probe categories' clips (probe_train + probe_test), `path,label,group`,
                   group = the clip's source by the rule of `task_groups` (README "task.csv")

Usage (from the repository root):

  python data/sonicpi/build.py /path/to/sonicpi            # writes into data/sonicpi/
  python data/sonicpi/build.py /path/to/sonicpi --out DIR
  python data/sonicpi/build.py --task-only                 # task.csv from labels.csv + PROVENANCE.md
"""

import argparse
import collections
import csv
import os
import re
import shutil
import sys
import urllib.parse

import numpy as np
import soundfile as sf

from aasp_jax.audio import decode
from aasp_jax.data import records

SAMPLE_RATE = 16000
# The linear-probe split: a category needs this many clips to take part, and every TEST_EVERY-th
# clip of it (sorted by file name, 0-based positions TEST_EVERY - 1, 2 * TEST_EVERY - 1, ...) is a
# test clip. Fixed before any probe was run, so the split cannot have been tuned to a result.
PROBE_MIN_CLIPS = 10
TEST_EVERY = 4
COPIED_FILES = ('LICENSE', 'PROVENANCE.md')
# task.csv grouping (README "task.csv"): words that name a variant of one sound (dynamics, pitch of a
# drum, hi-hat state, a longer take) and are dropped from the file name to get its sound family, and
# the fewest groups a category must keep when its families are merged by Freesound uploader.
VARIANT_WORDS = frozenset({'soft', 'hard', 'full', 'hi', 'mid', 'lo', 'open', 'closed', 'pedal'})
MIN_UPLOADER_GROUPS = 5


def read_source_labels(source: str) -> list[tuple[str, str]]:
  """(file name, category) for every row of the source's labels.csv, sorted by file name."""
  with open(os.path.join(source, 'labels.csv'), newline='', encoding='utf-8') as f:
    rows = [(os.path.basename(r['path']), r['category']) for r in csv.DictReader(f)]
  for name, category in rows:
    # The README's category rule; checking it catches a mislabelled or renamed file.
    if name.split('_')[0] != category:
      raise ValueError(f'{name}: category {category!r} is not the file-name prefix')
  listed = {name for name, _ in rows}
  on_disk = {n for n in os.listdir(os.path.join(source, 'audio')) if n.endswith('.flac')}
  if listed != on_disk:
    raise ValueError(
      f'labels.csv and audio/ disagree: only listed {sorted(listed - on_disk)}, '
      f'only on disk {sorted(on_disk - listed)}'
    )
  return sorted(rows)


def convert_clip(src_path: str, dst_path: str) -> int:
  """Writes `src_path` as 16 kHz mono PCM_16 FLAC; returns how many samples had to be clipped."""
  wave = decode.load_audio(src_path, SAMPLE_RATE)
  # Quantise ourselves (the pack tool's rounding and clipping) instead of leaving float -> int16 to
  # libsndfile, which does not clip by default: soxr can overshoot full scale slightly.
  clipped = records.count_clipped(wave)
  sf.write(
    dst_path,
    records.to_int16(wave),
    SAMPLE_RATE,
    subtype='PCM_16',
    format='FLAC',
    compression_level=1.0,  # FLAC level 8: lossless either way, ~2% smaller than the default
  )
  return clipped


def probe_split(rows: list[tuple[str, str]]) -> tuple[list, list]:
  """(train rows, test rows) by the fixed rule in the module docstring."""
  by_category = collections.defaultdict(list)
  for name, category in rows:
    by_category[category].append(name)
  train, test = [], []
  for category in sorted(by_category):
    names = sorted(by_category[category])
    if len(names) < PROBE_MIN_CLIPS:
      continue
    for i, name in enumerate(names):
      (test if i % TEST_EVERY == TEST_EVERY - 1 else train).append((name, category))
  return train, test


def read_provenance(path: str) -> dict[str, tuple[str, str | None]]:
  """{name key: (source, Freesound sound id or None)} from PROVENANCE.md's bullet lines.

  The source is the Freesound uploader (lower case) or, for donated samples, 'donor:<who>'. Keys are
  names without '_' (PROVENANCE writes `loop_mehackit_1` for the file `loop_mehackit1`).
  """
  out = {}
  with open(path, encoding='utf-8') as f:
    for line in f:
      m = re.match(r'\* `:?([a-z0-9_]+)`\s*-\s*(.*)', line.strip())
      if not m:
        continue
      name, rest = m.groups()
      url = re.search(r'freesound\.org/people/([^/]+)/sounds/(\d+)', rest, re.IGNORECASE)
      donor = re.match(r'Donated by (.+?) under', rest)
      if url:
        source = (urllib.parse.unquote(url.group(1)).lower(), url.group(2))
      elif donor:
        source = ('donor:' + donor.group(1).lower(), None)
      else:
        raise ValueError(f'{path}: no source in {line.strip()!r}')
      out[name.replace('_', '')] = source
  return out


def sound_family(stem: str) -> str:
  """The file name minus variant words and take numbers: `drum_tom_mid_soft` -> `drum_tom`.

  Tabla clips are named stroke + take (+ modifier): the family is the stroke, `tabla_na_o` ->
  `tabla_na`. A trailing number goes (`tbd_pad_1`, `tabla_ghe4`, `perc_bell2` -> `tbd_pad`,
  `tabla_ghe`, `perc_bell`) unless it is the whole name after the category (`bd_808`).
  """
  category, *words = stem.split('_')
  if category == 'tabla':
    return f'tabla_{re.sub(r"[0-9]+$", "", words[0])}'
  words = [w for w in words if w not in VARIANT_WORDS]
  if len(words) > 1 and words[-1].isdigit():
    words.pop()
  elif words and not words[-1].isdigit():
    words[-1] = re.sub(r'(?<=[a-z])[0-9]+$', '', words[-1])
  return '_'.join([category] + words)


def task_groups(rows: list[tuple[str, str]], provenance: dict) -> dict[str, str]:
  """{file name: group} for (file name, category) rows; groups never span two categories.

  Within a category: clips of one sound family, and clips from one Freesound sound, are one group
  (connected components). Then, if merging the category's groups by source (Freesound uploader or
  donor) still leaves it MIN_UPLOADER_GROUPS groups or more, they are merged by source too; a
  category recorded by (nearly) one source keeps its sound families instead. A group is named
  `category:` + its sources (spaces as '_') or its sound families, joined by '+'.
  """
  sources = {}
  for name, _ in rows:
    key = os.path.splitext(name)[0].replace('_', '')
    if key not in provenance:
      raise ValueError(f'{name}: not in PROVENANCE.md')
    sources[name] = provenance[key]

  def components(names, links):
    parent = {n: n for n in names}

    def find(x):
      while parent[x] != x:
        x = parent[x]
      return x

    for key_of in links:
      first = {}
      for n in names:
        k = key_of(n)
        if k is None:
          continue
        if k in first:
          a, b = find(first[k]), find(n)
          parent[max(a, b)] = min(a, b)
        else:
          first[k] = n
    return {n: find(n) for n in names}

  def family(n):
    return sound_family(os.path.splitext(n)[0])

  by_category = collections.defaultdict(list)
  for name, category in rows:
    by_category[category].append(name)
  groups = {}
  for category, names in sorted(by_category.items()):
    names = sorted(names)
    links = [family, lambda n: sources[n][1]]
    fine = components(names, links)
    coarse = components(names, links + [lambda n: sources[n][0]])
    use_sources = len(set(coarse.values())) >= MIN_UPLOADER_GROUPS
    comp = coarse if use_sources else fine
    members = collections.defaultdict(list)
    for n in names:
      members[comp[n]].append(n)
    for ns in members.values():
      if use_sources:
        label = '+'.join(sorted({sources[n][0].replace(' ', '_') for n in ns}))
      else:
        label = '+'.join(sorted({family(n) for n in ns}))
      for n in ns:
        groups[n] = f'{category}:{label}'
  return groups


def write_task(path: str, rows: list[tuple[str, str]], groups: dict[str, str]) -> None:
  """task.csv: `path,label,group` for the probe clips, sorted by file name."""
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(['path', 'label', 'group'])
    for name, category in sorted(rows):
      writer.writerow([f'audio/{name}', category, groups[name]])


def build_task(rows: list[tuple[str, str]], out: str) -> None:
  """Writes task.csv from the (file name, category) rows and `out`/PROVENANCE.md."""
  train, test = probe_split(rows)
  probe = sorted(train + test)
  groups = task_groups(probe, read_provenance(os.path.join(out, 'PROVENANCE.md')))
  write_task(os.path.join(out, 'task.csv'), probe, groups)
  per_category = collections.defaultdict(lambda: [0, set()])
  for name, category in probe:
    per_category[category][0] += 1
    per_category[category][1].add(groups[name])
  print(f'task.csv: {len(probe)} clips, {len(set(groups.values()))} groups')
  for category, (n, g) in sorted(per_category.items()):
    print(f'  {category}: {n} clips, {len(g)} groups')


def write_manifest(path: str, rows: list[tuple[str, str]]) -> None:
  """A `read_manifest` CSV: `path,label`, paths relative to the manifest's folder."""
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(['path', 'label'])
    for name, category in rows:
      writer.writerow([f'audio/{name}', category])


def build(source: str, out: str) -> None:
  rows = read_source_labels(source)
  audio_out = os.path.join(out, 'audio')
  os.makedirs(audio_out, exist_ok=True)
  # Files from an earlier build that are no longer in the source would linger in the folder.
  for stale in set(os.listdir(audio_out)) - {name for name, _ in rows}:
    os.remove(os.path.join(audio_out, stale))
  clipped = {}
  for name, _ in rows:
    n = convert_clip(os.path.join(source, 'audio', name), os.path.join(audio_out, name))
    if n:
      clipped[name] = n
  for name in COPIED_FILES:
    shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
  train, test = probe_split(rows)
  write_manifest(os.path.join(out, 'labels.csv'), rows)
  write_manifest(os.path.join(out, 'probe_train.csv'), train)
  write_manifest(os.path.join(out, 'probe_test.csv'), test)
  build_task(rows, out)
  size = sum(os.path.getsize(os.path.join(audio_out, n)) for n, _ in rows)
  print(f'{len(rows)} clips, {size / 1e6:.2f} MB of FLAC in {audio_out}')
  num_categories = len({c for _, c in test})
  print(f'probe: {len(train)} train + {len(test)} test clips in {num_categories} categories')
  if clipped:
    print(f'{len(clipped)} clips had samples clipped at int16 full scale: {clipped}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
    'source', nargs='?', help='the Sonic Pi folder (audio/, labels.csv, LICENSE, ...)'
  )
  parser.add_argument(
    '--out',
    default=os.path.dirname(os.path.abspath(__file__)),
    help="where to write (default: this script's folder)",
  )
  parser.add_argument(
    '--task-only',
    action='store_true',
    help="only rewrite task.csv, from --out's own labels.csv and PROVENANCE.md (no source needed)",
  )
  args = parser.parse_args(argv)
  if args.task_only:
    with open(os.path.join(args.out, 'labels.csv'), newline='', encoding='utf-8') as f:
      rows = sorted((os.path.basename(r['path']), r['label']) for r in csv.DictReader(f))
    build_task(rows, args.out)
  elif args.source:
    build(args.source, args.out)
  else:
    parser.error('give the source folder, or --task-only')
  return 0


if __name__ == '__main__':
  sys.exit(main())
