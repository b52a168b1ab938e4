"""Tests of audio decoding: channel averaging, explicit resampling, errors that name the file."""

import logging
import os

import numpy as np
import pytest
import soundfile as sf

from aasp_jax.audio import decode
from aasp_jax.audio import presets as presets_lib

AUDIO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'audio')
EAT = presets_lib.get_preset('eat_audiomae')


def _fixture(name):
  return os.path.join(AUDIO_DIR, f'{name}.flac')


@pytest.mark.parametrize('name', ['loop_amen', 'guit_harmonics', 'perc_swash', 'hat_raw'])
def test_native_rate_is_the_channel_average(name):
  data, rate = sf.read(_fixture(name), dtype='float64', always_2d=True)
  waveform = decode.load_audio(_fixture(name), rate)
  assert waveform.dtype == np.float32 and waveform.ndim == 1
  assert waveform.shape[0] == data.shape[0]
  # No resampling at the file's own rate: the samples are the file's, channels averaged.
  np.testing.assert_allclose(waveform, data.mean(axis=1), rtol=0, atol=1e-7)
  assert np.abs(waveform).max() <= 1.0


def test_stereo_channels_are_averaged(tmp_path):
  t = np.arange(8000) / 8000
  left = 0.5 * np.sin(2 * np.pi * 440 * t)
  right = 0.25 * np.cos(2 * np.pi * 100 * t)
  path = tmp_path / 'stereo.wav'
  sf.write(path, np.stack([left, right], axis=1), 8000, subtype='FLOAT')
  np.testing.assert_allclose(decode.load_audio(path, 8000), (left + right) / 2, rtol=0, atol=1e-7)


@pytest.mark.parametrize('name, rate, channels', [('loop_amen', 44100, 2), ('hat_raw', 96000, 1)])
def test_resamples_to_preset_rate_and_logs_it(name, rate, channels, caplog):
  info = sf.info(_fixture(name))
  assert (info.samplerate, info.channels) == (rate, channels)
  caplog.set_level(logging.DEBUG, logger=decode.__name__)
  waveform = decode.load_audio(_fixture(name), EAT)
  assert waveform.dtype == np.float32 and waveform.ndim == 1
  # Duration is preserved to within a sample or two.
  assert abs(waveform.shape[0] - info.frames * 16000 / rate) <= 2
  messages = [r.getMessage() for r in caplog.records]
  assert any(f'{rate} Hz to 16000 Hz' in m and name in m for m in messages), messages


def test_preset_or_rate_give_the_same_waveform():
  np.testing.assert_array_equal(
    decode.load_audio(_fixture('perc_swash'), EAT), decode.load_audio(_fixture('perc_swash'), 16000)
  )


def test_resampled_sine_keeps_its_frequency_and_level(tmp_path):
  freq, seconds = 1234.5, 2.0
  t = np.arange(int(44100 * seconds)) / 44100
  path = tmp_path / 'sine_44k.wav'
  sf.write(path, 0.5 * np.sin(2 * np.pi * freq * t), 44100, subtype='FLOAT')
  waveform = decode.load_audio(path, 16000)
  assert abs(waveform.shape[0] - 16000 * seconds) <= 1
  spectrum = np.abs(np.fft.rfft(waveform * np.hanning(waveform.shape[0])))
  bin_width = 16000 / waveform.shape[0]
  assert abs(spectrum.argmax() * bin_width - freq) <= bin_width
  # soxr's passband is flat: the level survives (RMS of a 0.5 sine is 0.5 / sqrt 2).
  core = waveform[1000:-1000]
  assert abs(np.sqrt(np.mean(core.astype(np.float64) ** 2)) - 0.5 / np.sqrt(2)) < 1e-3


def test_missing_file_names_the_path(tmp_path):
  path = tmp_path / 'nope.flac'
  with pytest.raises(FileNotFoundError, match='nope.flac'):
    decode.load_audio(path, EAT)


def test_unreadable_file_names_the_path(tmp_path):
  path = tmp_path / 'garbage.flac'
  path.write_bytes(b'not audio at all' * 64)
  with pytest.raises(ValueError, match='garbage.flac'):
    decode.load_audio(path, EAT)


def test_bad_target_rate():
  with pytest.raises(ValueError, match='sample rate'):
    decode.load_audio(_fixture('hat_raw'), 0)
