"""Tests of the Kaldi log-mel front end: host vs device vs an independent reference; analytics."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kaldi_reference
from aasp_jax.audio import decode
from aasp_jax.audio import fbank_device
from aasp_jax.audio import fbank_host
from aasp_jax.audio import mel
from aasp_jax.audio import presets as presets_lib

AUDIO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'audio')
FIXTURES = ('loop_amen', 'guit_harmonics', 'perc_swash', 'hat_raw')
SR = 16000
EAT = presets_lib.get_preset('eat_audiomae')
BEATS = presets_lib.get_preset('beats')
# The requirement: host and device agree to 1e-4 max abs on raw log-mel and normalised features.
HOST_DEVICE_ATOL = 1e-4
# Host and device against the float64 Kaldi transcription. Their outputs are float32 and log-mel
# values reach |x| ~ 16-27, where one float32 ulp is 1-2e-6; the device's spectrum is error-free up
# to its final float32 rounding (measured <= 2.3e-5 on the fixtures, worst in near-silent bins of
# the 2**15-scaled BEATs input). 5e-5 catches any definitional error (a wrong window, pre-emphasis
# or mel edge moves values by >= 1e-3) while leaving float32 headroom.
REFERENCE_ATOL = 5e-5
# Where padded frames land: (0 + 4.2677393) / (2 * 4.5689974), to float32 rounding.
PAD_EXACT = 4.2677393 / (2 * 4.5689974)


def _kaldi_window_type(preset):
  return {'hann_symmetric': 'hanning', 'hamming': 'hamming', 'povey': 'povey'}[preset.window]


def _reference_log_mel(waveform, preset):
  """The torchaudio-style call the preset stands for, on the float64 reference."""
  x = np.asarray(waveform, np.float64)
  if preset.subtract_waveform_mean:
    x = x - x.mean()
  return kaldi_reference.fbank(
    x * preset.waveform_scale,
    sample_frequency=preset.sample_rate,
    frame_length=preset.frame_length_ms,
    frame_shift=preset.frame_shift_ms,
    num_mel_bins=preset.num_mel_bins,
    low_freq=preset.low_freq,
    high_freq=preset.high_freq,
    preemphasis_coefficient=preset.preemphasis,
    remove_dc_offset=preset.remove_dc_offset,
    window_type=_kaldi_window_type(preset),
  )


def _synthetic(seconds=10.0, seed=0):
  """Noise + tones + a DC offset, with a stretch of digital silence and a near-silent fade."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * SR)) / SR
  x = 0.05 * rng.standard_normal(t.shape) + 0.01
  for freq, amp in ((220.0, 0.3), (1000.0, 0.2), (3150.0, 0.1), (7000.0, 0.05)):
    x += amp * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
  tenth = len(x) // 10
  x[tenth : 2 * tenth] = 0.0  # exact zeros hit the log floor
  x[3 * tenth : 4 * tenth] *= np.geomspace(1.0, 1e-5, tenth)  # fades through the floor
  return x.astype(np.float32)


@pytest.fixture(scope='module')
def clips():
  """The four real recordings decoded at 16 kHz, plus a 10 s synthetic clip."""
  loaded = {
    name: decode.load_audio(os.path.join(AUDIO_DIR, f'{name}.flac'), EAT) for name in FIXTURES
  }
  loaded['synthetic_10s'] = _synthetic()
  return loaded


# 1. Host vs device.


@pytest.mark.parametrize('preset', [EAT, BEATS], ids=lambda p: p.name)
@pytest.mark.parametrize('clip', FIXTURES + ('synthetic_10s',))
def test_host_matches_device(clips, clip, preset):
  waveform = clips[clip]
  host = fbank_host.log_mel(waveform, preset)
  device = np.asarray(fbank_device.log_mel(waveform[None], preset))[0]
  assert host.dtype == device.dtype == np.float32
  assert host.shape == device.shape == (preset.num_frames(waveform.shape[0]), 128)
  np.testing.assert_allclose(device, host, rtol=0, atol=HOST_DEVICE_ATOL)

  host_features = fbank_host.features(waveform, preset)
  device_features = np.asarray(fbank_device.features(waveform[None], preset))[0]
  np.testing.assert_allclose(device_features, host_features, rtol=0, atol=HOST_DEVICE_ATOL)


