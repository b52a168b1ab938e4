"""Dataset readers on tiny datasets in the real layouts (`dataset_layouts`), checked against the
metadata files parsed independently here."""

import csv
import itertools
import json
import logging
import os
import shutil

import dataset_layouts
import numpy as np
import pytest
import soundfile as sf

from aasp_jax.evaluate import datasets

K = 3  # classes per layout


@pytest.fixture(scope='module')
def layouts(tmp_path_factory):
  """{name: root} of unmodified layouts; tests that break a layout build their own copy."""
  built = {}
  for name, clips in (('esc50', 5), ('us8k', 10), ('nsynth', 2), ('spc2', 2), ('audioset', 2)):
    root = tmp_path_factory.mktemp(name)
    built[name] = dataset_layouts.build_layout(name, root, clips, K, seconds=0.5)
  return built


def fresh(name, tmp_path, clips=2):
  return dataset_layouts.build_layout(name, tmp_path / name, clips, K, seconds=0.25)


def csv_rows(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def read_text(path):
  with open(path) as f:
    return f.read()


def write_text(path, text):
  with open(path, 'w') as f:
    f.write(text)


def check_common(labelled, name, size):
  assert labelled.name == name and len(labelled) == len(labelled.entries) == size
  assert len(labelled.splits) == size
  assert all(os.path.isabs(e.path) and os.path.isfile(e.path) for e in labelled.entries)
  assert len({e.clip_id for e in labelled.entries}) == size
  assert labelled.missing_audio == 0


def test_esc50_labels_folds_and_class_order_follow_the_csv(layouts):
  root = layouts['esc50']
  labelled = datasets.read_dataset('esc50', root)
  rows = csv_rows(os.path.join(root, 'meta', 'esc50.csv'))
  check_common(labelled, 'esc50', 5 * K)
  assert not labelled.multilabel and set(labelled.splits) == {'train'}
  # Classes ordered by target, not by name (the layout uses targets 0, 16, 32).
  by_target = sorted({(int(r['target']), r['category']) for r in rows})
  assert (
    labelled.class_names == tuple(c for _, c in by_target) == ('dog', 'wind', 'keyboard_typing')
  )
  want = {
    os.path.join(root, 'audio', r['filename']): ((r['category'],), int(r['fold'])) for r in rows
  }
  got = {e.path: (e.labels, f) for e, f in zip(labelled.entries, labelled.folds)}
  assert got == want
  assert sorted(set(labelled.folds)) == [1, 2, 3, 4, 5]


def test_us8k_reads_each_slice_from_its_fold_folder(layouts):
  root = layouts['us8k']
  labelled = datasets.read_dataset('us8k', root)
  rows = csv_rows(os.path.join(root, 'metadata', 'UrbanSound8K.csv'))
  check_common(labelled, 'us8k', 10 * K)
  by_id = sorted({(int(r['classID']), r['class']) for r in rows})
  assert labelled.class_names == tuple(c for _, c in by_id)
  want = {
    os.path.join(root, 'audio', f'fold{r["fold"]}', r['slice_file_name']): (
      (r['class'],),
      int(r['fold']),
    )
    for r in rows
  }
  assert {e.path: (e.labels, f) for e, f in zip(labelled.entries, labelled.folds)} == want
  assert sorted(set(labelled.folds)) == list(range(1, 11))
  assert all(e.start is None and e.end is None for e in labelled.entries)  # slices are pre-cut


@pytest.mark.parametrize('name', ['esc50', 'us8k'])
def test_fold_split_holds_out_exactly_one_fold(layouts, name):
  labelled = datasets.read_dataset(name, layouts[name])
  everything = {e.clip_id for e in labelled.entries}
  for fold in sorted(set(labelled.folds)):
    train, test = labelled.fold_split(fold)
    assert set(test.folds) == {fold} and fold not in train.folds
    test_ids, train_ids = {e.clip_id for e in test.entries}, {e.clip_id for e in train.entries}
    assert test_ids | train_ids == everything and not test_ids & train_ids
    assert len(test) == sum(f == fold for f in labelled.folds) == K  # every fold holds each class
    assert {e.labels[0] for e in test.entries} == set(labelled.class_names)
    assert train.class_names == test.class_names == labelled.class_names
  with pytest.raises(ValueError, match='no clip in fold 11'):
    labelled.fold_split(11)
  with pytest.raises(ValueError, match='fold_split'):
    labelled.split('test')


def test_nsynth_labels_are_instrument_families_and_splits_come_from_the_folders(layouts):
  root = layouts['nsynth']
  labelled = datasets.read_dataset('nsynth', root)
  check_common(labelled, 'nsynth', 3 * 2 * K)
  assert labelled.class_names == dataset_layouts.NSYNTH_FAMILIES and labelled.folds is None
  want = {}
  for split in ('train', 'valid', 'test'):
    with open(os.path.join(root, f'nsynth-{split}', 'examples.json')) as f:
      for note, example in json.load(f).items():
        path = os.path.join(root, f'nsynth-{split}', 'audio', f'{note}.wav')
        want[path] = ((example['instrument_family_str'],), split)
  got = {e.path: (e.labels, s) for e, s in zip(labelled.entries, labelled.splits)}
  assert got == want
  valid = datasets.read_dataset('nsynth', root, split='valid')
  assert set(valid.splits) == {'valid'} and len(valid) == 2 * K
  assert valid.entries == labelled.split('valid').entries
  with pytest.raises(ValueError, match='no folds'):
    labelled.fold_split(1)


def test_nsynth_reads_the_split_folders_that_exist(tmp_path):
  root = fresh('nsynth', tmp_path)
  shutil.rmtree(os.path.join(root, 'nsynth-valid'))
  labelled = datasets.read_dataset('nsynth', root)
  assert sorted(set(labelled.splits)) == ['test', 'train'] and len(labelled) == 2 * 2 * K
  with pytest.raises(FileNotFoundError, match='nsynth-valid'):
    datasets.read_dataset('nsynth', root, split='valid')
  os.remove(os.path.join(root, 'nsynth-test', 'examples.json'))
  with pytest.raises(FileNotFoundError, match=r'nsynth-test.examples\.json.*NSynth:'):
    datasets.read_dataset('nsynth', root)
  shutil.rmtree(os.path.join(root, 'nsynth-test'))
  shutil.rmtree(os.path.join(root, 'nsynth-train'))
  with pytest.raises(FileNotFoundError, match='no split folder'):
    datasets.read_dataset('nsynth', root)


def test_nsynth_rejects_a_family_id_that_disagrees_with_its_name(tmp_path):
  root = fresh('nsynth', tmp_path)
  path = os.path.join(root, 'nsynth-test', 'examples.json')
  examples = json.loads(read_text(path))
  note = min(examples)
  examples[note]['instrument_family'] = 7
  write_text(path, json.dumps(examples))
  with pytest.raises(ValueError, match=f'examples.json: note {note!r}'):
    datasets.read_dataset('nsynth', root)


def test_spc2_splits_follow_the_lists_and_background_noise_is_no_class(layouts):
  root = layouts['spc2']
  labelled = datasets.read_dataset('spc2', root)
  check_common(labelled, 'spc2', 3 * 2 * K)
  words = sorted(
    d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d[0] != '_'
  )
  assert labelled.class_names == tuple(words) and len(words) == K
  assert os.path.isdir(os.path.join(root, '_background_noise_'))
  lists = {}
  for split, filename in (('valid', 'validation_list.txt'), ('test', 'testing_list.txt')):
    lines = read_text(os.path.join(root, filename)).splitlines()
    lists.update({line.strip(): split for line in lines})
  for e, split in zip(labelled.entries, labelled.splits):
    relpath = os.path.relpath(e.path, root).replace(os.sep, '/')
    assert split == lists.get(relpath, 'train')
    assert e.labels == (relpath.split('/')[0],)
  assert [labelled.splits.count(s) for s in ('train', 'valid', 'test')] == [2 * K] * 3


def test_spc2_keeps_and_counts_a_listed_file_that_is_missing(tmp_path, caplog):
  root = fresh('spc2', tmp_path)
  listed = read_text(os.path.join(root, 'testing_list.txt')).splitlines()[0].strip()
  os.remove(os.path.join(root, listed))
  with caplog.at_level(logging.WARNING, logger='aasp_jax.evaluate.datasets'):
    labelled = datasets.read_dataset('spc2', root)
  assert labelled.missing_audio == 1 and len(labelled) == 3 * 2 * K
  missing = [e for e in labelled.entries if not os.path.exists(e.path)]
  assert [e.clip_id for e in missing] == [listed]
  assert '1 of 18 listed audio files are missing' in caplog.text


def test_audioset_labels_are_display_names_of_the_segment_mids(layouts):
  root = layouts['audioset']
  labelled = datasets.read_dataset('audioset', root)
  check_common(labelled, 'audioset', 2 * 2 * K)
  assert labelled.multilabel and labelled.folds is None
  classes = csv_rows(os.path.join(root, 'class_labels_indices.csv'))
  assert labelled.class_names == tuple(r['display_name'] for r in classes)
  name_of = {r['mid']: r['display_name'] for r in classes}
  want = {}
  for stem, split in (('balanced_train_segments', 'train'), ('eval_segments', 'test')):
    for line in read_text(os.path.join(root, f'{stem}.csv')).splitlines():
      if line.startswith('#'):
        continue
      ytid, _, _, labels = line.split(', ', 3)
      names = {name_of[m] for m in labels.strip().strip('"').split(',')}
      want[ytid] = (names, split)
  got = {}
  for e, split in zip(labelled.entries, labelled.splits):
    ytid = os.path.splitext(os.path.basename(e.path))[0].rsplit('_', 1)[0]
    got[ytid] = (set(e.labels), split)
  assert got == want
  assert any(len(e.labels) == 2 for e in labelled.entries)
  assert 'Male speech, man speaking' in labelled.class_names  # a comma inside a quoted name
  test_only = datasets.read_dataset('audioset', root, split='test')
  assert set(test_only.splits) == {'test'} and len(test_only) == 2 * K
  subset = datasets.read_dataset('audioset', root, audioset_segments=['eval_segments'])
  assert subset.entries == test_only.entries
  with pytest.raises(ValueError, match="no 'valid' split"):
    datasets.read_dataset('audioset', root, split='valid')


def test_audioset_counts_and_logs_missing_audio_and_accepts_the_naming_conventions(
  tmp_path, caplog
):
  root = fresh('audioset', tmp_path)
  train_dir = os.path.join(root, 'audio', 'balanced_train_segments')
  eval_dir = os.path.join(root, 'audio', 'eval_segments')
  train_files, eval_files = sorted(os.listdir(train_dir)), sorted(os.listdir(eval_dir))
  os.remove(os.path.join(eval_dir, eval_files[0]))
  os.remove(os.path.join(eval_dir, eval_files[1]))
  # '<YTID>_30.000.wav' -> 'Y<YTID>.wav' (PANNs) and '<YTID>_<start, shortest>.wav'.
  first_ytid, _ = train_files[0][: -len('.wav')].rsplit('_', 1)
  os.rename(os.path.join(train_dir, train_files[0]), os.path.join(train_dir, f'Y{first_ytid}.wav'))
  second_ytid, second_start = train_files[1][: -len('.wav')].rsplit('_', 1)
  shortest = f'{second_ytid}_{float(second_start):g}.wav'
  os.rename(os.path.join(train_dir, train_files[1]), os.path.join(train_dir, shortest))
  with caplog.at_level(logging.INFO, logger='aasp_jax.evaluate.datasets'):
    labelled = datasets.read_dataset('audioset', root)
  assert labelled.missing_audio == 2
  assert labelled.splits.count('train') == 2 * K and labelled.splits.count('test') == 2 * K - 2
  assert all(os.path.isfile(e.path) for e in labelled.entries)
  names = {os.path.basename(e.path) for e in labelled.entries}
  assert {f'Y{first_ytid}.wav', shortest} <= names
  assert f'{2 * K - 2} of {2 * K} listed segments' in caplog.text and '2 missing' in caplog.text
  assert f'{2 * K} of {2 * K} listed segments' in caplog.text
  for name in os.listdir(eval_dir):
    os.remove(os.path.join(eval_dir, name))
  with pytest.raises(FileNotFoundError, match=r'none of the 6 segments of .*eval_segments\.csv'):
    datasets.read_dataset('audioset', root)


def test_audioset_rejects_a_label_missing_from_the_class_list(tmp_path):
  root = fresh('audioset', tmp_path)
  path = os.path.join(root, 'eval_segments.csv')
  lines = read_text(path).splitlines(keepends=True)
  lines[3] = lines[3].replace('"/m/', '"/m/unknown,/m/', 1)
  write_text(path, ''.join(lines))
  with pytest.raises(ValueError, match=r'eval_segments\.csv:4: .*/m/unknown'):
    datasets.read_dataset('audioset', root)


@pytest.mark.parametrize(
  'name, metadata',
  [
    ('esc50', 'meta/esc50.csv'),
    ('us8k', 'metadata/UrbanSound8K.csv'),
    ('spc2', 'validation_list.txt'),
    ('audioset', 'class_labels_indices.csv'),
    ('audioset', 'balanced_train_segments.csv'),
  ],
)
def test_missing_metadata_names_the_file_and_the_layout(tmp_path, name, metadata):
  root = fresh(name, tmp_path)
  os.remove(os.path.join(root, metadata))
  if metadata == 'balanced_train_segments.csv':
    os.remove(os.path.join(root, 'eval_segments.csv'))
  expected = os.path.join(root, metadata) if name != 'audioset' or 'class' in metadata else root
  with pytest.raises(FileNotFoundError) as error:
    datasets.read_dataset(name, root)
  assert expected in str(error.value) and datasets.LAYOUTS[name] in str(error.value)


@pytest.mark.parametrize('name', ['esc50', 'us8k', 'nsynth'])
def test_a_missing_clip_is_kept_for_the_pipeline_and_all_missing_is_an_error(tmp_path, name):
  root = fresh(name, tmp_path)
  labelled = datasets.read_dataset(name, root)
  os.remove(labelled.entries[0].path)
  again = datasets.read_dataset(name, root)
  assert again.entries == labelled.entries and again.missing_audio == 1
  for e in labelled.entries[1:]:
    os.remove(e.path)
  with pytest.raises(FileNotFoundError, match='none of the'):
    datasets.read_dataset(name, root)


def test_inconsistent_or_malformed_metadata_names_the_line(tmp_path):
  root = fresh('esc50', tmp_path)
  path = os.path.join(root, 'meta', 'esc50.csv')
  lines = read_text(path).splitlines(keepends=True)
  original = list(lines)
  lines[2] = lines[2].replace(',wind,', ',dog,').replace(',keyboard_typing,', ',dog,')
  write_text(path, ''.join(lines))
  with pytest.raises(ValueError, match=r'esc50\.csv:3: target=\d+ with category=.dog.'):
    datasets.read_dataset('esc50', root)
  fields = original[4].split(',')
  fields[1] = 'one'
  write_text(path, ''.join(original[:4] + [','.join(fields)] + original[5:]))
  with pytest.raises(ValueError, match=r"esc50\.csv:5: fold must be an integer, got 'one'"):
    datasets.read_dataset('esc50', root)


def test_bad_names_and_roots():
  with pytest.raises(ValueError, match=r"unknown dataset 'esc10'.*'esc50', 'us8k', 'nsynth'"):
    datasets.read_dataset('esc10', '/nowhere')
  with pytest.raises(FileNotFoundError, match='root folder not found: /nowhere'):
    datasets.read_dataset('us8k', '/nowhere')
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    datasets.read_dataset('spc2', '/nowhere', split='dev')
  with pytest.raises(ValueError, match='AudioSet only'):
    datasets.read_dataset('esc50', '/nowhere', audioset_segments=['eval_segments'])


def test_select_takes_indices_or_a_mask_and_keeps_folds_in_step(layouts):
  labelled = datasets.read_dataset('us8k', layouts['us8k'])
  picked = labelled.select([5, 0, 7])
  assert picked.entries == tuple(labelled.entries[i] for i in (5, 0, 7))
  assert picked.folds == tuple(labelled.folds[i] for i in (5, 0, 7))
  mask = np.arange(len(labelled)) % 3 == 0
  assert labelled.select(mask).entries == labelled.entries[::3]
  assert len(labelled.select([])) == 0
  with pytest.raises(ValueError, match='one value per entry'):
    labelled.select(mask[:-1])
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    labelled.split('dev')


def test_layout_audio_is_real_and_each_class_has_its_own_tone(layouts):
  """The fixture audio decodes at the layout's rate and length, and a clip's strongest frequency
  identifies its class (what lets a fine-tuned model separate them)."""
  for name in dataset_layouts.LAYOUT_NAMES:
    labelled = datasets.read_dataset(name, layouts[name])
    peaks = {}
    for e in labelled.entries:
      if len(e.labels) != 1:
        continue
      wave, rate = sf.read(e.path)
      assert rate == 16000 and len(wave) == 8000, (name, e.path)
      peak = np.argmax(np.abs(np.fft.rfft(wave))) * rate / len(wave)
      peaks.setdefault(e.labels[0], []).append(peak)
    assert len(peaks) == K, name
    ranges = sorted((min(p), max(p)) for p in peaks.values())
    for (_, high), (low, _) in itertools.pairwise(ranges):
      assert low > 1.5 * high, (name, ranges)  # far apart, no overlap between classes
