"""Tests of folder scans and manifests: fixed order, strict parsing, errors with line numbers."""

import json
import os

import pytest

from aasp_jax.data import manifest
from aasp_jax.data.manifest import Entry


def _touch(root, relpath, content=b'x'):
  path = os.path.join(root, relpath)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(content)
  return path


def _write(path, text):
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return str(path)


def test_scan_finds_nested_audio_in_a_fixed_order(tmp_path, caplog):
  names = [
    'b/z.flac',
    'a.wav',
    'b/a/y.OGG',
    'c/d/e/deep.mp3',
    'B2.aiff',
    'b/notes.txt',
    'cover.png',
  ]
  hidden = ['.hidden.wav', '.cache/x.wav', 'b/._resource.flac']
  for name in names + hidden:
    _touch(tmp_path, name)
  ignored = {}
  entries = manifest.scan_folder(tmp_path, ignored)
  assert [e.clip_id for e in entries] == [
    'B2.aiff',
    'a.wav',
    'b/a/y.OGG',
    'b/z.flac',
    'c/d/e/deep.mp3',
  ]
  assert all(os.path.isabs(e.path) and os.path.isfile(e.path) for e in entries)
  assert entries[2] == Entry(
    path=os.path.join(str(tmp_path), 'b', 'a', 'y.OGG'), clip_id='b/a/y.OGG'
  )
  assert ignored == {'.txt': 1, '.png': 1}
  assert 'ignored 2 non-audio file(s)' in caplog.text
  assert manifest.scan_folder(tmp_path) == entries
  assert manifest.read_entries(tmp_path) == entries


def test_scan_rejects_a_file(tmp_path):
  with pytest.raises(NotADirectoryError, match='not a folder'):
    manifest.scan_folder(_touch(tmp_path, 'a.wav'))


def test_csv_manifest(tmp_path):
  _touch(tmp_path, 'audio/a.flac')
  path = _write(
    tmp_path / 'list.csv',
    '\ufeffpath,labels,start,end,id\n'
    'audio/a.flac,en;female,,,\n'
    '\n'
    'audio/b.wav, music ,30,40.5,\n'
    '/abs/c.wav,,,,my-id\n'
    '"audio/with,comma.wav",x;;y,1.25,,\n',
  )
  entries = manifest.read_manifest(path)
  root = str(tmp_path)
  assert entries == [
    Entry(os.path.join(root, 'audio/a.flac'), ('en', 'female'), None, None, 'audio/a.flac'),
    Entry(os.path.join(root, 'audio/b.wav'), ('music',), 30.0, 40.5, 'audio/b.wav@30-40.5'),
    Entry('/abs/c.wav', (), None, None, 'my-id'),
    Entry(
      os.path.join(root, 'audio/with,comma.wav'),
      ('x', 'y'),
      1.25,
      None,
      'audio/with,comma.wav@1.25-',
    ),
  ]
  assert manifest.read_entries(path) == entries


def test_tsv_and_single_label_column(tmp_path):
  path = _write(tmp_path / 'list.tsv', 'label\tpath\nspeech\tx.wav\n')
  assert manifest.read_manifest(path) == [
    Entry(str(tmp_path / 'x.wav'), ('speech',), clip_id='x.wav')
  ]


def test_jsonl_manifest(tmp_path):
  lines = [
    {'path': 'a.flac', 'labels': ['en', 'female']},
    {'path': 'sub/b.wav', 'label': 'music', 'start': 30, 'end': 40},
    {'path': 'c.wav', 'labels': 'x;y', 'start': None, 'id': 'c'},
  ]
  text = '\n'.join(json.dumps(x) for x in lines[:2]) + '\n\n  \n' + json.dumps(lines[2]) + '\n'
  entries = manifest.read_manifest(_write(tmp_path / 'list.jsonl', text))
  root = str(tmp_path)
  assert entries == [
    Entry(os.path.join(root, 'a.flac'), ('en', 'female'), None, None, 'a.flac'),
    Entry(os.path.join(root, 'sub/b.wav'), ('music',), 30.0, 40.0, 'sub/b.wav@30-40'),
    Entry(os.path.join(root, 'c.wav'), ('x', 'y'), None, None, 'c'),
  ]