def test_host_matches_device_without_dc_removal(clips):
  # remove_dc_offset=False makes the waveform-mean subtraction matter (the synthetic clip has a DC
  # offset), which the device does in the spectral domain.
  preset = presets_lib.get_preset(remove_dc_offset=False)
  waveform = clips['synthetic_10s']
  host = fbank_host.log_mel(waveform, preset)
  device = np.asarray(fbank_device.log_mel(waveform[None], preset))[0]
  np.testing.assert_allclose(device, host, rtol=0, atol=HOST_DEVICE_ATOL)
  np.testing.assert_allclose(
    host, _reference_log_mel(waveform, preset), rtol=0, atol=REFERENCE_ATOL
  )


# 2. Both against the independent Kaldi transcription.


@pytest.mark.parametrize('preset', [EAT, BEATS], ids=lambda p: p.name)
@pytest.mark.parametrize('clip', FIXTURES)
def test_matches_kaldi_reference(clips, clip, preset):
  waveform = clips[clip]
  reference = _reference_log_mel(waveform, preset)
  host = fbank_host.log_mel(waveform, preset)
  device = np.asarray(fbank_device.log_mel(waveform[None], preset))[0]
  assert reference.shape == host.shape
  np.testing.assert_allclose(host, reference, rtol=0, atol=REFERENCE_ATOL)
  np.testing.assert_allclose(device, reference, rtol=0, atol=REFERENCE_ATOL)


@pytest.mark.parametrize(
  'overrides',
  [
    # Hamming is nonzero at the frame edges, so it exposes Kaldi's first-sample pre-emphasis.
    {'window': 'hamming', 'num_mel_bins': 80, 'low_freq': 50.0, 'high_freq': -400.0},
    {'preemphasis': 0.0, 'remove_dc_offset': False, 'subtract_waveform_mean': False},
  ],
)
def test_matches_kaldi_reference_other_options(clips, overrides):
  preset = presets_lib.get_preset(**overrides)
  waveform = clips['loop_amen']
  reference = _reference_log_mel(waveform, preset)
  np.testing.assert_allclose(
    fbank_host.log_mel(waveform, preset), reference, rtol=0, atol=REFERENCE_ATOL
  )
  device = np.asarray(fbank_device.log_mel(waveform[None], preset))[0]
  np.testing.assert_allclose(device, reference, rtol=0, atol=REFERENCE_ATOL)


def test_matches_torchaudio_if_available(clips):
  torch = pytest.importorskip('torch')
  kaldi = pytest.importorskip('torchaudio.compliance.kaldi')
  waveform = clips['loop_amen']
  wave = torch.from_numpy(waveform - waveform.mean())[None]
  expected = kaldi.fbank(
    wave,
    htk_compat=True,
    use_energy=False,
    window_type='hanning',
    num_mel_bins=128,
    dither=0.0,
    frame_shift=10,
    sample_frequency=16000,
  ).numpy()
  # torchaudio computes in float32, so near-floor bins carry its ~1e-3 float32 spectrum error.
  np.testing.assert_allclose(fbank_host.log_mel(waveform, EAT), expected, rtol=0, atol=2e-3)


# 3. Frame counts, padding and cropping.


@pytest.mark.parametrize('num_samples', [400, 401, 559, 560, 16000, 160000, 161234])
def test_frame_count(num_samples):
  waveform = np.random.default_rng(num_samples).uniform(-0.5, 0.5, num_samples).astype(np.float32)
  expected = 1 + (num_samples - 400) // 160
  assert fbank_host.log_mel(waveform, EAT).shape == (expected, 128)
  assert fbank_device.log_mel(waveform[None], EAT).shape == (1, expected, 128)
  if num_samples == 160000:
    assert expected == 998


