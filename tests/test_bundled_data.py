"""The bundled Sonic Pi folder (data/sonicpi) is complete, in the front end's format, and its probe
split follows the rule its README states, recomputed here from the file names alone.
"""

import collections
import os

import pytest
import soundfile as sf

from aasp_jax.data import manifest
from conftest import REPO_ROOT

DATA = os.path.join(REPO_ROOT, 'data', 'sonicpi')
AUDIO = os.path.join(DATA, 'audio')
NUM_CLIPS = 206
PROBE_CATEGORIES = 10
PROBE_CLIPS = 167


def file_names(entries):
  return [os.path.basename(e.path) for e in entries]


def prefix(name):
  return name.split('_')[0]


@pytest.fixture(scope='module')
def all_entries():
  return manifest.read_manifest(os.path.join(DATA, 'labels.csv'))


@pytest.fixture(scope='module')
def probe_entries():
  train = manifest.read_manifest(os.path.join(DATA, 'probe_train.csv'))
  test = manifest.read_manifest(os.path.join(DATA, 'probe_test.csv'))
  return train, test


def test_every_clip_is_16khz_mono_pcm16_flac():
  names = sorted(os.listdir(AUDIO))
  assert len(names) == NUM_CLIPS
  for name in names:
    info = sf.info(os.path.join(AUDIO, name))
    assert (info.format, info.subtype) == ('FLAC', 'PCM_16'), name
    assert (info.samplerate, info.channels) == (16000, 1), name
    assert info.frames > 0, name


def test_labels_csv_covers_every_file_with_its_prefix(all_entries):
  assert sorted(file_names(all_entries)) == sorted(os.listdir(AUDIO))
  for e in all_entries:
    assert os.path.dirname(e.path) == AUDIO
    assert e.labels == (prefix(os.path.basename(e.path)),), e.clip_id


def test_licence_and_provenance_ship_with_the_audio():
  with open(os.path.join(DATA, 'LICENSE'), encoding='utf-8') as f:
    assert f.read().startswith('CC0 1.0 Universal')
  assert os.path.getsize(os.path.join(DATA, 'PROVENANCE.md')) > 0


def test_probe_split_follows_the_stated_rule(all_entries, probe_entries):
  train, test = probe_entries
  by_category = collections.defaultdict(list)
  for name in file_names(all_entries):
    by_category[prefix(name)].append(name)
  probe_categories = {c for c, names in by_category.items() if len(names) >= 10}
  assert len(probe_categories) == PROBE_CATEGORIES
  # The rule, independently: within a category sorted by file name, positions 3, 7, 11, ... test.
  want_test, want_train = set(), set()
  for category in probe_categories:
    for i, name in enumerate(sorted(by_category[category])):
      (want_test if i % 4 == 3 else want_train).add(name)
  train_names, test_names = set(file_names(train)), set(file_names(test))
  assert len(train_names) == len(train) and len(test_names) == len(test)  # no duplicates
  assert not train_names & test_names
  assert test_names == want_test
  assert train_names == want_train
  assert len(train) + len(test) == PROBE_CLIPS
  assert {e.labels[0] for e in train} == {e.labels[0] for e in test} == probe_categories
  for e in train + test:
    assert e.labels == (prefix(os.path.basename(e.path)),)
