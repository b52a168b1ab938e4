"""Kaldi framing, per-frame processing, window and mel filterbank, in numpy, for both log-mel paths.

The host (`fbank_host`) and device (`fbank_device`) front ends take their definitions and constants
from here, so the two can only differ in arithmetic, never in definition. The definitions follow
Kaldi's feature-window.cc (framing, DC removal, pre-emphasis, windows) and mel-computations.cc
(mel banks), which torchaudio's `compliance.kaldi.fbank` also follows. Kaldi's mel triangles are
linear in the *mel* domain and sampled at the FFT bin centres; they are not librosa's Hz-domain,
Slaney-normalised triangles.
"""

import functools

import numpy as np

from aasp_jax.audio import presets as presets_lib


def kaldi_mel(freq_hz):
  """Kaldi / HTK mel scale: 1127 ln(1 + f / 700)."""
  return 1127.0 * np.log1p(np.asarray(freq_hz, dtype=np.float64) / 700.0)


def kaldi_mel_inverse(mel):
  """Inverse of `kaldi_mel`: 700 (exp(mel / 1127) - 1)."""
  return 700.0 * np.expm1(np.asarray(mel, dtype=np.float64) / 1127.0)


def _read_only(x: np.ndarray) -> np.ndarray:
  # The arrays are cached and shared by every caller; a stray in-place edit must not leak.
  x.setflags(write=False)
  return x


@functools.lru_cache(maxsize=None)
def window(preset: presets_lib.FrontEndPreset) -> np.ndarray:
  """Analysis window, float64 [window_length], before zero-padding to n_fft."""
  n = preset.window_length
  i = np.arange(n, dtype=np.float64)
  # Kaldi's symmetric windows use a = 2 pi / (N - 1); the periodic Hann uses N.
  cos_sym = np.cos(2.0 * np.pi * i / (n - 1))
  if preset.window == 'hann_symmetric':
    w = 0.5 - 0.5 * cos_sym
  elif preset.window == 'hann_periodic':
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * i / n)
  elif preset.window == 'hamming':
    w = 0.54 - 0.46 * cos_sym
  else:  # 'povey'; presets validate the name.
    w = (0.5 - 0.5 * cos_sym) ** 0.85
  return _read_only(w)


def process_frames(frames_tn: np.ndarray, preset: presets_lib.FrontEndPreset) -> np.ndarray:
  """Kaldi's per-frame steps in float64: DC removal, pre-emphasis, window. [T, N] -> [T, N].

  Works in place on one float64 copy: a 10 s clip's frames are 3 MB, and every temporary of that
  size costs fresh pages from the OS, which made the naive version 5x slower than the arithmetic.
  """
  out_tn = np.array(frames_tn, dtype=np.float64)  # the one copy
  if preset.remove_dc_offset:
    out_tn -= out_tn.mean(axis=1, keepdims=True)
  if preset.preemphasis:
    # Kaldi's convention: x[i] -= c x[i-1] for i > 0 and the first sample against itself. numpy
    # buffers the overlapping in-place update, so every term uses the pre-update neighbour.
    out_tn[:, 1:] -= preset.preemphasis * out_tn[:, :-1]
    out_tn[:, 0] *= 1.0 - preset.preemphasis
  out_tn *= window(preset)
  return out_tn


@functools.lru_cache(maxsize=None)
def frame_spectrum_matrix(preset: presets_lib.FrontEndPreset) -> np.ndarray:
  """The per-frame pipeline up to the spectrum as one float64 [N, 2 * (n_fft // 2)] matrix.

  DC removal, pre-emphasis, windowing, zero-padding and the DFT are all linear in the frame's
  samples, so `frame @ matrix` gives [Re X_0 .. Re X_{K-1}, Im X_0 .. Im X_{K-1}] for the
  K = n_fft / 2 bins the mel banks use (the Nyquist bin has weight 0 and is left out). Row j is the
  spectrum of a unit impulse at sample j pushed through `process_frames`.
  """
  num_bins = preset.n_fft // 2
  spectrum_nk = np.fft.rfft(
    process_frames(np.eye(preset.window_length), preset), n=preset.n_fft, axis=1
  )[:, :num_bins]
  return _read_only(np.concatenate([spectrum_nk.real, spectrum_nk.imag], axis=1))


@functools.lru_cache(maxsize=None)
def mel_banks(preset: presets_lib.FrontEndPreset) -> np.ndarray:
  """Kaldi mel filterbank as a float64 [n_fft // 2 + 1, num_mel_bins] matrix for `power @ banks`.

  Filter m spans mel points m, m+1, m+2 of num_mel_bins + 2 points spaced evenly in mel between
  low_freq and high_freq; its weight at FFT bin i (centre i * sample_rate / n_fft) is the triangle
  evaluated at that bin's mel value. Kaldi only uses bins 0 .. n_fft/2 - 1, so the Nyquist row is
  zero; keeping it lets callers multiply the full rfft power spectrum.

  Low filters can be narrower than the FFT bin spacing and then fall between two bins: with 128 mel
  bins and n_fft 512 (eat_audiomae, beats), filter 3 has no nonzero weight, so that log-mel channel
  is always log(log_floor). Kaldi's C++ refuses such banks, but torchaudio's `kaldi.fbank` (which
  the pre-trained models used) accepts them, and so do we, to produce the same features.
  """
  num_fft_bins = preset.n_fft // 2
  mel_low = kaldi_mel(preset.low_freq)
  mel_high = kaldi_mel(preset.high_freq_hz)
  mel_delta = (mel_high - mel_low) / (preset.num_mel_bins + 1)
  m = np.arange(preset.num_mel_bins, dtype=np.float64)[None, :]
  left_mel = mel_low + m * mel_delta
  center_mel = mel_low + (m + 1.0) * mel_delta
  right_mel = mel_low + (m + 2.0) * mel_delta

  bin_mel = kaldi_mel(np.arange(num_fft_bins) * (preset.sample_rate / preset.n_fft))[:, None]
  up_slope = (bin_mel - left_mel) / (center_mel - left_mel)
  down_slope = (right_mel - bin_mel) / (right_mel - center_mel)
  banks = np.maximum(0.0, np.minimum(up_slope, down_slope))

  nyquist_row = np.zeros((1, preset.num_mel_bins))
  return _read_only(np.concatenate([banks, nyquist_row], axis=0))


def frame_starts(num_samples: int, preset: presets_lib.FrontEndPreset) -> np.ndarray:
  """First sample of every frame (snip_edges=True), int32 [num_frames].

  Raises:
    ValueError: if the waveform is shorter than one window, naming both lengths (Kaldi would emit
      zero frames, which downstream code cannot pad meaningfully).
  """
  num_frames = preset.num_frames(num_samples)
  if num_frames == 0:
    raise ValueError(
      f'waveform has {num_samples} samples; the front end needs at least {preset.window_length} '
      f'(one {preset.frame_length_ms} ms window at {preset.sample_rate} Hz)'
    )
  return np.arange(num_frames, dtype=np.int32) * preset.frame_shift


def frame_indices(num_samples: int, preset: presets_lib.FrontEndPreset) -> np.ndarray:
  """Sample index of every frame element, int32 [num_frames, window_length], for a static gather."""
  starts = frame_starts(num_samples, preset)
  return starts[:, None] + np.arange(preset.window_length, dtype=np.int32)[None, :]