def test_too_short_raises():
  short = np.zeros(399, np.float32)
  with pytest.raises(ValueError, match=r'399 samples.*at least 400'):
    fbank_host.log_mel(short, EAT)
  with pytest.raises(ValueError, match=r'399 samples.*at least 400'):
    fbank_device.log_mel(short[None], EAT)


def test_features_pad_to_target_length(clips):
  waveform = clips['synthetic_10s']
  host = fbank_host.features(waveform, EAT)
  device = np.asarray(fbank_device.features(waveform[None], EAT))[0]
  assert host.shape == device.shape == (1024, 128)
  # Frames 998.. are padding: all one constant, bit-identical on both paths, and equal to the
  # normalised zero up to float32 rounding (one ulp at 0.467 is 3e-8).
  pad_value = host[998, 0]
  assert abs(pad_value - PAD_EXACT) <= 3e-8 and abs(PAD_EXACT - 0.46703) < 1e-5
  np.testing.assert_array_equal(host[998:], pad_value)
  np.testing.assert_array_equal(device[998:], pad_value)
  # The real frames are the normalised log-mel, (x + 4.2677393) / (2 * 4.5689974).
  log_mel = fbank_host.log_mel(waveform, EAT)
  np.testing.assert_allclose(host[:998], (log_mel + 4.2677393) / 9.1379948, rtol=0, atol=1e-6)
  assert not np.any(host[997] == pad_value)


def test_features_crop_keeps_first_frames():
  waveform = _synthetic(seconds=12.0, seed=3)
  log_mel = fbank_host.log_mel(waveform, EAT)
  assert log_mel.shape[0] == 1198
  host = fbank_host.features(waveform, EAT)
  np.testing.assert_array_equal(host, fbank_host.normalize(log_mel[:1024], EAT))
  device = np.asarray(fbank_device.features(waveform[None], EAT))[0]
  np.testing.assert_allclose(device, host, rtol=0, atol=HOST_DEVICE_ATOL)


def test_std_norm_mode():
  preset = presets_lib.get_preset(norm_mode='std', norm_mean=1.0, norm_std=4.0)
  x = np.array([[5.0, -3.0]], np.float32)
  np.testing.assert_array_equal(fbank_host.normalize(x, preset), [[1.0, -1.0]])
  np.testing.assert_array_equal(fbank_host.normalize(x, EAT), (x + 4.2677393) / (2 * 4.5689974))


# 4. Mel filterbank against the formula.


def _edges(preset):
  lo, hi = mel.kaldi_mel(preset.low_freq), mel.kaldi_mel(preset.high_freq_hz)
  delta = (hi - lo) / (preset.num_mel_bins + 1)
  centres = lo + delta * np.arange(1, preset.num_mel_bins + 1)
  return centres, delta


@pytest.mark.parametrize('overrides', [{}, {'num_mel_bins': 80}, {'high_freq': -1000.0}])
def test_mel_banks_are_kaldi_triangles(overrides):
  preset = presets_lib.get_preset(**overrides)
  banks = mel.mel_banks(preset)
  assert banks.shape == (257, preset.num_mel_bins)
  np.testing.assert_array_equal(banks[256], 0.0)  # Kaldi ignores the Nyquist bin.
  bin_mel = 1127.0 * np.log(1.0 + np.arange(257) * (preset.sample_rate / 512) / 700.0)
  centres, delta = _edges(preset)
  # Triangles linear in mel, peak 1 at the centre, zero beyond one spacing: 1 - |m - c| / delta.
  expected = np.maximum(0.0, 1.0 - np.abs(bin_mel[:256, None] - centres[None, :]) / delta)
  np.testing.assert_allclose(banks[:256], expected, rtol=0, atol=1e-12)
  # Between the first and last centres, neighbouring triangles sum to one.
  inside = (bin_mel[:256] >= centres[0]) & (bin_mel[:256] <= centres[-1])
  np.testing.assert_allclose(banks[:256][inside].sum(axis=1), 1.0, atol=1e-12)
  # Each non-empty filter peaks at the FFT bin closest (in mel) to its centre.
  for m in np.flatnonzero(banks.max(axis=0) > 0):
    support = np.flatnonzero(banks[:, m] > 0)
    closest = support[np.argmin(np.abs(bin_mel[support] - centres[m]))]
    assert banks[:, m].argmax() == closest
  # Nothing above high_freq.
  assert np.all(banks[np.arange(257) * preset.sample_rate / 512 >= preset.high_freq_hz] == 0.0)


