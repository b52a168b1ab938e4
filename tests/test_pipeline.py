"""The grain pipeline: skip accounting on bad input, per-host sharding, crops, features, resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

import audio_factory
from aasp_jax.audio import fbank_host, presets
from aasp_jax.data import clips, manifest, pipeline, sources
from conftest import REPO_ROOT

SR = 16000
PRESET = presets.get_preset('eat_audiomae', target_length=64)  # 0.655 s clips: fast tests


def write_clips(folder, n, seconds=1.0, seed=0):
  """n distinct noise-plus-tone clips; clip i has amplitude ~(i + 1) / (n + 1)."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i in range(n):
    t = np.arange(int(seconds * SR)) / SR
    wave = 0.05 * rng.standard_normal(len(t)) + 0.5 * (i + 1) / (n + 1) * np.sin(
      2 * np.pi * 440 * t
    )
    path = os.path.join(folder, f'clip_{i:03d}.wav')
    sf.write(path, wave.astype(np.float32), SR, subtype='PCM_16')
    paths.append(path)
  return paths


def options(**kw):
  base = dict(preset=PRESET, batch_size=2, seed=0, num_epochs=1, drop_remainder=False)
  base.update(kw)
  return pipeline.PipelineOptions(**base)


def collect(ds):
  """(example batches, their source indices, summed skip counts incl. the host-only tail batch)."""
  everything = list(ds)
  batches = [b for b in everything if 'index' in b]
  assert all(b.get('unbatched', 0) == 0 for b in everything)
  indices = np.concatenate([b['index'] for b in batches]) if batches else np.zeros(0, int)
  skipped = np.sum([b['skipped'] for b in everything], axis=0)
  return batches, indices, skipped


@pytest.fixture(scope='module')
def clip_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('clips'))
  write_clips(folder, 12)
  return folder


def test_one_epoch_sees_every_clip_once_and_reshuffles(clip_folder):
  _, idx, skipped = collect(pipeline.make_dataset(clip_folder, options(), 0, 1))
  assert sorted(idx) == list(range(12)) and skipped.sum() == 0
  _, two, _ = collect(pipeline.make_dataset(clip_folder, options(num_epochs=2), 0, 1))
  assert sorted(two[:12]) == sorted(two[12:]) == list(range(12))
  assert list(two[:12]) != list(two[12:])  # every epoch is shuffled afresh


@pytest.mark.parametrize('num_workers', [0, 2])
def test_bad_inputs_are_counted_never_lost(tmp_path, num_workers):
  cases = audio_factory.make_bad_inputs(str(tmp_path / 'bad'))
  good = write_clips(str(tmp_path / 'good'), 3)
  entries = [manifest.Entry(path=p, clip_id=name) for name, p in sorted(cases.items())]
  entries += [manifest.Entry(path=p, clip_id=os.path.basename(p)) for p in good]
  ds = pipeline.make_dataset(sources.EntrySource(entries), options(num_workers=num_workers), 0, 1)
  batches, idx, skipped = collect(ds)
  counts = pipeline.skip_summary(skipped)
  expected = {reason: 0 for reason in clips.SKIP_REASONS}
  for name in cases:
    reason = audio_factory.EXPECTED_SKIP.get(name)
    if reason:
      expected[reason] += 1
  assert counts == expected
  # counts in = examples out + skipped
  assert len(idx) + sum(counts.values()) == len(entries)
  usable = {i for i, e in enumerate(entries) if audio_factory.EXPECTED_SKIP.get(e.clip_id) is None}
  assert set(idx.tolist()) == usable
  for b in batches:
    assert np.all(np.isfinite(b['waveform']))


def test_strict_mode_raises_with_the_file_name(tmp_path):
  cases = audio_factory.make_bad_inputs(str(tmp_path / 'bad'))
  name = next(n for n in sorted(cases) if audio_factory.EXPECTED_SKIP.get(n))
  entries = [manifest.Entry(path=cases[name], clip_id=name)]
  ds = pipeline.make_dataset(sources.EntrySource(entries), options(strict=True), 0, 1)
  with pytest.raises(clips.ClipSkipped) as err:
    list(ds)
  assert os.path.basename(cases[name]) in str(err.value)


