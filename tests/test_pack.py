"""Tests of `aasp-data pack`: exact counts for every bad input, lossless round trips, resume."""

import collections
import csv
import json
import os
import shutil

import grain
import numpy as np
import pytest

import audio_factory
from aasp_jax.data import cli
from aasp_jax.data import clips
from aasp_jax.data import pack
from aasp_jax.data import records

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'audio')


def _manifest(path, rows, header=('path', 'labels')):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def _read_pack(out_dir):
  source = grain.sources.ArrayRecordDataSource(pack.list_shards(out_dir))
  return [records.decode_record(source[i]) for i in range(len(source))]


def _ids(out_dir):
  with open(os.path.join(out_dir, pack.IDS_FILE)) as f:
    return f.read().splitlines()


@pytest.fixture(scope='module')
def bad_inputs(tmp_path_factory):
  return audio_factory.make_bad_inputs(tmp_path_factory.mktemp('bad'), long_seconds=600.0)


@pytest.fixture(scope='module')
def good_clips(tmp_path_factory):
  """The committed fixtures plus generated clips at several rates and channel counts."""
  d = tmp_path_factory.mktemp('good')
  for name in os.listdir(FIXTURES):
    if name.endswith('.flac'):
      shutil.copy(os.path.join(FIXTURES, name), d / name)
  os.makedirs(d / 'gen')
  audio_factory.write_wav(d / 'gen' / 'a_8k.wav', audio_factory.noise(1.1, 8000, seed=1), 8000)
  audio_factory.write_flac(
    d / 'gen' / 'b_48k_stereo.flac', audio_factory.noise(0.7, 48000, 2), 48000
  )
  audio_factory.write_wav(
    d / 'gen' / 'c_loud.wav', audio_factory.sine(300, 0.5, 16000, 1.2), 16000, 'FLOAT'
  )
  audio_factory.write_wav(d / 'gen' / 'd_16k.wav', audio_factory.noise(2.0, 16000, seed=4), 16000)
  return str(d)


def test_every_bad_input_is_counted_exactly(tmp_path, bad_inputs):
  rows = [(path, case) for case, path in sorted(bad_inputs.items())]
  source = _manifest(tmp_path / 'bad.csv', rows)
  out = tmp_path / 'out'
  # Two worker processes: skips and records must cross the process boundary intact.
  config = pack.PackConfig(source, str(out), num_shards=3, workers=2)
  report = pack.pack(config, progress=False)

  expected_skips = collections.Counter(audio_factory.EXPECTED_SKIP.values())
  assert report['skipped'] == {r: expected_skips.get(r, 0) for r in clips.SKIP_REASONS}
  expected_handled = collections.Counter(
    t for tags in audio_factory.EXPECTED_HANDLED.values() for t in tags
  )
  assert report['handled'] == {h: expected_handled.get(h, 0) for h in clips.HANDLED}
  assert report['entries_in'] == len(audio_factory.CASES)
  assert report['packed'] == len(audio_factory.EXPECTED_HANDLED)
  assert report['entries_in'] == report['packed'] + report['skipped_total']
  assert report['counts_add_up']
  with open(out / pack.REPORT_FILE) as f:
    assert json.load(f) == report

  with open(out / pack.SKIPPED_FILE) as f:
    skipped = {row['path']: row for row in csv.DictReader(f)}
  assert {p: row['reason'] for p, row in skipped.items()} == {
    bad_inputs[c]: r for c, r in audio_factory.EXPECTED_SKIP.items()
  }
  assert all(row['detail'] for row in skipped.values())

  # 600 s split at max_seconds=120 gives 5 equal pieces; every other good case is one record.
  recs = _read_pack(out)
  assert [r['id'] for r in recs] == _ids(out)
  assert report['records'] == len(recs) == len(audio_factory.EXPECTED_HANDLED) - 1 + 5
  long_id = os.path.relpath(bad_inputs['very_long'], tmp_path).replace(os.sep, '/')
  pieces = [r for r in recs if r['id'].startswith(long_id)]
  assert [r['id'] for r in pieces] == [f'{long_id}#{k}' for k in range(5)]
  assert [r['num_samples'] for r in pieces] == [120 * 16000] * 5
  assert [r['start'] for r in pieces] == [0.0, 120.0, 240.0, 360.0, 480.0]
  assert all(r['labels'] == ['very_long'] for r in pieces)
  whole, _ = clips.load_clip(bad_inputs['very_long'])
  np.testing.assert_array_equal(
    np.concatenate([r['waveform'] for r in pieces]), records.from_int16(records.to_int16(whole))
  )