def test_mel_banks_empty_filter_matches_torchaudio():
  # With 128 filters and a 512-point FFT, filter 3 (97..141 mel) falls between FFT bins 2 and 3; it
  # stays all zero as in torchaudio, so that channel is always log(float32 eps).
  banks = mel.mel_banks(EAT)
  assert np.flatnonzero(banks.max(axis=0) == 0.0).tolist() == [3]
  floor = np.float32(np.log(EAT.log_floor))
  waveform = _synthetic(1.0)
  np.testing.assert_array_equal(fbank_host.log_mel(waveform, EAT)[:, 3], floor)
  np.testing.assert_array_equal(fbank_device.log_mel(waveform[None], EAT)[0, :, 3], floor)


def test_window_shapes():
  n = np.arange(400)
  hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / 399)
  np.testing.assert_allclose(mel.window(EAT), hann, atol=1e-15)
  assert mel.window(EAT)[0] == 0.0 and abs(mel.window(EAT)[-1]) < 1e-15  # symmetric
  np.testing.assert_allclose(mel.window(BEATS), hann**0.85, atol=1e-15)
  periodic = presets_lib.get_preset(window='hann_periodic')
  np.testing.assert_allclose(
    mel.window(periodic), 0.5 - 0.5 * np.cos(2 * np.pi * n / 400), atol=1e-15
  )
  hamming = presets_lib.get_preset(window='hamming')
  np.testing.assert_allclose(
    mel.window(hamming), 0.54 - 0.46 * np.cos(2 * np.pi * n / 399), atol=1e-15
  )


# 5. A pure tone lands in the analytically expected mel bin.


@pytest.mark.parametrize('freq', [2500.0, 3000.0, 4000.0, 5000.0, 7500.0])
def test_pure_tone_lands_in_expected_bin(freq):
  centres, delta = _edges(EAT)
  position = (1127.0 * np.log(1.0 + freq / 700.0) - centres[0]) / delta
  expected = int(np.round(position))
  # These frequencies sit within 0.3 spacings of a centre, so the expected filter is unambiguous.
  assert abs(position - expected) < 0.3
  tone = (0.5 * np.sin(2 * np.pi * freq * np.arange(SR) / SR)).astype(np.float32)
  for log_mel in (
    fbank_host.log_mel(tone, EAT),
    np.asarray(fbank_device.log_mel(tone[None], EAT))[0],
  ):
    assert np.all(log_mel.argmax(axis=1) == expected)
    mean = log_mel.mean(axis=0)
    far = np.abs(np.arange(128) - expected) >= 4
    assert mean[expected] - mean[far].max() > 4.0  # > 17 dB above everything 4+ filters away


# 6. Device: jit, vmap, batching, retracing, dtype, padded batches.


def test_device_jits_without_retrace(clips):
  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(waveforms_bs):
    return fbank_device.features(waveforms_bs, EAT)

  x_bs = jnp.stack([clips['synthetic_10s'][:32000], _synthetic(2.0, seed=1)])
  first = step(x_bs)
  second = step(x_bs * 0.5)
  chex.assert_shape([first, second], (2, 1024, 128))
  assert not np.allclose(first, second)


