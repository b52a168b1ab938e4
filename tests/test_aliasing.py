"""The aliasing-stability study: shift cosines, AaPE estimates, the modulation probe and the CLI.

Independent references: embeddings recomputed per clip from the host (numpy float64) log-mel with
a direct `encoder.apply` and a numpy cosine; the AaPE alpha/omega sown by that same direct apply;
the synthesized clips' modulation rate measured from the envelope spectrum with numpy's FFT; the
analytic Hz of the alias band's edges.
"""

import argparse
import json
import math
import os

import audio_factory
import matplotlib.image
import numpy as np
import pytest
from conftest import REPO_ROOT

from aasp_jax.audio import decode, fbank_host
from aasp_jax.data import manifest
from aasp_jax.evaluate import aliasing, aliasing_cli, embeddings, pretrained
from aasp_jax.models import sblu

AUDIO = os.path.join(REPO_ROOT, 'data', 'sonicpi', 'audio')
# Sample counts at 16 kHz; the tiny model's segment for shifts up to 15 is 400 + 78 * 160 = 12,880.
CLIPS = (
  'ambi_choir.flac',  # 25,145: measured
  'bd_808.flac',  # 8,957: shorter than the segment, skipped as too_short
  'loop_amen.flac',  # 28,053: measured
  'corrupt.flac',  # not audio: skipped as unreadable
  'ambi_drone.flac',  # long: measured
)
SHIFTS = (0, 1, 7, 15)


@pytest.fixture(scope='module')
def aape(tiny_checkpoints):
  return pretrained.load_pretrained(tiny_checkpoints['aape'])


@pytest.fixture(scope='module')
def entries(tmp_path_factory):
  folder = tmp_path_factory.mktemp('aliasing_clips')
  with open(folder / 'corrupt.flac', 'wb') as f:
    f.write(b'fLaC' + bytes(range(256)) * 8)  # a FLAC signature, then garbage
  rows = [str(folder / n if n == 'corrupt.flac' else os.path.join(AUDIO, n)) for n in CLIPS]
  with open(folder / 'clips.csv', 'w') as f:
    f.write('path\n' + '\n'.join(rows) + '\n')
  return manifest.read_manifest(folder / 'clips.csv')


@pytest.fixture(scope='module')
def stability(aape, entries):
  # Batch 2 with 3 usable clips: the last batch is padded, and the padding must not leak.
  return aliasing.shift_stability(aape, entries, SHIFTS, batch_size=2)


def direct(model, path, shifts):
  """Per clip, no pipeline, no batching: host log-mel -> windows -> encoder.apply -> numpy."""
  preset = model.preset
  wave = decode.load_audio(path, preset.sample_rate)
  segment = fbank_host.normalize(fbank_host.log_mel(wave, preset), preset)
  length = preset.target_length
  out = {}
  for s in shifts:
    x = np.asarray(segment[None, s : s + length], np.float32)
    enc, state = model.encoder.apply({'params': model.params}, x, mutable=['intermediates'])
    emb = np.asarray(embeddings.pooled_embedding(enc))[0].astype(np.float64)
    sown = state['intermediates'].get('stem', {})
    out[s] = (emb, sown.get('alpha', (None,))[0], sown.get('omega', (None,))[0])
  return out


def test_shift_cosines_equal_a_numpy_computation_from_direct_embeddings(aape, stability):
  assert stability.shifts == SHIFTS
  names = tuple(os.path.basename(c) for c in stability.clip_ids)
  assert names == ('ambi_choir.flac', 'loop_amen.flac', 'ambi_drone.flac')
  assert stability.cosine.shape == (3, len(SHIFTS))
  for row, name in enumerate(names):
    ref = direct(aape, os.path.join(AUDIO, name), SHIFTS)
    base = ref[0][0]
    for col, s in enumerate(SHIFTS):
      emb = ref[s][0]
      expected = emb @ base / (np.linalg.norm(emb) * np.linalg.norm(base))
      np.testing.assert_allclose(stability.cosine[row, col], expected, atol=2e-5)
  # The shifted windows really differ from the unshifted one (otherwise every check is vacuous).
  assert np.all(stability.cosine[:, 1:] < 1 - 1e-4)
  np.testing.assert_allclose(stability.mean, stability.cosine.mean(0))


