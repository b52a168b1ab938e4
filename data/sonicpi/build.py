"""Regenerates this folder (16 kHz mono 16-bit FLACs + manifests) from the Sonic Pi source folder.

The source is the 206-clip CC0 Sonic Pi set (npm `supersonic-scsynth-samples` 0.84.2:
`audio/*.flac`, `labels.csv` with `path,category,...`, `LICENSE`, `PROVENANCE.md`). Every clip is
decoded with the repo's own loader (`aasp_jax.audio.decode.load_audio`: channels averaged, soxr
resampling) at the front end's 16 kHz, so training reads the bundled files without resampling, and
written as 16-bit FLAC. The manifests are written next to the audio:

  labels.csv       all clips, `path,label` (label = the Sonic Pi sample-group prefix)
  probe_train.csv  the categories with >= PROBE_MIN_CLIPS clips, minus probe_test.csv
  probe_test.csv   within each of those categories, sorted by file name: positions i % 4 == 3

Usage (from the repository root):

  python data/sonicpi/build.py /path/to/sonicpi            # writes into data/sonicpi/
  python data/sonicpi/build.py /path/to/sonicpi --out DIR
"""

import argparse
import collections
import csv
import os
import shutil
import sys

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
  size = sum(os.path.getsize(os.path.join(audio_out, n)) for n, _ in rows)
  print(f'{len(rows)} clips, {size / 1e6:.2f} MB of FLAC in {audio_out}')
  num_categories = len({c for _, c in test})
  print(f'probe: {len(train)} train + {len(test)} test clips in {num_categories} categories')
  if clipped:
    print(f'{len(clipped)} clips had samples clipped at int16 full scale: {clipped}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('source', help='the Sonic Pi folder (audio/, labels.csv, LICENSE, ...)')
  parser.add_argument(
    '--out',
    default=os.path.dirname(os.path.abspath(__file__)),
    help='where to write (default: this script\'s folder)',
  )
  args = parser.parse_args(argv)
  build(args.source, args.out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
