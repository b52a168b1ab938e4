"""Data guards: skipped clips are replaced per global position (the same batches for any number of
processes and workers), `start_batch` resumes anywhere, no usable data fails fast in one line, data
specs (globs, lists, packs) open as one source, and folder scans neither drop nor loop."""

import json
import os
import shutil
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

import audio_factory
from aasp_jax.audio import presets
from aasp_jax.data import cli, clips, manifest, pack, pipeline, sources
from conftest import REPO_ROOT

SR = 16000
PRESET = presets.get_preset('eat_audiomae', target_length=64)  # 0.655 s clips: fast tests
GLOBAL_BATCH = 8
NUM_BATCHES = 12  # about five epochs of the 18-clip set below


def options(batch_size, **kw):
  base = dict(preset=PRESET, batch_size=batch_size, seed=5, read_threads=2)
  return pipeline.PipelineOptions(**(base | kw))


def write_good(folder, names):
  os.makedirs(folder, exist_ok=True)
  for k, name in enumerate(names):
    audio_factory.write_wav(
      os.path.join(folder, name), audio_factory.noise(1.0 + 0.1 * k, SR, seed=k), SR
    )


def write_bad(folder, count, start=0):
  """`count` files that each fail for a known reason, cycling over four reasons."""
  os.makedirs(folder, exist_ok=True)
  reasons = {}
  for k in range(start, start + count):
    kind = k % 4
    path = os.path.join(folder, f'bad_{k:03d}.wav')
    if kind == 0:
      audio_factory.write_bytes(path, b'')
      reasons[path] = 'empty'
    elif kind == 1:
      audio_factory.write_bytes(path, b'not audio at all' * 8)
      reasons[path] = 'unreadable'
    elif kind == 2:
      audio_factory.write_wav(path, np.zeros(SR, np.float32), SR)
      reasons[path] = 'silent'
    else:
      audio_factory.write_wav(path, audio_factory.noise(0.05, SR, seed=k), SR)
      reasons[path] = 'too_short'
  return reasons


@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
  """A manifest of 18 clips: 12 good, 5 bad files and one missing file, shuffled together."""
  root = tmp_path_factory.mktemp('mixed')
  write_good(str(root / 'audio'), [f'good_{k:02d}.wav' for k in range(12)])
  reasons = write_bad(str(root / 'audio'), 5)
  reasons[str(root / 'audio' / 'gone.wav')] = 'missing'
  names = sorted(os.listdir(root / 'audio')) + ['gone.wav']
  with open(root / 'clips.csv', 'w') as f:
    f.write('path\n' + ''.join(f'audio/{n}\n' for n in names))
  return str(root / 'clips.csv'), reasons


def global_batches(spec, process_count, num_batches, start_batch=0, **kw):
  """Global batches assembled from every host's rows (hosts in process order)."""
  per_host = GLOBAL_BATCH // process_count
  iterators = [
    iter(pipeline.make_dataset(spec, options(per_host, **kw), p, process_count, start_batch))
    for p in range(process_count)
  ]
  out = []
  for _ in range(num_batches):
    host = [next(it) for it in iterators]
    batch = {k: np.concatenate([h[k] for h in host]) for k in host[0] if k != 'skipped'}
    batch['skipped'] = np.sum([h['skipped'] for h in host], axis=0)
    out.append(batch)
  for it in iterators:
    if hasattr(it, 'close'):
      it.close()
  return out


def assert_same(got, want):
  assert len(got) == len(want)
  for k, (g, w) in enumerate(zip(got, want)):
    assert set(g) == set(w)
    for key in w:
      np.testing.assert_array_equal(g[key], w[key], err_msg=f'batch {k}, {key}')


@pytest.fixture(scope='module')
def reference(mixed):
  return global_batches(mixed[0], 1, NUM_BATCHES)


