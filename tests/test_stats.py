"""Tests of `aasp-data stats` against numpy on the concatenated raw log-mels."""

import json

import numpy as np
import pytest

import audio_factory
from aasp_jax.audio import fbank_host
from aasp_jax.audio import presets as presets_lib
from aasp_jax.data import cli
from aasp_jax.data import clips
from aasp_jax.data import manifest
from aasp_jax.data import pack
from aasp_jax.data import records
from aasp_jax.data import stats

EAT = presets_lib.get_preset('eat_audiomae')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  d = tmp_path_factory.mktemp('clips')
  for k, (seconds, rate, amplitude) in enumerate(
    [(0.6, 16000, 0.1), (1.3, 16000, 0.5), (0.4, 8000, 0.02), (2.1, 16000, 0.2), (0.9, 22050, 0.3)]
  ):
    audio_factory.write_wav(
      d / f'c{k}.wav', audio_factory.noise(seconds, rate, 1, amplitude, k), rate
    )
  # A clip that must be skipped and not counted.
  audio_factory.write_wav(d / 'z_silent.wav', np.zeros(16000, np.float32), 16000)
  return str(d)


def _reference(waves):
  x = np.concatenate([fbank_host.log_mel(w, EAT) for w in waves]).astype(np.float64)
  return x.mean(), x.std(), x.shape[0]


def test_folder_stats_match_numpy(folder):
  result = stats.compute_stats(folder, num_clips=100)
  entries = manifest.scan_folder(folder)
  waves = [clips.load_clip(e.path, 16000)[0] for e in entries if 'silent' not in e.path]
  mean, std, frames = _reference(waves)
  assert result['num_clips'] == 5 and result['num_frames'] == frames
  assert result['skipped']['silent'] == 1 and sum(result['skipped'].values()) == 1
  np.testing.assert_allclose([result['norm_mean'], result['norm_std']], [mean, std], rtol=1e-12)
  # Usable as a preset override.
  preset = presets_lib.get_preset(
    result['preset'], norm_mean=result['norm_mean'], norm_std=result['norm_std']
  )
  assert preset.norm_std == result['norm_std']


def test_subset_is_the_seeded_choice(folder):
  entries = manifest.scan_folder(folder)
  order = stats.selection_order(len(entries), seed=3)
  chosen = [entries[i] for i in order if 'silent' not in entries[i].path][:2]
  result = stats.compute_stats(folder, num_clips=2, seed=3)
  mean, std, frames = _reference([clips.load_clip(e.path)[0] for e in chosen])
  assert result['num_clips'] == 2 and result['num_frames'] == frames
  np.testing.assert_allclose([result['norm_mean'], result['norm_std']], [mean, std], rtol=1e-12)


def test_pack_stats_match_numpy(folder, tmp_path):
  out = str(tmp_path / 'pack')
  pack.pack(pack.PackConfig(folder, out, num_shards=2, codec='pcm16'), progress=False)
  result = stats.compute_stats(out, num_clips=100)
  entries = [e for e in manifest.scan_folder(folder) if 'silent' not in e.path]
  waves = [records.from_int16(records.to_int16(clips.load_clip(e.path)[0])) for e in entries]
  mean, std, frames = _reference(waves)
  assert result['num_clips'] == 5 and result['num_frames'] == frames
  np.testing.assert_allclose([result['norm_mean'], result['norm_std']], [mean, std], rtol=1e-12)
  # A pack at another rate than the preset's is refused, not measured wrongly.
  out_8k = str(tmp_path / 'pack_8k')
  pack.pack(pack.PackConfig(folder, out_8k, num_shards=1, sample_rate=8000), progress=False)
  with pytest.raises(ValueError, match='re-pack with --sample_rate 16000'):
    stats.compute_stats(out_8k, num_clips=1)


def test_moments_are_stable_far_from_zero():
  rng = np.random.default_rng(0)
  chunks = [1e6 + rng.standard_normal(1000) * 1e-3 for _ in range(50)]
  m = stats.Moments()
  for c in chunks:
    m.add(c)
  x = np.concatenate(chunks)
  np.testing.assert_allclose([m.mean, m.std], [x.mean(), x.std()], rtol=1e-9)
  assert m.count == x.size


def test_cli_stats_writes_json_and_prints_overrides(folder, tmp_path, capsys):
  out = tmp_path / 'stats.json'
  assert cli.main(['stats', folder, '--num_clips', '3', '--out', str(out), '--no_progress']) == 0
  with open(out) as f:
    result = json.load(f)
  assert result['num_clips'] == 3 and result['preset'] == 'eat_audiomae'
  printed = capsys.readouterr().out
  assert (
    f'--config.frontend.norm_mean={result["norm_mean"]!r} '
    f'--config.frontend.norm_std={result["norm_std"]!r}'
  ) in printed
  assert cli.main(['stats', str(tmp_path / 'nope'), '--no_progress']) == 1