def test_hosts_see_disjoint_examples_whose_union_is_the_epoch(clip_folder):
  seen = []
  for host in range(2):
    _, idx, _ = collect(pipeline.make_dataset(clip_folder, options(batch_size=1), host, 2))
    seen.append(set(idx.tolist()))
    assert len(idx) == 6
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(12))
  with pytest.raises(ValueError, match='divisible by the number of JAX processes'):
    pipeline.per_host_batch_size(5, 2)


def test_global_batches_do_not_depend_on_the_number_of_hosts(clip_folder):
  """Two hosts' batches, stacked in process order, are one host's batches: same clips, same crops."""
  opts = dict(crop='random', clip_samples=4000)
  one, one_idx, _ = collect(pipeline.make_dataset(clip_folder, options(batch_size=4, **opts), 0, 1))
  hosts = [
    collect(pipeline.make_dataset(clip_folder, options(batch_size=2, **opts), p, 2))[0]
    for p in range(2)
  ]
  assert len(one) == len(hosts[0]) == len(hosts[1]) == 3
  for k, batch in enumerate(one):
    for key in ('index', 'waveform', 'num_samples'):
      stacked = np.concatenate([hosts[0][k][key], hosts[1][k][key]])
      np.testing.assert_array_equal(stacked, batch[key])
  assert sorted(one_idx) == list(range(12))


def test_crops_pads_and_host_log_mel(tmp_path):
  folder = str(tmp_path / 'c')
  short, long = write_clips(folder, 2, seconds=0.4)[0], write_clips(folder + '2', 1, seconds=3.0)[0]
  entries = [manifest.Entry(path=short, clip_id='s'), manifest.Entry(path=long, clip_id='l')]
  src = sources.EntrySource(entries)
  opts = options(shuffle=False, batch_size=1, crop='start')
  n = opts.num_samples
  assert n == 400 + 63 * 160  # exactly target_length frames
  by_index = {int(b['index'][0]): b for b in pipeline.make_dataset(src, opts, 0, 1)}
  wave_s, _ = clips.load_clip(short, SR)
  assert by_index[0]['num_samples'][0] == len(wave_s)
  np.testing.assert_array_equal(by_index[0]['waveform'][0, : len(wave_s)], wave_s)
  np.testing.assert_array_equal(by_index[0]['waveform'][0, len(wave_s) :], 0.0)
  wave_l, _ = clips.load_clip(long, SR)
  np.testing.assert_allclose(by_index[1]['waveform'][0], wave_l[:n], atol=1e-6)
  # Random crops differ across epochs and are reproducible from the seed.
  ropts = options(shuffle=False, batch_size=1, num_epochs=3)
  a = [b['waveform'][0] for b in pipeline.make_dataset(src, ropts, 0, 1) if b['index'][0] == 1]
  b = [b['waveform'][0] for b in pipeline.make_dataset(src, ropts, 0, 1) if b['index'][0] == 1]
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert not np.array_equal(a[0], a[1])
  # Host log-mel equals the front end applied to the true (unpadded) samples.
  mopts = options(shuffle=False, batch_size=1, crop='start', features='log_mel')
  mel = {int(b['index'][0]): b for b in pipeline.make_dataset(src, mopts, 0, 1)}
  np.testing.assert_allclose(mel[0]['log_mel'][0], fbank_host.features(wave_s, PRESET), atol=1e-6)
  assert mel[0]['log_mel'].shape == (1, 64, 128)


def test_resampled_sine_keeps_its_frequency(tmp_path):
  path = str(tmp_path / 'sine44k.wav')
  t = np.arange(44100) / 44100
  sf.write(path, 0.5 * np.sin(2 * np.pi * 1000.0 * t), 44100, subtype='FLOAT')
  ds = pipeline.make_dataset(
    sources.EntrySource([manifest.Entry(path=path, clip_id='s')]),
    options(batch_size=1, crop='start', clip_samples=SR),
    0,
    1,
  )
  wave = next(iter(ds))['waveform'][0]
  spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
  assert abs(np.argmax(spectrum) * SR / len(wave) - 1000.0) <= SR / len(wave)