def test_replacement_follows_the_candidate_rule(mixed, reference):
  """Independent of the pipeline's code path: walk each position's candidates in grain's shuffled
  epoch order with the documented stride, and count the bad ones passed on the way."""
  spec, reasons = mixed
  entries = manifest.read_manifest(spec)
  n = len(entries)
  order = grain.MapDataset.range(n).shuffle(seed=5).repeat()
  stride = pipeline.candidate_stride(n)
  assert np.gcd(stride, n) == 1 and stride > 1
  want_index, want_skips = [], np.zeros(len(clips.SKIP_REASONS), np.int64)
  for position in range(NUM_BATCHES * GLOBAL_BATCH):
    epoch, slot = divmod(position, n)
    for t in range(n):
      index = order[epoch * n + (slot + t * stride) % n]
      reason = reasons.get(entries[index].path)
      if reason is None:
        want_index.append(index)
        break
      want_skips[clips.SKIP_REASONS.index(reason)] += 1
  got_index = np.concatenate([b['index'] for b in reference])
  np.testing.assert_array_equal(got_index, want_index)
  np.testing.assert_array_equal(np.sum([b['skipped'] for b in reference], axis=0), want_skips)
  assert want_skips.sum() > NUM_BATCHES  # the data really has skips in most batches
  good = {i for i, e in enumerate(entries) if e.path not in reasons}
  assert set(got_index.tolist()) == good  # every good clip is used, no bad one ever


@pytest.mark.parametrize('process_count', [2, 4])
def test_batches_do_not_depend_on_the_number_of_processes(mixed, reference, process_count):
  assert_same(global_batches(mixed[0], process_count, NUM_BATCHES), reference)


@pytest.mark.parametrize('process_count', [1, 2, 4])
def test_start_batch_continues_the_stream(mixed, reference, process_count):
  k = 5
  got = global_batches(mixed[0], process_count, NUM_BATCHES - k, start_batch=k)
  assert_same(got, reference[k:])


def test_worker_processes_give_the_same_batches(mixed, reference):
  k = 3
  got = global_batches(mixed[0], 2, 6, start_batch=k, num_workers=2)
  assert_same(got, reference[k : k + 6])


def test_log_mel_streams_are_process_independent_too(mixed):
  kw = dict(features='log_mel', crop='random')
  assert_same(global_batches(mixed[0], 2, 3, **kw), global_batches(mixed[0], 1, 3, **kw))


def test_finite_streams_drop_bad_clips_and_start_by_positions(mixed):
  """A finite stream shows each good clip once per epoch (no replacement, skips counted), and
  start_batch skips start_batch global batches' worth of positions."""
  spec, reasons = mixed
  opts = options(4, num_epochs=2, drop_remainder=False)
  batches = list(pipeline.make_dataset(spec, opts, 0, 1))
  index = np.concatenate([b['index'] for b in batches if 'index' in b])
  assert len(index) == 2 * 12 and len(set(index[:12].tolist())) == 12
  assert np.sum([b['skipped'] for b in batches]) == 2 * len(reasons)
  # start_batch=3 starts at position 3 * 4: the tail of the same examples, in the same order.
  tail = list(pipeline.make_dataset(spec, opts, 0, 1, start_batch=3))
  rest = np.concatenate([b['index'] for b in tail if 'index' in b])
  assert 0 < len(rest) < len(index)
  np.testing.assert_array_equal(rest, index[-len(rest) :])


# ------------------------------------------------------------------------------------------------
# No usable data: a clear error, never a hang.


@pytest.fixture(scope='module')
def all_bad(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('all_bad'))
  write_bad(folder, 40)
  return folder


def test_stream_without_a_usable_clip_raises_in_threads(all_bad):
  it = iter(pipeline.make_dataset(all_bad, options(2), 0, 1))
  with pytest.raises(sources.DataError) as err:
    next(it)
  message = str(err.value)
  assert '\n' not in message and message.startswith(all_bad)
  assert 'all 40 clip(s) failed' in message
  assert 'empty 10, unreadable 10, silent 10, too_short 10' in message
  assert 'bad_0' in message and 'skipped (' in message  # one example file with its reason


