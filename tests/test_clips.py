"""Tests of clip decoding and validation: every bad input gets its skip reason, good ones load."""

import copy
import io
import os

import numpy as np
import pytest
import soundfile as sf

import audio_factory
from aasp_jax.audio import decode
from aasp_jax.data import clips

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'audio')


@pytest.fixture(scope='module')
def bad_inputs(tmp_path_factory):
  # 30 s is enough for 'very_long' here: load_clip itself does not split.
  return audio_factory.make_bad_inputs(tmp_path_factory.mktemp('bad'), long_seconds=30.0)


@pytest.mark.parametrize('case', sorted(audio_factory.EXPECTED_SKIP))
def test_bad_input_is_skipped_with_its_reason(bad_inputs, case):
  with pytest.raises(clips.ClipSkipped) as info:
    clips.load_clip(bad_inputs[case])
  err = info.value
  assert err.reason == audio_factory.EXPECTED_SKIP[case]
  assert err.path == bad_inputs[case]
  message = str(err)
  # The message names the file, the reason and what to do.
  assert bad_inputs[case] in message and f'({err.reason})' in message and 'drop' in message


@pytest.mark.parametrize('case', sorted(audio_factory.EXPECTED_HANDLED))
def test_odd_but_good_input_loads(bad_inputs, case):
  wave, info = clips.load_clip(bad_inputs[case])
  assert wave.dtype == np.float32 and wave.ndim == 1 and np.isfinite(wave).all()
  assert info.num_samples == wave.shape[0]
  file_info = sf.info(bad_inputs[case])
  assert info.orig_sample_rate == file_info.samplerate and info.channels == file_info.channels
  assert abs(wave.shape[0] - file_info.frames * 16000 / file_info.samplerate) <= 1
  expected = tuple(t for t in audio_factory.EXPECTED_HANDLED[case] if t != 'split_long')
  assert info.handled() == expected


@pytest.mark.parametrize('name', ['loop_amen', 'hat_raw', 'guit_harmonics'])
def test_matches_the_front_end_decoder(name):
  path = os.path.join(FIXTURES, f'{name}.flac')
  wave, _ = clips.load_clip(path, 16000, min_samples=0)
  np.testing.assert_array_equal(wave, decode.load_audio(path, 16000))


@pytest.mark.parametrize('rate', [8000, 44100, 48000])
def test_resampled_sine_keeps_its_frequency(tmp_path, rate):
  path = audio_factory.write_wav(tmp_path / 'sine.wav', audio_factory.sine(1000.0, 1.0, rate), rate)
  wave, info = clips.load_clip(path, 16000)
  assert info.resampled and info.num_samples == 16000
  spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.shape[0])))
  freqs = np.fft.rfftfreq(wave.shape[0], 1 / 16000)
  assert abs(freqs[np.argmax(spectrum)] - 1000.0) <= freqs[1]


def test_window_reads_only_the_requested_frames(tmp_path):
  data = audio_factory.noise(5.0, 16000, channels=2, seed=3)
  path = audio_factory.write_flac(tmp_path / 'long.flac', data, 16000)
  whole, _ = clips.load_clip(path)
  part, info = clips.load_clip(path, start=1.25, end=3.5)
  assert info.num_samples == 36000 and info.downmixed and not info.resampled
  np.testing.assert_array_equal(part, whole[20000:56000])
  tail, _ = clips.load_clip(path, start=4.0, end=99.0)  # end past the file: up to its end
  np.testing.assert_array_equal(tail, whole[64000:])


def test_window_outside_the_file_is_empty(tmp_path):
  path = audio_factory.write_wav(tmp_path / 'a.wav', audio_factory.noise(1.0, 16000), 16000)
  with pytest.raises(clips.ClipSkipped, match='holds no frames') as info:
    clips.load_clip(path, start=2.0, end=3.0)
  assert info.value.reason == 'empty'