@pytest.mark.parametrize(
  'text, line, match',
  [
    ('file,labels\na.wav,x\n', 1, 'unknown column'),
    ('path,lable\na.wav,x\n', 1, r"unknown column\(s\) \['lable'\]"),
    ('labels\nx\n', 1, 'no "path" column'),
    ('path,label,labels\na.wav,x,y\n', 1, 'either a "label" or a "labels"'),
    ('path,path\na.wav,b.wav\n', 1, 'more than once'),
    ('path,start\na.wav,0\nb.wav,ten\n', 3, 'start must be a number'),
    ('path,start,end\na.wav,5,5\n', 2, 'end=5.0 must be greater than start=5.0'),
    ('path,end\n\na.wav,0\n', 3, 'end=0.0 must be greater'),
    ('path,start\na.wav,-1\n', 2, 'finite number >= 0'),
    ('path,start\na.wav,nan\n', 2, 'finite number >= 0'),
    ('path,labels\na.wav,x\nb.wav,y,extra\n', 3, '3 field'),
    ('path,labels\na.wav\n', 2, '1 field'),
    ('path,labels\n,x\n', 2, '"path" must be a non-empty string'),
    ('path\na.wav\nb.wav\n\na.wav\n', 5, r"duplicate id 'a.wav' \(first on line 2\)"),
    ('path,id\na.wav,k\nb.wav,k\n', 3, "duplicate id 'k'"),
    ('path\n"a.wav\n', 2, 'malformed CSV'),
  ],
)
def test_csv_errors_name_the_line(tmp_path, text, line, match):
  path = _write(tmp_path / 'm.csv', text)
  with pytest.raises(ValueError, match=match) as info:
    manifest.read_manifest(path)
  assert f'{path}:{line}:' in str(info.value)


@pytest.mark.parametrize(
  'lines, line, match',
  [
    (['{"path": "a.wav"}', '{"path": "b.wav", '], 2, 'invalid JSON'),
    (['["a.wav"]'], 1, 'expected a JSON object'),
    (['{"path": "a.wav", "lables": ["x"]}'], 1, 'unknown column'),
    (['{"labels": ["x"]}'], 1, 'no "path" column'),
    (['{"path": 3}'], 1, '"path" must be a non-empty string'),
    (['{"path": "a.wav", "labels": [1]}'], 1, 'list of strings'),
    (['{"path": "a.wav", "start": "soon"}'], 1, 'start must be a number'),
    (['{"path": "a.wav", "start": true}'], 1, 'start must be a number'),
    (['{"path": "a.wav", "id": 7}'], 1, '"id" must be a string'),
    (['{"path": "a.wav", "start": 2, "end": 1}'], 1, 'must be greater than start'),
    (['{"path": "a.wav"}', '', '{"path": "./a.wav"}'], 3, "duplicate id 'a.wav'"),
  ],
)
def test_jsonl_errors_name_the_line(tmp_path, lines, line, match):
  path = _write(tmp_path / 'm.jsonl', '\n'.join(lines) + '\n')
  with pytest.raises(ValueError, match=match) as info:
    manifest.read_manifest(path)
  assert f'{path}:{line}:' in str(info.value)


def test_segments_of_one_file_get_distinct_ids(tmp_path):
  path = _write(tmp_path / 'm.csv', 'path,start,end\nlong.wav,0,10\nlong.wav,10,20\nlong.wav,20,\n')
  ids = [e.clip_id for e in manifest.read_manifest(path)]
  assert ids == ['long.wav@0-10', 'long.wav@10-20', 'long.wav@20-']


def test_manifest_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='manifest not found'):
    manifest.read_manifest(tmp_path / 'nope.csv')
  with pytest.raises(ValueError, match='unsupported manifest extension'):
    manifest.read_manifest(_write(tmp_path / 'list.txt', 'path\na.wav\n'))
  with pytest.raises(ValueError, match='empty manifest'):
    manifest.read_manifest(_write(tmp_path / 'empty.csv', '\n\n'))
  assert manifest.read_manifest(_write(tmp_path / 'header_only.csv', 'path,labels\n')) == []