def test_stream_without_a_usable_clip_raises_from_a_worker_process(all_bad):
  it = iter(pipeline.make_dataset(all_bad, options(2, num_workers=1), 0, 1))
  with pytest.raises(sources.DataError, match='all 40 clip\\(s\\) failed'):
    next(it)
  it.close()


def test_check_source_fails_fast_on_an_all_bad_folder(all_bad):
  t0 = time.monotonic()
  with pytest.raises(sources.DataError) as err:
    pipeline.check_source(all_bad, options(2))
  assert time.monotonic() - t0 < 30
  assert 'no usable clip: all 40 clip(s) failed' in str(err.value)
  # The time bound: with no time at all, one clip is checked and the message says so.
  with pytest.raises(sources.DataError, match='among the first 1 of 40 checked in 0 s'):
    pipeline.check_source(all_bad, options(2), max_seconds=0)


def test_check_source_summarises_a_usable_source(mixed):
  spec, reasons = mixed
  summary = pipeline.check_source(spec, options(2))
  assert summary['clips'] == 18 and summary['source'] == spec
  assert 1 <= summary['checked'] <= 1 + len(reasons)
  assert sum(summary['skipped'].values()) == summary['checked'] - 1


@pytest.fixture(scope='module')
def packs(tmp_path_factory):
  """A finished pack of 3 clips, an empty pack (every entry skipped) and an unfinished one."""
  root = tmp_path_factory.mktemp('packs')
  write_good(str(root / 'good'), ['a.wav', 'b.wav', 'c.wav'])
  pack.pack(pack.PackConfig(str(root / 'good'), str(root / 'demo'), num_shards=2), progress=False)
  write_bad(str(root / 'bad'), 4)
  with pytest.raises(pack.PackError, match='packed 0 of 4 entries'):
    pack.pack(pack.PackConfig(str(root / 'bad'), str(root / 'empty'), num_shards=1), progress=False)
  shutil.copytree(root / 'demo', root / 'unfinished')
  os.remove(root / 'unfinished' / pack.REPORT_FILE)
  return root


@pytest.mark.parametrize(
  'spec, match',
  [
    ('empty', 'the pack holds no records \\(0 of 4 entries packed; skipped: empty 1, unread'),
    ('unfinished', 'unfinished|not a finished pack'),
    ('unfinished/clips-*.array_record', 'is an unfinished pack'),
    ('nope', 'does not exist'),
    ('demo/x-*.array_record', 'matches no file'),
    ('good/a.wav', 'unsupported manifest extension'),
  ],
)
def test_check_source_refuses_bad_specs_in_one_line(packs, spec, match):
  t0 = time.monotonic()
  with pytest.raises(sources.DataError, match=match) as err:
    pipeline.check_source(str(packs / spec), options(2))
  assert '\n' not in str(err.value) and time.monotonic() - t0 < 30


def test_sources_with_zero_entries_are_refused(tmp_path):
  (tmp_path / 'empty_dir').mkdir()
  (tmp_path / 'empty_dir' / 'notes.txt').write_text('x')
  with pytest.raises(sources.DataError, match='no audio files found \\(non-audio files: .txt: 1'):
    pipeline.check_source(str(tmp_path / 'empty_dir'), options(2))
  (tmp_path / 'header.csv').write_text('path,label\n')
  with pytest.raises(sources.DataError, match='the manifest lists no clips'):
    pipeline.check_source(str(tmp_path / 'header.csv'), options(2))
  (tmp_path / 'typo.csv').write_text('path,lable\na.wav,x\n')
  with pytest.raises(sources.DataError, match='typo.csv:1: unknown column'):
    pipeline.make_dataset(str(tmp_path / 'typo.csv'), options(2), 0, 1)


