"""The bundled FSDD speech clips (data/fsdd) and their two probe tasks.

The digit task must never test a speaker it trained on, the speaker task never a digit it trained
on; the recorded folds must be what the protocol computes; labels must be the file names'; and the
shipped FLACs must hold the original recordings (sample for sample where the source copy is
present, ../shared/data/fsdd; elsewhere against the lengths recorded at build time).
"""

import csv
import importlib.util
import os

import numpy as np
import pytest
import soundfile as sf

from aasp_jax.audio import decode
from aasp_jax.evaluate import protocol

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDD = os.path.join(REPO, 'data', 'fsdd')
SOURCE = os.path.join(REPO, '..', 'shared', 'data', 'fsdd')
DIGIT_TASK = os.path.join(FSDD, 'digit', 'task.csv')
SPEAKER_TASK = os.path.join(FSDD, 'speaker', 'task.csv')
SPEAKERS = ('george', 'jackson', 'lucas', 'nicolas', 'theo', 'yweweler')
# The 3,000 source WAVs hold 10,498,424 samples at 8 kHz (21.9 min), counted when they were built.
SOURCE_CLIPS, SOURCE_SAMPLES = 3000, 10_498_424


def _build_module():
  spec = importlib.util.spec_from_file_location('fsdd_build', os.path.join(FSDD, 'build.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _name_fields(path: str) -> tuple[str, str, int]:
  """(digit, speaker, take) from `.../{digit}_{speaker}_{take}.flac`, parsed independently of
  build.py."""
  digit, speaker, take = os.path.splitext(os.path.basename(path))[0].split('_')
  return digit, speaker, int(take)


def _labels() -> list[dict]:
  with open(os.path.join(FSDD, 'labels.csv'), newline='') as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def tasks():
  return {
    'digit': protocol.ProbeTask.from_manifest(DIGIT_TASK),
    'speaker': protocol.ProbeTask.from_manifest(SPEAKER_TASK),
  }


@pytest.mark.parametrize(
  'name, held_out_field',
  [('digit', 1), ('speaker', 0)],
  ids=['digit_by_speaker', 'speaker_by_digit'],
)
def test_folds_never_share_a_group(tasks, name, held_out_field):
  """Digit task: no speaker on both sides of any split; speaker task: no digit (every repeat)."""
  task = tasks[name]
  held_out = np.array([_name_fields(e.path)[held_out_field] for e in task.entries])
  assert task.folds.shape == (protocol.REPEATS, len(task.entries))
  for r in range(protocol.REPEATS):
    seen_as_test = set()
    for k in range(protocol.FOLDS):
      test = set(held_out[task.folds[r] == k])
      train = set(held_out[task.folds[r] != k])
      assert test and not test & train, (name, r, k, test & train)
      seen_as_test |= test
    # Every group is tested once per repeat (the folds cover the task).
    assert seen_as_test == set(held_out)


def test_every_fold_holds_every_class(tasks):
  for task in tasks.values():
    for r in range(protocol.REPEATS):
      for k in range(protocol.FOLDS):
        assert set(task.labels[task.folds[r] == k]) == set(range(task.num_classes))


@pytest.mark.parametrize('path', [DIGIT_TASK, SPEAKER_TASK], ids=['digit', 'speaker'])
def test_recorded_folds_are_the_protocols(path):
  """folds.csv is what `python -m aasp_jax.evaluate.protocol TASK.csv` writes for the task file."""
  task = protocol.ProbeTask.from_manifest(path)
  with open(os.path.join(os.path.dirname(path), protocol.FOLDS_FILE), newline='') as f:
    recorded = list(csv.reader(f))
  assert recorded == protocol.folds_table(task)


def test_task_rows_are_the_file_names_labels(tasks):
  build = _build_module()
  expected = sorted(
    os.path.join(FSDD, r['path']) for r in _labels() if int(r['take']) < build.TASK_TAKES
  )
  for name, task in tasks.items():
    assert sorted(e.path for e in task.entries) == expected, name
    for e in task.entries:
      digit, speaker, _ = _name_fields(e.path)
      assert e.labels == ((digit,) if name == 'digit' else (speaker,)), e.path
      assert e.group == (speaker if name == 'digit' else digit), e.path
  assert tasks['digit'].classes == tuple(str(d) for d in range(10))
  assert tasks['speaker'].classes == SPEAKERS
  # Every (digit, speaker) keeps the same takes: 0 .. TASK_TAKES - 1.
  takes = {}
  for e in tasks['digit'].entries:
    digit, speaker, take = _name_fields(e.path)
    takes.setdefault((digit, speaker), set()).add(take)
  assert len(takes) == 60
  assert all(t == set(range(build.TASK_TAKES)) for t in takes.values())


def test_labels_csv_is_the_file_names_and_lists_every_clip():
  rows = _labels()
  assert len(rows) == SOURCE_CLIPS
  for r in rows:
    assert _name_fields(r['path']) == (r['digit'], r['speaker'], int(r['take'])), r
  on_disk = {f'audio/{n}' for n in os.listdir(os.path.join(FSDD, 'audio'))}
  assert on_disk == {r['path'] for r in rows}


def test_clips_have_the_recorded_lengths():
  """Every FLAC is 8 kHz mono 16-bit, as long as labels.csv records, and the lengths add up to the
  source recordings' count."""
  rows = _labels()
  for r in rows:
    info = sf.info(os.path.join(FSDD, r['path']))
    found = (info.samplerate, info.channels, info.subtype, info.frames)
    assert found == (8000, 1, 'PCM_16', int(r['samples'])), r['path']
  assert sum(int(r['samples']) for r in rows) == SOURCE_SAMPLES


def test_clips_are_the_source_recordings_sample_for_sample():
  if not os.path.isdir(os.path.join(SOURCE, 'recordings')):
    pytest.skip(f'no source copy at {os.path.normpath(SOURCE)} (the lengths are checked anyway)')
  for r in _labels():
    name = os.path.splitext(os.path.basename(r['path']))[0] + '.wav'
    original, rate = sf.read(os.path.join(SOURCE, 'recordings', name), dtype='int16')
    shipped, _ = sf.read(os.path.join(FSDD, r['path']), dtype='int16')
    assert rate == 8000 and np.array_equal(shipped, original), name


def test_the_decoder_reads_8khz_flac_at_16khz():
  """The project's decoder resamples the 8 kHz clips to the front end's 16 kHz: twice the samples,
  the same signal (its 8 kHz samples are every other output sample, to resampling accuracy)."""
  for r in _labels()[::997]:
    path = os.path.join(FSDD, r['path'])
    wave = decode.load_audio(path, 16000)
    n = int(r['samples'])
    assert wave.dtype == np.float32 and len(wave) == 2 * n
    original = sf.read(path, dtype='float32')[0]
    inner = slice(n // 10, n - n // 10)  # away from the filter's edge effects
    error = wave[::2][inner] - original[inner]
    assert np.sqrt(np.mean(error**2)) < 0.05 * np.sqrt(np.mean(original[inner] ** 2)), path
