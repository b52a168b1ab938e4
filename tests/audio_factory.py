"""Writes good, bad and odd audio files for data tests; every case knows how it should be counted.

`make_bad_inputs(tmpdir)` returns {case: path}. `EXPECTED_SKIP[case]` is the skip reason the case
must get (cases absent from it load), and `EXPECTED_HANDLED[case]` the HANDLED tags a loadable case
must get when packed with max_seconds shorter than the 'very_long' file (pack's default 120 s).
"""

import os

import numpy as np
import soundfile as sf

EXPECTED_SKIP = {
  'missing': 'missing',
  'empty_file': 'empty',
  'zero_frames': 'empty',
  'garbage_flac': 'unreadable',
  'truncated_flac': 'unreadable',
  'text_as_wav': 'unreadable',
  'png_as_wav': 'unreadable',
  'nan_samples': 'non_finite',
  'inf_samples': 'non_finite',
  'silence': 'silent',
  'dc_only': 'silent',
  'too_short': 'too_short',
}

EXPECTED_HANDLED = {
  'clean': (),
  'rate_8k': ('resampled',),
  'rate_44k1': ('resampled',),
  'rate_48k': ('resampled',),
  'stereo': ('downmixed',),
  'six_channel': ('downmixed',),
  'very_long': ('split_long',),
}

CASES = tuple(EXPECTED_SKIP) + tuple(EXPECTED_HANDLED)

# The first bytes of a PNG file: a real image signature, so "not audio" is not just "random".
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR'


def noise(
  seconds: float, sample_rate: int, channels: int = 1, amplitude: float = 0.1, seed: int = 0
):
  """Gaussian noise, float32 [frames] or [frames, channels], clipped to [-0.99, 0.99]."""
  rng = np.random.default_rng(seed)
  shape = (int(round(seconds * sample_rate)),) + ((channels,) if channels > 1 else ())
  return np.clip(amplitude * rng.standard_normal(shape), -0.99, 0.99).astype(np.float32)


def sine(freq: float, seconds: float, sample_rate: int, amplitude: float = 0.5):
  """A float32 sine wave."""
  t = np.arange(int(round(seconds * sample_rate))) / sample_rate
  return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path, data, sr: int, subtype: str | None = None) -> str:
  """Writes a WAV file (PCM_16 unless `subtype` says otherwise, e.g. 'FLOAT'); returns the path."""
  path = os.fspath(path)
  sf.write(path, data, sr, format='WAV', subtype=subtype or 'PCM_16')
  return path


def write_flac(path, data, sr: int, subtype: str = 'PCM_16') -> str:
  """Writes a FLAC file; returns the path."""
  path = os.fspath(path)
  sf.write(path, data, sr, format='FLAC', subtype=subtype)
  return path


def write_bytes(path, data: bytes) -> str:
  path = os.fspath(path)
  with open(path, 'wb') as f:
    f.write(data)
  return path


def make_bad_inputs(tmpdir, long_seconds: float = 600.0) -> dict[str, str]:
  """Writes one file per case of CASES into `tmpdir` and returns {case: path}.

  'missing' names a file that is not created. 'very_long' lasts `long_seconds` (low-amplitude
  16 kHz noise as FLAC; 600 s takes about a second to write).
  """
  d = os.fspath(tmpdir)
  os.makedirs(d, exist_ok=True)
  p = lambda name: os.path.join(d, name)  # noqa: E731
  rng = np.random.default_rng(1)
  paths = {'missing': p('missing.flac')}
  paths['empty_file'] = write_bytes(p('empty_file.wav'), b'')
  paths['zero_frames'] = write_wav(p('zero_frames.wav'), np.zeros(0, np.float32), 16000)
  paths['garbage_flac'] = write_bytes(p('garbage.flac'), rng.bytes(4096))
  full = write_flac(p('truncated_full.flac'), noise(2.0, 16000, seed=2), 16000)
  with open(full, 'rb') as f:
    encoded = f.read()
  os.remove(full)
  paths['truncated_flac'] = write_bytes(p('truncated.flac'), encoded[: len(encoded) // 2])
  paths['text_as_wav'] = write_bytes(p('text_as_wav.wav'), b'this is a text file, not audio\n' * 40)
  paths['png_as_wav'] = write_bytes(p('png_as_wav.wav'), _PNG_SIGNATURE + rng.bytes(512))
  # Bad samples every 1,000 samples, so that any window a reader takes (at least min_samples=2,960
  # long) holds some, as a whole-file read does.
  nan = noise(1.0, 16000, seed=3)
  nan[100::1000] = np.nan
  paths['nan_samples'] = write_wav(p('nan_samples.wav'), nan, 16000, 'FLOAT')
  inf = noise(1.0, 16000, seed=4)
  inf[200::1000] = np.inf
  inf[700::1000] = -np.inf
  paths['inf_samples'] = write_wav(p('inf_samples.wav'), inf, 16000, 'FLOAT')
  paths['silence'] = write_wav(p('silence.wav'), np.zeros(16000, np.float32), 16000)
  paths['dc_only'] = write_wav(p('dc_only.wav'), np.full(16000, 0.25, np.float32), 16000, 'FLOAT')
  paths['too_short'] = write_wav(p('too_short.wav'), noise(0.05, 16000, seed=5), 16000)
  paths['clean'] = write_flac(p('clean.flac'), noise(1.0, 16000, seed=6), 16000)
  paths['rate_8k'] = write_wav(p('rate_8k.wav'), noise(1.0, 8000, seed=7), 8000)
  paths['rate_44k1'] = write_flac(p('rate_44k1.flac'), noise(0.5, 44100, seed=8), 44100)
  paths['rate_48k'] = write_wav(p('rate_48k.wav'), noise(0.5, 48000, seed=9), 48000)
  paths['stereo'] = write_flac(p('stereo.flac'), noise(1.0, 16000, 2, seed=10), 16000)
  paths['six_channel'] = write_wav(p('six_channel.wav'), noise(0.5, 16000, 6, seed=11), 16000)
  paths['very_long'] = write_flac(
    p('very_long.flac'), noise(long_seconds, 16000, amplitude=0.01, seed=12), 16000
  )
  assert set(paths) == set(CASES)
  return paths