def test_gs_paths_name_the_mounted_path():
  with pytest.raises(sources.DataError) as err:
    sources.open_source('gs://my-bucket/shards/train-*.array_record')
  assert str(err.value) == (
    'gs://my-bucket/shards/train-*.array_record: gs:// paths are not read directly; mount the '
    'bucket with Cloud Storage FUSE (launch/tpu_vm.sh and launch/xpk.sh do it with '
    '--data-bucket=my-bucket) and give the mounted path /gcs/my-bucket/shards/train-*.array_record.'
  )
  assert issubclass(sources.DataError, pipeline.sources.configuration.ConfigError)


# ------------------------------------------------------------------------------------------------
# Data specs: globs, shard files and lists open as one source.


def test_specs_globs_shards_and_lists(packs, mixed):
  demo = str(packs / 'demo')
  whole = sources.open_source(demo)
  records = [whole[i]['record'] for i in range(len(whole))]
  for spec in (f'{demo}/*.array_record', f'{demo}/clips-*', [f'{demo}/clips-*.array_record']):
    opened = sources.open_source(spec)
    assert [opened[i]['record'] for i in range(len(opened))] == records
  first = sources.open_source(f'{demo}/{pack.shard_name(0, 2)}')
  assert len(first) == 2 and first[1]['record'] == records[1]
  manifest_spec = mixed[0]
  entries = sources.open_source(manifest_spec)
  lists = (f'{manifest_spec},{demo}', [manifest_spec, demo], f' {manifest_spec} , {demo}/clips-*')
  for spec in lists:
    both = sources.open_source(spec)
    assert len(both) == len(entries) + len(records)
    assert both[3]['path'] == entries[3]['path']
    third_record = both[len(entries) + 2]
    assert third_record['record'] == records[2] and third_record['index'] == 20
  # A concatenation feeds the pipeline: every good clip of both parts shows up.
  ds = pipeline.make_dataset(f'{manifest_spec},{demo}', options(3, num_epochs=1), 0, 1)
  seen = np.concatenate([b['index'] for b in ds if 'index' in b])
  assert sorted(seen.tolist()) == sorted(
    [i for i in range(len(entries)) if entries[i]['path'] not in mixed[1]] + [18, 19, 20]
  )


def test_cli_pack_of_nothing_fails_naming_the_reasons(tmp_path, capsys):
  """A manifest written relative to the current folder instead of its own: exit 1, and why."""
  write_good(str(tmp_path / 'data' / 'audio'), ['a.wav', 'b.wav'])
  (tmp_path / 'lists').mkdir()
  (tmp_path / 'lists' / 'train.csv').write_text('path\ndata/audio/a.wav\ndata/audio/b.wav\n')
  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    status = cli.main(['pack', 'lists/train.csv', 'out', '--shards', '1', '--workers', '1',
                       '--no_progress'])  # fmt: skip
  finally:
    os.chdir(cwd)
  err = capsys.readouterr().err
  assert status == 1
  assert 'packed 0 of 2 entries (skipped: missing 2; e.g. ' in err
  assert str(tmp_path / 'lists' / 'data' / 'audio' / 'a.wav') in err  # resolved: manifest folder
  assert "data/audio/a.wav exists relative to the current folder, but manifest paths" in err
  assert 'skipped.csv' in err
  # Written relative to the manifest's folder, the same files pack.
  (tmp_path / 'lists' / 'ok.csv').write_text('path\n../data/audio/a.wav\n../data/audio/b.wav\n')
  report = pack.pack(
    pack.PackConfig(str(tmp_path / 'lists' / 'ok.csv'), str(tmp_path / 'ok'), num_shards=1),
    progress=False,
  )
  assert report['packed'] == 2


# ------------------------------------------------------------------------------------------------
# Folder scans and odd files.