def test_device_batch_and_vmap_consistent(clips):
  x_bs = np.stack([_synthetic(2.0, seed=s) for s in range(4)])
  batched = np.asarray(fbank_device.features(x_bs, EAT))
  for i in range(4):
    single = np.asarray(fbank_device.features(x_bs[i : i + 1], EAT))[0]
    np.testing.assert_allclose(batched[i], single, rtol=0, atol=1e-6)
  mapped = jax.vmap(lambda x: fbank_device.features(x, EAT))(x_bs.reshape(2, 2, -1))
  np.testing.assert_allclose(np.asarray(mapped).reshape(4, 1024, 128), batched, rtol=0, atol=1e-6)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16, np.float32])
def test_device_computes_in_float32(dtype):
  x = jnp.asarray(_synthetic(1.0)[None], dtype)
  out = fbank_device.log_mel(x, EAT)
  assert out.dtype == jnp.float32
  host = fbank_host.log_mel(np.asarray(x.astype(jnp.float32))[0], EAT)
  np.testing.assert_allclose(np.asarray(out)[0], host, rtol=0, atol=HOST_DEVICE_ATOL)


@pytest.mark.parametrize(
  'preset', [EAT, presets_lib.get_preset(remove_dc_offset=False)], ids=['eat', 'no_dc']
)
def test_device_padded_batch_matches_unpadded_clips(preset):
  lengths = [16000, 12345, 8000, 399]
  clips_ = [_synthetic(1.0, seed=i)[:n] for i, n in enumerate(lengths)]
  x_bs = np.zeros((len(lengths), 16000), np.float32)
  for i, clip in enumerate(clips_):
    x_bs[i, : len(clip)] = clip
  device = np.asarray(fbank_device.features(x_bs, preset, np.array(lengths)))
  for i, clip in enumerate(clips_[:-1]):
    np.testing.assert_allclose(
      device[i], fbank_host.features(clip, preset), rtol=0, atol=HOST_DEVICE_ATOL
    )
  np.testing.assert_allclose(device[-1], PAD_EXACT, rtol=0, atol=3e-8)  # < one window: all padding


# 7. Presets.


def test_preset_sizes():
  assert (EAT.window_length, EAT.frame_shift, EAT.n_fft, EAT.high_freq_hz) == (
    400,
    160,
    512,
    8000.0,
  )
  assert presets_lib.get_preset(round_to_power_of_two=False).n_fft == 400
  assert presets_lib.get_preset(high_freq=-1000.0).high_freq_hz == 7000.0
  assert presets_lib.get_preset() == EAT and hash(presets_lib.get_preset()) == hash(EAT)


def test_unknown_preset_name():
  with pytest.raises(ValueError, match=r"unknown front-end preset 'eat'.*beats.*eat_audiomae"):
    presets_lib.get_preset('eat')


def test_unknown_override():
  with pytest.raises(ValueError, match=r"\['num_mels'\].*num_mel_bins"):
    presets_lib.get_preset(num_mels=64)


@pytest.mark.parametrize(
  'overrides, field',
  [
    ({'window': 'hann'}, 'window'),
    ({'norm_mode': 'minmax'}, 'norm_mode'),
    ({'num_mel_bins': 0}, 'num_mel_bins'),
    ({'high_freq': 9000.0}, 'high_freq'),
    ({'norm_std': 0.0}, 'norm_std'),
  ],
)
def test_invalid_override_values(overrides, field):
  with pytest.raises(ValueError, match=field):
    presets_lib.get_preset(**overrides)


@pytest.mark.parametrize('name', sorted(presets_lib.PRESETS))
def test_presets_round_trip_json(name):
  preset = presets_lib.get_preset(name)
  restored = presets_lib.FrontEndPreset.from_dict(json.loads(json.dumps(preset.to_dict())))
  assert restored == preset
  assert restored.name == name


def test_from_dict_rejects_unknown_field():
  with pytest.raises(ValueError, match='fft_size'):
    presets_lib.FrontEndPreset.from_dict({**EAT.to_dict(), 'fft_size': 512})