def test_strict_raises_naming_the_file(tmp_path, bad_inputs):
  source = _manifest(
    tmp_path / 'm.csv', [(bad_inputs['clean'], ''), (bad_inputs['png_as_wav'], '')]
  )
  config = pack.PackConfig(source, str(tmp_path / 'out'), num_shards=1, strict=True)
  with pytest.raises(clips.ClipSkipped, match='unreadable') as info:
    pack.pack(config, progress=False)
  assert bad_inputs['png_as_wav'] in str(info.value)
  assert not os.path.exists(tmp_path / 'out' / pack.REPORT_FILE)
  # The CLI turns it into exit status 1 with the message on stderr.
  argv = ['pack', source, str(tmp_path / 'out2'), '--shards', '1', '--workers', '1', '--strict']
  assert cli.main(argv + ['--no_progress']) == 1


@pytest.mark.parametrize('codec', records.CODECS)
def test_round_trip_is_bit_exact(tmp_path, good_clips, codec):
  out = str(tmp_path / 'out')
  config = pack.PackConfig(good_clips, out, num_shards=3, codec=codec)
  report = pack.pack(config, progress=False)
  names = sorted(
    os.path.relpath(os.path.join(d, f), good_clips).replace(os.sep, '/')
    for d, _, files in os.walk(good_clips)
    for f in files
  )
  assert report['entries_in'] == report['packed'] == len(names) == 8
  assert report['handled'] == {'resampled': 6, 'downmixed': 3, 'split_long': 0, 'clipped': 1}
  # Entry i goes to shard i % 3, in entry order within a shard.
  expected_ids = [names[i] for s in range(3) for i in range(s, len(names), 3)]
  recs = _read_pack(out)
  assert [r['id'] for r in recs] == _ids(out) == expected_ids
  assert report['records_per_shard'] == [3, 3, 2]
  for rec in recs:
    source = os.path.join(good_clips, rec['id'])
    wave, _ = clips.load_clip(source, 16000)
    assert rec['codec'] == codec and rec['source'] == source and rec['start'] == 0.0
    assert rec['sample_rate'] == 16000 and rec['num_samples'] == wave.shape[0]
    np.testing.assert_array_equal(rec['waveform'], records.from_int16(records.to_int16(wave)))


def test_manifest_windows_are_packed(tmp_path):
  path = audio_factory.write_flac(tmp_path / 'speech.flac', audio_factory.noise(12.0, 16000), 16000)
  rows = [
    ('speech.flac', 'a', '', '2'),
    ('speech.flac', 'b', '2.5', '9.5'),
    ('speech.flac', 'c', '9.5', ''),
  ]
  source = _manifest(tmp_path / 'm.csv', rows, header=('path', 'labels', 'start', 'end'))
  out = str(tmp_path / 'out')
  pack.pack(pack.PackConfig(source, out, num_shards=1, max_seconds=5.0), progress=False)
  recs = _read_pack(out)
  whole = records.from_int16(records.to_int16(clips.load_clip(path)[0]))
  # The 7 s window is longer than max_seconds=5: two 3.5 s pieces.
  assert [(r['id'], r['start'], r['num_samples']) for r in recs] == [
    ('speech.flac@0-2', 0.0, 32000),
    ('speech.flac@2.5-9.5#0', 2.5, 56000),
    ('speech.flac@2.5-9.5#1', 6.0, 56000),
    ('speech.flac@9.5-', 9.5, 40000),
  ]
  for r in recs:
    first = int(r['start'] * 16000)
    np.testing.assert_array_equal(r['waveform'], whole[first : first + r['num_samples']])
  assert [r['labels'] for r in recs] == [['a'], ['b'], ['b'], ['c']]


def _pack_files(out_dir):
  """Everything a pack writes, except the run-specific fields of the report."""
  files = {}
  for name in sorted(os.listdir(out_dir)):
    path = os.path.join(out_dir, name)
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        files[name] = f.read()
  report = json.loads(files.pop(pack.REPORT_FILE))
  for key in ('wall_seconds', 'shards_reused', 'out_dir'):
    report.pop(key)
  return files, report