def test_shift_zero_gives_cosine_one(stability):
  np.testing.assert_allclose(stability.cosine[:, 0], 1.0, atol=1e-6)


def test_too_short_and_unreadable_clips_are_counted(stability):
  assert stability.examined == len(CLIPS)
  assert stability.skipped['too_short'] == 1
  assert stability.skipped['unreadable'] == 1
  assert sum(stability.skipped.values()) == 2
  assert stability.segment_seconds == pytest.approx(12880 / 16000)


def test_max_clips_reads_only_as_many_entries_as_it_needs(aape, entries):
  # Two clips wanted: entry 0 is measured, entry 1 is too short, entry 2 is measured.
  result = aliasing.shift_stability(aape, entries, (3,), max_clips=2, batch_size=2)
  assert [os.path.basename(c) for c in result.clip_ids] == ['ambi_choir.flac', 'loop_amen.flac']
  assert result.examined == 3
  assert result.skipped['too_short'] == 1 and sum(result.skipped.values()) == 1


def test_alpha_omega_equal_those_sown_by_a_direct_apply(aape, stability):
  assert stability.alpha.shape == (3, 128 // 16, aape.config.model.aape.num_modes)
  for row, clip_id in enumerate(stability.clip_ids):
    _, alpha, omega = direct(aape, os.path.join(AUDIO, os.path.basename(clip_id)), (0,))[0]
    np.testing.assert_allclose(stability.alpha[row], np.asarray(alpha)[0], rtol=1e-5)
    np.testing.assert_allclose(stability.omega[row], np.asarray(omega)[0], rtol=1e-5)
  # The example window is the first clip's unshifted window.
  wave = decode.load_audio(os.path.join(AUDIO, 'ambi_choir.flac'), 16000)
  host = fbank_host.normalize(fbank_host.log_mel(wave, aape.preset), aape.preset)[:64]
  np.testing.assert_allclose(stability.example_window, host, atol=1e-4)


def test_omega_in_hz_at_the_alias_band_edges(aape):
  preset = aape.preset
  assert aliasing.token_nyquist_hz(preset, 16) == pytest.approx(3.125)
  _, low, high = sblu.lambda_bounds(31, 16, delta=2.0)
  np.testing.assert_allclose(aliasing.omega_to_hz([low, high], 2.0, preset), [3.125, 50.0])
  assert aliasing.aape_delta(aape) == 1.0


def envelope_peak_hz(wave, sample_rate):
  """The strongest non-DC frequency of the Hilbert envelope, by numpy FFT (analytic signal)."""
  n = len(wave)
  spectrum = np.fft.fft(wave)
  gain = np.zeros(n)
  gain[0], gain[1 : (n + 1) // 2] = 1.0, 2.0
  if n % 2 == 0:
    gain[n // 2] = 1.0
  envelope = np.abs(np.fft.ifft(spectrum * gain))
  env_spectrum = np.abs(np.fft.rfft(envelope - envelope.mean()))
  return np.fft.rfftfreq(n, 1.0 / sample_rate)[np.argmax(env_spectrum)]


def test_synthesized_clips_have_the_stated_modulation_rate():
  sr, seconds = 16000, 4.0
  waves, labels = aliasing.modulation_set(aliasing.DEFAULT_RATES_HZ, 3, int(sr * seconds), sr, 7)
  assert waves.dtype == np.float32
  np.testing.assert_array_equal(labels, np.repeat(np.arange(6), 3))
  for wave, label in zip(waves, labels):
    # 0.25 Hz bins: the peak must sit on the stated rate's bin.
    assert envelope_peak_hz(wave, sr) == pytest.approx(aliasing.DEFAULT_RATES_HZ[label], abs=0.26)
  # Nothing else is constant within a class: carriers and levels vary clip to clip.
  carriers = np.fft.rfftfreq(waves.shape[1], 1 / sr)[np.argmax(np.abs(np.fft.rfft(waves)), axis=1)]
  levels = np.abs(waves).max(axis=1)
  assert len(np.unique(np.round(carriers))) == len(waves)
  assert levels.max() / levels.min() > 2
  again, _ = aliasing.modulation_set(aliasing.DEFAULT_RATES_HZ, 3, int(sr * seconds), sr, 7)
  np.testing.assert_array_equal(waves, again)


def test_parse_shifts():
  assert aliasing_cli.parse_shifts('1-15') == tuple(range(1, 16))
  assert aliasing_cli.parse_shifts('1-3,8,2') == (1, 2, 3, 8)
  with pytest.raises(argparse.ArgumentTypeError, match='runs backwards'):
    aliasing_cli.parse_shifts('5-2')
  with pytest.raises(argparse.ArgumentTypeError, match='ranges'):
    aliasing_cli.parse_shifts('a')


def test_missing_folder_and_no_usable_clips_fail_clearly(aape, tmp_path, capsys):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='nowhere'):
    aliasing.read_entries(missing)
  short = tmp_path / 'short'
  short.mkdir()
  audio_factory.write_wav(short / 'a.wav', audio_factory.sine(440, 0.3, 16000), 16000)
  with pytest.raises(ValueError, match=r'too_short: 1.*at least 0\.805 s'):
    aliasing.shift_stability(aape, aliasing.read_entries(str(short)), (1, 15))
  ckpt = aape.source
  for audio in (missing, str(short)):
    code = aliasing_cli.main(['--checkpoint', ckpt, '--audio', audio, '--out', str(tmp_path / 'o')])
    assert code == 1
  err = capsys.readouterr().err
  assert 'nowhere: no such folder or manifest' in err and 'too_short: 1' in err


@pytest.mark.slow
def test_cli_compares_two_checkpoints(tiny_checkpoints, tmp_path, capsys):
  out = tmp_path / 'report'
  argv = ['--audio', AUDIO, '--out', str(out), '--max_clips', '2', '--shifts', '1-2,15']
  argv += ['--checkpoint', tiny_checkpoints['aape'], '--checkpoint', tiny_checkpoints['conv']]
  argv += ['--probe_train', '4', '--probe_test', '2', '--probe_folds', '2', '--batch_size', '4']
  assert aliasing_cli.main(argv) == 0
  printed = capsys.readouterr().out
  report = json.loads((out / 'aliasing.json').read_text())
  table = (out / 'aliasing.md').read_text()
  assert printed.strip() in table
  aape, conv = report['checkpoints']
  assert (aape['label'], aape['stem'], conv['label'], conv['stem']) == (
    'tiny_aape',
    'aape',
    'tiny_conv',
    'conv',
  )
  for r in (aape, conv):
    sh = r['shift']
    assert sh['shifts'] == [1, 2, 15] and sh['clips'] == 2
    assert sh['clip_ids'] == ['ambi_choir.flac', 'ambi_dark_woosh.flac']
    # The table shows exactly the JSON's numbers.
    for s, mean, std in zip(sh['shifts'], sh['mean'], sh['std']):
      row = next(line for line in table.splitlines() if line.startswith(f'| {s} |'))
      assert f'{mean:.4f} ± {std:.4f}' in row
    probe = r['modulation_probe']
    assert probe['token_nyquist_hz'] == 3.125
    for key in ('accuracy', 'accuracy_below', 'accuracy_above', 'accuracy_above_only'):
      assert 0.0 <= probe[key] <= 1.0
    # 12 test clips, 4 of them below the Nyquist: the overall accuracy is their weighted mean.
    weighted = (4 * probe['accuracy_below'] + 8 * probe['accuracy_above']) / 12
    assert probe['accuracy'] == pytest.approx(weighted)
    mask = matplotlib.image.imread(out / r['plots']['mask'])
    assert mask.ndim == 3 and mask.shape[0] > 100
    assert r['mask']['masked_fraction'] == pytest.approx(
      1 - round(0.2 * 32) / 32
    )  # 4 x 8 grid, ratio 0.8
  assert 'lambda' not in conv['plots'] and 'no AaPE' in conv['lambda']['skipped']
  assert 'no AaPE' in table
  lam = aape['lambda']
  assert np.array(lam['omega_hz_mean']).shape == (8, 2)
  # Every estimate lies in the alias band, above the token Nyquist.
  assert min(np.ravel(lam['omega_hz_mean'])) > 3.125 and max(np.ravel(lam['omega_hz_mean'])) < 50
  for name in ('stability.png', aape['plots']['lambda']):
    image = matplotlib.image.imread(out / name)
    assert image.ndim == 3 and image.shape[1] > 400
  assert not math.isnan(report['seconds'])
