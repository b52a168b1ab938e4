"""Rebuilds this folder (8 kHz FLACs, labels.csv and the two probe tasks) from the FSDD recordings.

The source is the Free Spoken Digit Dataset as its git repository ships it (Jakobovski/
free-spoken-digit-dataset, commit 26eb9aaf76e81b692f806f9140c2d2777410d7a1): `recordings/
{digit}_{speaker}_{take}.wav` (8 kHz mono 16-bit PCM) and `metadata.py` (the speakers; a copy
may name it `speakers_metadata.py.txt`). Labels come from the file names; a `labels.csv`
(`path,digit,speaker,take`) beside `recordings/`, as in the copy this was built from, is checked
against them. Each WAV is rewritten as FLAC at its own rate and bit depth: the same 16-bit
samples, losslessly compressed (checked by reading every file back). Nothing is resampled here;
the project's decoder resamples to the front end's 16 kHz when it reads a clip.

Written next to this script:

  audio/{digit}_{speaker}_{take}.flac
  labels.csv          every clip: `path,digit,speaker,take,samples` (samples: the clip's length
                      at 8 kHz, which tests/test_fsdd_tasks.py checks the FLACs against)
  digit/task.csv      spoken digit (10 classes), group = speaker: every test speaker is unseen
  speaker/task.csv    speaker identity (6 classes), group = digit: every test digit is unseen
  {digit,speaker}/folds.csv   the protocol's splits (`python -m aasp_jax.evaluate.protocol`)

The tasks live in subfolders because the protocol keeps a task's folds.csv next to its task.csv;
their paths point at `../audio/`. Both tasks hold the takes below TASK_TAKES of every digit and
speaker (README.md "Tasks"): a subset fixed from the probe's cost alone, not from any score.

Usage (from the repository root):

  python data/fsdd/build.py /path/to/fsdd        # a checkout of the source (recordings/, ...)
  python data/fsdd/build.py --task-only          # the tasks and folds from this folder's labels.csv
"""

import argparse
import csv
import os
import re
import shutil
import sys

import numpy as np
import soundfile as sf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from aasp_jax.evaluate import protocol  # noqa: E402

SAMPLE_RATE = 8000
NAME = re.compile(r'(\d)_([a-z]+)_(\d+)')  # {digit}_{speaker}_{take}
# The speakers' metadata, copied as METADATA (a .txt: it is data here, not a module to import).
METADATA = 'speakers_metadata.py.txt'
METADATA_SOURCES = (METADATA, 'metadata.py')
# The probe tasks keep takes 0 .. TASK_TAKES - 1 of each (digit, speaker): 10 x 6 x 20 = 1,200
# clips. Fixed from the probe's cost alone (README "Tasks"), not from any score.
TASK_TAKES = 20
# task folder -> (label column, group column)
TASKS = {'digit': ('digit', 'speaker'), 'speaker': ('speaker', 'digit')}


def parse_name(name: str) -> tuple[str, str, int]:
  """(digit, speaker, take) from a file name `{digit}_{speaker}_{take}.wav` (or .flac)."""
  m = NAME.fullmatch(os.path.splitext(os.path.basename(name))[0])
  if not m:
    raise ValueError(f'{name}: not a {{digit}}_{{speaker}}_{{take}} file name')
  return m.group(1), m.group(2), int(m.group(3))


def read_source_labels(source: str) -> list[dict]:
  """Every recording's row (path, digit, speaker, take) from its file name, sorted by digit,
  speaker and take; a source `labels.csv`, where there is one, must list the same rows."""
  names = sorted(n for n in os.listdir(os.path.join(source, 'recordings')) if n.endswith('.wav'))
  rows = []
  for name in names:
    digit, speaker, take = parse_name(name)
    rows.append({'path': f'recordings/{name}', 'digit': digit, 'speaker': speaker, 'take': take})
  listing = os.path.join(source, 'labels.csv')
  if os.path.isfile(listing):
    with open(listing, newline='', encoding='utf-8') as f:
      listed = {(r['path'], r['digit'], r['speaker'], int(r['take'])) for r in csv.DictReader(f)}
    derived = {(r['path'], r['digit'], r['speaker'], r['take']) for r in rows}
    if listed != derived:
      raise ValueError(
        f'{listing} disagrees with the file names in recordings/: only listed '
        f'{sorted(listed - derived)[:3]}, only on disk {sorted(derived - listed)[:3]}'
      )
  return sorted(rows, key=lambda r: (int(r['digit']), r['speaker'], r['take']))