def test_interrupted_pack_resumes_to_the_same_result(tmp_path, good_clips):
  reference = str(tmp_path / 'reference')
  pack.pack(pack.PackConfig(good_clips, reference, num_shards=4), progress=False)

  out = str(tmp_path / 'out')
  config = pack.PackConfig(good_clips, out, num_shards=4)

  def interrupt_after_two(shard):
    if shard == 1:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    pack.pack(config, progress=False, on_shard_done=interrupt_after_two)
  assert sorted(os.listdir(os.path.join(out, pack.DONE_DIR))) == [
    pack.shard_name(0, 4) + '.json',
    pack.shard_name(1, 4) + '.json',
  ]
  with pytest.raises(pack.PackError, match='not a finished pack'):
    pack.list_shards(out)
  # A half-written shard, as a kill during shard 2 would leave it.
  with open(os.path.join(out, pack.shard_name(2, 4) + '.partial'), 'wb') as f:
    f.write(b'half a shard')

  report = pack.pack(config, progress=False)
  assert report['shards_reused'] == 2
  assert _pack_files(out) == _pack_files(reference)

  # A shard whose marker is lost (or whose file no longer matches it) is redone, and only it.
  os.remove(os.path.join(out, pack.DONE_DIR, pack.shard_name(3, 4) + '.json'))
  with open(os.path.join(out, pack.shard_name(0, 4)), 'ab') as f:
    f.write(b'\0')
  report = pack.pack(config, progress=False)
  assert report['shards_reused'] == 2
  assert _pack_files(out) == _pack_files(reference)


def test_a_different_command_on_a_pack_fails(tmp_path, good_clips):
  out = str(tmp_path / 'out')
  pack.pack(pack.PackConfig(good_clips, out, num_shards=2), progress=False)
  for change, match in [
    (dict(codec='pcm16'), "codec: 'flac' there, 'pcm16' now"),
    (dict(num_shards=3), 'num_shards: 2 there, 3 now'),
    (dict(sample_rate=8000), 'sample_rate'),
    (dict(source=FIXTURES), 'source'),
  ]:
    args = dict(source=good_clips, out_dir=out, num_shards=2) | change
    with pytest.raises(pack.PackError, match=match):
      pack.pack(pack.PackConfig(**args), progress=False)
  # Same command line, but the folder changed since: also a different pack.
  audio_factory.write_wav(
    os.path.join(good_clips, 'gen', 'new.wav'), audio_factory.noise(1, 16000), 16000
  )
  try:
    with pytest.raises(pack.PackError, match='entries_in: 8 there, 9 now'):
      pack.pack(pack.PackConfig(good_clips, out, num_shards=2), progress=False)
  finally:
    os.remove(os.path.join(good_clips, 'gen', 'new.wav'))

  other = tmp_path / 'other'
  other.mkdir()
  (other / 'notes.txt').write_text('mine')
  with pytest.raises(pack.PackError, match='not empty'):
    pack.pack(pack.PackConfig(good_clips, str(other), num_shards=2), progress=False)


def test_folder_source_reports_ignored_files_and_empty_shards(tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  audio_factory.write_wav(src / 'a.wav', audio_factory.noise(1.0, 16000), 16000)
  (src / 'readme.md').write_text('not audio')
  out = str(tmp_path / 'out')
  report = pack.pack(pack.PackConfig(str(src), out, num_shards=3), progress=False)
  assert report['ignored_non_audio'] == {'.md': 1}
  assert report['records_per_shard'] == [1, 0, 0]
  assert len(_read_pack(out)) == 1
  (tmp_path / 'nothing').mkdir()
  with pytest.raises(pack.PackError, match='no audio entries'):
    pack.pack(pack.PackConfig(str(tmp_path / 'nothing'), out, num_shards=1), progress=False)


def test_cli_pack_prints_a_summary(tmp_path, good_clips, capsys):
  out = str(tmp_path / 'out')
  argv = ['pack', good_clips, out, '--shards', '2', '--workers', '1', '--codec', 'pcm16']
  assert cli.main(argv + ['--no_progress']) == 0
  printed = capsys.readouterr().out
  assert 'packed 8 of 8 entries into 8 records' in printed
  assert 'entries_in == packed + skipped_total: 8 == 8 + 0 (ok)' in printed
  assert cli.main(['pack', good_clips, out, '--shards', '3', '--no_progress']) == 1
  assert 'holds a different pack' in capsys.readouterr().err


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(num_shards=0), '--shards'),
    (dict(workers=0), '--workers'),
    (dict(codec='ogg'), '--codec'),
    (dict(max_seconds=0.2), '--max_seconds'),
  ],
)
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pack.PackConfig(**(dict(source='x', out_dir='y', num_shards=1) | kwargs))