RESUME_SCRIPT = r"""
import json, sys
import numpy as np
from absl import flags
from aasp_jax.audio import presets
from aasp_jax.data import pipeline


def main():
  flags.FLAGS.mark_as_parsed()
  folder, state_path, out_path, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
  opts = pipeline.PipelineOptions(preset=presets.get_preset('eat_audiomae', target_length=64),
                                  batch_size=2, seed=3, num_workers=workers)
  it = iter(pipeline.make_dataset(folder, opts, 0, 1))
  with open(state_path) as f:
    it.set_state(json.load(f))
  batches = [next(it) for _ in range(20)]
  if hasattr(it, 'close'):
    it.close()
  np.savez(out_path, index=np.stack([b['index'] for b in batches]),
           wave=np.stack([b['waveform'] for b in batches]))


if __name__ == '__main__':  # grain's worker processes re-import this file
  main()
"""


@pytest.mark.slow
@pytest.mark.parametrize('num_workers', [0, 2])
def test_resume_in_a_fresh_process_gives_the_same_batches(clip_folder, tmp_path, num_workers):
  opts = pipeline.PipelineOptions(preset=PRESET, batch_size=2, seed=3, num_workers=num_workers)
  it = iter(pipeline.make_dataset(clip_folder, opts, 0, 1))
  for _ in range(7):  # mid-epoch: 12 clips are 6 batches, so this is inside the second epoch
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(20)]
  if hasattr(it, 'close'):
    it.close()
  state_path = tmp_path / 'state.json'
  state_path.write_text(json.dumps(state))
  script = tmp_path / 'resume.py'
  script.write_text(RESUME_SCRIPT)
  out = tmp_path / 'out.npz'
  subprocess.run(
    [sys.executable, str(script), clip_folder, str(state_path), str(out), str(num_workers)],
    check=True,
    cwd=REPO_ROOT,
    timeout=240,
  )
  got = np.load(out)
  np.testing.assert_array_equal(got['index'], np.stack([b['index'] for b in expected]))
  np.testing.assert_array_equal(got['wave'], np.stack([b['waveform'] for b in expected]))


@pytest.mark.parametrize('codec', ['pcm16', 'flac'])
def test_packed_shards_feed_the_pipeline_bit_exactly(tmp_path, codec):
  from aasp_jax.data import pack, records

  folder = str(tmp_path / 'src')
  paths = write_clips(folder, 5, seconds=0.8)
  out = str(tmp_path / 'pack')
  pack.pack(pack.PackConfig(source=folder, out_dir=out, num_shards=2, codec=codec), progress=False)
  ds = pipeline.make_dataset(out, options(shuffle=False, batch_size=1, crop='start'), 0, 1)
  batches, idx, skipped = collect(ds)
  assert sorted(idx) == list(range(5)) and skipped.sum() == 0
  waves = {os.path.basename(p): clips.load_clip(p, SR)[0] for p in paths}
  src = sources.open_source(out)
  for b in batches:
    rec = records.decode_record(src[int(b['index'][0])]['record'])
    want = records.from_int16(records.to_int16(waves[os.path.basename(rec['source'])]))
    n = int(b['num_samples'][0])
    np.testing.assert_array_equal(b['waveform'][0, :n], want[:n])


def test_an_unfinished_pack_is_refused(tmp_path):
  from aasp_jax.data import pack

  folder = str(tmp_path / 'src')
  write_clips(folder, 2)
  out = str(tmp_path / 'pack')
  pack.pack(pack.PackConfig(source=folder, out_dir=out, num_shards=1), progress=False)
  os.remove(os.path.join(out, pack.REPORT_FILE))
  with pytest.raises(sources.DataError, match='not a finished pack'):
    pipeline.make_dataset(out, options(), 0, 1)