def convert_clip(src_path: str, dst_path: str) -> int:
  """Writes a 8 kHz mono 16-bit WAV as FLAC with the same samples; returns its length."""
  info = sf.info(src_path)
  if (info.samplerate, info.channels, info.subtype) != (SAMPLE_RATE, 1, 'PCM_16'):
    raise ValueError(
      f'{src_path}: {info.samplerate} Hz, {info.channels} channel(s), {info.subtype}; expected '
      f'{SAMPLE_RATE} Hz mono PCM_16'
    )
  pcm, _ = sf.read(src_path, dtype='int16')
  # FLAC level 8 (compression_level=1.0), as data/sonicpi and data/gm_instruments write theirs.
  sf.write(dst_path, pcm, SAMPLE_RATE, subtype='PCM_16', format='FLAC', compression_level=1.0)
  back, rate = sf.read(dst_path, dtype='int16')
  if rate != SAMPLE_RATE or not np.array_equal(back, pcm):
    raise RuntimeError(f'{dst_path}: does not read back as the samples of {src_path}')
  return len(pcm)


def flac_name(wav_name: str) -> str:
  return os.path.splitext(os.path.basename(wav_name))[0] + '.flac'


def write_labels(path: str, rows: list[dict]) -> None:
  """labels.csv: `path,digit,speaker,take,samples`, paths relative to this folder."""
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(['path', 'digit', 'speaker', 'take', 'samples'])
    for r in rows:
      writer.writerow([r['path'], r['digit'], r['speaker'], r['take'], r['samples']])


def read_labels(path: str) -> list[dict]:
  with open(path, newline='', encoding='utf-8') as f:
    return list(csv.DictReader(f))


def task_rows(rows: list[dict], label: str, group: str) -> list[list[str]]:
  """A task's `path,label,group` rows (paths relative to the task's subfolder)."""
  return [[f'../{r["path"]}', r[label], r[group]] for r in rows if int(r['take']) < TASK_TAKES]


def build_tasks(out: str) -> None:
  """Writes each task's task.csv and, with the protocol's own rule, its folds.csv."""
  rows = read_labels(os.path.join(out, 'labels.csv'))
  for task, (label, group) in TASKS.items():
    folder = os.path.join(out, task)
    os.makedirs(folder, exist_ok=True)
    manifest = os.path.join(folder, 'task.csv')
    body = task_rows(rows, label, group)
    with open(manifest, 'w', newline='', encoding='utf-8') as f:
      writer = csv.writer(f, lineterminator='\n')
      writer.writerow(['path', 'label', 'group'])
      writer.writerows(body)
    protocol.write_folds(manifest)
    print(
      f'{task}/task.csv: {len(body)} clips, {len({b[1] for b in body})} classes, '
      f'{len({b[2] for b in body})} groups ({group})'
    )


def build(source: str, out: str) -> None:
  rows = read_source_labels(source)
  audio_out = os.path.join(out, 'audio')
  os.makedirs(audio_out, exist_ok=True)
  names = [flac_name(r['path']) for r in rows]
  # Files from an earlier build that are no longer in the source would linger in the folder.
  for stale in sorted(set(os.listdir(audio_out)) - set(names)):
    os.remove(os.path.join(audio_out, stale))
  for row, name in zip(rows, names):
    row['samples'] = convert_clip(os.path.join(source, row['path']), os.path.join(audio_out, name))
    row['path'] = f'audio/{name}'
  metadata = [os.path.join(source, n) for n in METADATA_SOURCES]
  metadata = [p for p in metadata if os.path.isfile(p)]
  if not metadata:
    raise FileNotFoundError(f'{source}: no speaker metadata ({" or ".join(METADATA_SOURCES)})')
  shutil.copyfile(metadata[0], os.path.join(out, METADATA))
  write_labels(os.path.join(out, 'labels.csv'), rows)
  build_tasks(out)
  size = sum(os.path.getsize(os.path.join(audio_out, n)) for n in names)
  seconds = sum(r['samples'] for r in rows) / SAMPLE_RATE
  print(f'{len(rows)} clips, {seconds / 60:.1f} min, {size:,} bytes of FLAC in {audio_out}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('source', nargs='?', help='the FSDD folder (recordings/, labels.csv, ...)')
  parser.add_argument(
    '--out',
    default=os.path.dirname(os.path.abspath(__file__)),
    help="where to write (default: this script's folder)",
  )
  parser.add_argument(
    '--task-only',
    action='store_true',
    help="only rewrite the tasks and their folds from --out's own labels.csv (no source needed)",
  )
  args = parser.parse_args(argv)
  if args.task_only:
    build_tasks(args.out)
  elif args.source:
    build(args.source, args.out)
  else:
    parser.error('give the source folder, or --task-only')
  return 0


if __name__ == '__main__':
  sys.exit(main())