@pytest.mark.parametrize('start, end', [(-1.0, None), (2.0, 2.0), (None, 0.0)])
def test_bad_window_is_a_caller_error(tmp_path, start, end):
  path = audio_factory.write_wav(tmp_path / 'a.wav', audio_factory.noise(1.0, 16000), 16000)
  with pytest.raises(ValueError, match='start|end'):
    clips.load_clip(path, start=start, end=end)


def test_directory_is_unreadable(tmp_path):
  with pytest.raises(clips.ClipSkipped, match='directory') as info:
    clips.load_clip(tmp_path)
  assert info.value.reason == 'unreadable'


def test_decode_audio_bytes(tmp_path, bad_inputs):
  with open(bad_inputs['stereo'], 'rb') as f:
    wave, info = clips.decode_audio_bytes(f.read(), name='stereo')
  np.testing.assert_array_equal(wave, clips.load_clip(bad_inputs['stereo'])[0])
  assert info.downmixed
  buf = io.BytesIO()
  sf.write(buf, audio_factory.noise(1.0, 44100), 44100, format='WAV', subtype='PCM_16')
  wave, info = clips.decode_audio_bytes(buf.getvalue())
  assert info.resampled and wave.shape == (16000,)
  for case in ('empty_file', 'garbage_flac', 'truncated_flac', 'nan_samples', 'too_short'):
    with open(bad_inputs[case], 'rb') as f:
      data = f.read()
    with pytest.raises(clips.ClipSkipped) as err:
      clips.decode_audio_bytes(data, name=case)
    assert err.value.reason == audio_factory.EXPECTED_SKIP[case] and err.value.path == case


def test_validate_waveform_checks_in_reason_order():
  ok = audio_factory.noise(1.0, 16000)
  clips.validate_waveform(ok, 'x', min_samples=2960, silence_rms=1e-5)
  cases = {
    'non_finite': np.array([0.1, np.nan, 0.0], np.float32),  # also short: non_finite comes first
    'silent': np.zeros(10, np.float32),  # also short: silent comes first
    'too_short': ok[:2959],
  }
  for reason, wave in cases.items():
    with pytest.raises(clips.ClipSkipped) as info:
      clips.validate_waveform(wave, 'x', min_samples=2960, silence_rms=1e-5)
    assert info.value.reason == reason
  # Each check can be switched off.
  clips.validate_waveform(np.zeros(10, np.float32), 'x', min_samples=0, silence_rms=0.0)


def test_clip_skipped_survives_process_boundaries():
  err = clips.ClipSkipped('silent', '/a/b.wav', 'RMS 0')
  # copy goes through __reduce__, as multiprocessing does when a worker sends the exception back.
  dup = copy.copy(err)
  assert (dup.reason, dup.path, dup.detail, str(dup)) == (
    err.reason,
    err.path,
    err.detail,
    str(err),
  )
  with pytest.raises(ValueError, match='unknown skip reason'):
    clips.ClipSkipped('loud', 'x', '')


def test_skip_counter():
  counter = clips.SkipCounter()
  counter.add('silent')
  counter.add('missing', 2)
  other = clips.SkipCounter()
  other.add('silent')
  counter.update(other)
  counter.update({'too_short': 3})
  assert counter.as_dict() == {
    'missing': 2, 'empty': 0, 'unreadable': 0, 'non_finite': 0, 'silent': 2, 'too_short': 3
  }  # fmt: skip
  assert counter.total == 7 and counter['silent'] == 2
  with pytest.raises(ValueError, match='unknown reason'):
    counter.add('loud')
  handled = clips.SkipCounter(clips.HANDLED)
  handled.add('resampled')
  assert handled.as_dict() == {'resampled': 1, 'downmixed': 0, 'split_long': 0, 'clipped': 0}


def test_probe_reads_the_header(bad_inputs):
  assert clips.probe_clip(bad_inputs['six_channel']) == (8000, 16000, 6)
  with pytest.raises(clips.ClipSkipped) as info:
    clips.probe_clip(bad_inputs['zero_frames'])
  assert info.value.reason == 'empty'