def test_symlinked_folders_are_followed_and_loops_are_not(tmp_path, caplog):
  root, elsewhere = tmp_path / 'kits', tmp_path / 'elsewhere'
  write_good(str(root / 'kit_a'), [f'a{k}.wav' for k in range(6)])
  write_good(str(elsewhere / 'kit_b'), [f'b{k}.wav' for k in range(6)])
  os.symlink(elsewhere / 'kit_b', root / 'kit_b')
  os.symlink(root, root / 'kit_a' / 'loop')  # back to the top: must not be entered
  entries = manifest.scan_folder(root)
  assert [e.clip_id for e in entries] == [f'kit_a/a{k}.wav' for k in range(6)] + [
    f'kit_b/b{k}.wav' for k in range(6)
  ]
  assert 'symlink loops' in caplog.text and 'kit_a/loop' in caplog.text
  config = pack.PackConfig(str(root), str(tmp_path / 'out'), num_shards=1)
  report = pack.pack(config, progress=False)
  assert report['entries_in'] == report['packed'] == 12


def test_link_problems_are_named(tmp_path):
  a, b = tmp_path / 'a.wav', tmp_path / 'b.wav'
  os.symlink(b, a)
  os.symlink(a, b)
  with pytest.raises(clips.ClipSkipped) as err:
    clips.load_clip(a)
  assert err.value.reason == 'unreadable' and 'symlink loop' in err.value.detail
  os.symlink(tmp_path / 'nowhere.wav', tmp_path / 'dangling.wav')
  with pytest.raises(clips.ClipSkipped) as err:
    clips.load_clip(tmp_path / 'dangling.wav')
  assert err.value.reason == 'missing' and 'broken symlink' in err.value.detail
  with pytest.raises(sources.DataError, match='symlink loop'):
    sources.open_source(str(a))


PERMISSION_PROBE = r"""
import json, sys
from aasp_jax.data import clips, manifest, sources
root = sys.argv[1]
out = {}
try:
  clips.load_clip(root + '/locked.wav')
except clips.ClipSkipped as e:
  out['clip'] = [e.reason, e.detail]
unreadable = []
entries = manifest.scan_folder(root + '/kits', unreadable=unreadable)
out['scan'] = [len(entries), unreadable]
for name in ('locked.csv', 'locked_dir'):
  try:
    sources.open_source(root + '/' + name)
  except sources.DataError as e:
    out[name] = str(e)
print(json.dumps(out))
"""


def test_permission_problems_are_named_not_dropped(tmp_path):
  """Runs without the power to bypass file permissions (a non-root user, or root without
  CAP_DAC_OVERRIDE through setpriv), where chmod 000 really denies access."""
  write_good(str(tmp_path / 'kits' / 'open'), ['a.wav', 'b.wav'])
  write_good(str(tmp_path / 'kits' / 'closed'), ['c.wav'])
  write_good(str(tmp_path), ['locked.wav'])
  (tmp_path / 'locked.csv').write_text('path\nlocked.wav\n')
  (tmp_path / 'locked_dir').mkdir()
  for path in ('kits/closed', 'locked.wav', 'locked.csv', 'locked_dir'):
    os.chmod(tmp_path / path, 0)
  command = [sys.executable, '-c', PERMISSION_PROBE, str(tmp_path)]
  if os.geteuid() == 0:
    if not shutil.which('setpriv'):
      pytest.skip('running as root without setpriv: permissions cannot be denied')
    command = ['setpriv', '--bounding-set=-dac_override,-dac_read_search', *command]
  try:
    ran = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  finally:
    for path in ('kits/closed', 'locked.wav', 'locked.csv', 'locked_dir'):
      os.chmod(tmp_path / path, 0o755)
  if ran.returncode and ran.stderr.startswith('setpriv:'):
    pytest.skip(f'setpriv cannot drop capabilities here: {ran.stderr.strip()}')
  assert ran.returncode == 0, ran.stderr
  out = json.loads(ran.stdout.splitlines()[-1])
  assert out['clip'] == ['unreadable', 'permission denied']
  assert out['scan'] == [2, [f'{tmp_path}/kits/closed: permission denied']]
  assert out['locked.csv'] == (
    f'{tmp_path}/locked.csv: permission denied; fix its permissions or give another path.'
  )
  assert out['locked_dir'].startswith(f'{tmp_path}/locked_dir: permission denied')
