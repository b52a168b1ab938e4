"""Independent plain-numpy transcription of Kaldi's fbank, used as the ground truth in the tests.

It follows Kaldi's C++ (src/feat/feature-window.cc, feature-fbank.cc, mel-computations.cc) frame by
frame and bin by bin, with Kaldi's option names and defaults, and deliberately shares no code with
`aasp_jax`: no vectorised framing, no FFT library (a direct DFT), no precomputed mel matrix. It is
slow and simple on purpose. Everything is float64; only dither, energy and VTLN are left out
(dither=0, use_energy=False and no warping are what the presets use).
"""

import math

import numpy as np


def kaldi_window(frame_length, window_type, blackman_coeff=0.42):
  """FeatureWindowFunction: the window Kaldi multiplies each frame by."""
  a = 2.0 * math.pi / (frame_length - 1)
  window = np.zeros(frame_length)
  for i in range(frame_length):
    if window_type == 'hanning':
      window[i] = 0.5 - 0.5 * math.cos(a * i)
    elif window_type == 'hamming':
      window[i] = 0.54 - 0.46 * math.cos(a * i)
    elif window_type == 'povey':
      window[i] = (0.5 - 0.5 * math.cos(a * i)) ** 0.85
    elif window_type == 'rectangular':
      window[i] = 1.0
    elif window_type == 'blackman':
      window[i] = (
        blackman_coeff - 0.5 * math.cos(a * i) + (0.5 - blackman_coeff) * math.cos(2 * a * i)
      )
    else:
      raise ValueError(f'unknown window_type {window_type!r}')
  return window


def mel_scale(freq):
  """MelBanks::MelScale."""
  return 1127.0 * math.log(1.0 + freq / 700.0)


def mel_banks(num_bins, padded_window_size, sample_freq, low_freq, high_freq):
  """MelBanks constructor: per bin, (first FFT index, weights) over bins 0 .. N/2 - 1."""
  num_fft_bins = padded_window_size // 2
  nyquist = 0.5 * sample_freq
  if high_freq <= 0.0:
    high_freq += nyquist
  fft_bin_width = sample_freq / padded_window_size
  mel_low_freq = mel_scale(low_freq)
  mel_high_freq = mel_scale(high_freq)
  mel_freq_delta = (mel_high_freq - mel_low_freq) / (num_bins + 1)
  banks = []
  for b in range(num_bins):
    left_mel = mel_low_freq + b * mel_freq_delta
    center_mel = mel_low_freq + (b + 1) * mel_freq_delta
    right_mel = mel_low_freq + (b + 2) * mel_freq_delta
    this_bin = np.zeros(num_fft_bins)
    first_index, last_index = -1, -1
    for i in range(num_fft_bins):
      mel = mel_scale(fft_bin_width * i)
      if left_mel < mel < right_mel:
        if mel <= center_mel:
          weight = (mel - left_mel) / (center_mel - left_mel)
        else:
          weight = (right_mel - mel) / (right_mel - center_mel)
        this_bin[i] = weight
        if first_index == -1:
          first_index = i
        last_index = i
    # Kaldi errors out on an empty bin; torchaudio (what EAT used) keeps it as all zeros.
    if first_index == -1:
      banks.append((0, np.zeros(0)))
    else:
      banks.append((first_index, this_bin[first_index : last_index + 1].copy()))
  return banks


def dft_tables(n):
  """cos / sin of 2 pi k t / n for k = 0 .. n/2 and t = 0 .. n-1 (the direct DFT's kernel)."""
  angle = 2.0 * math.pi * np.outer(np.arange(n // 2 + 1), np.arange(n)) / n
  return np.cos(angle), np.sin(angle)


def power_spectrum(frame, tables):
  """ComputePowerSpectrum via a direct DFT: |X_k|^2 for k = 0 .. N/2."""
  cos_table, sin_table = tables
  re = cos_table @ frame
  im = -(sin_table @ frame)
  return re * re + im * im


def fbank(
  waveform,
  sample_frequency=16000.0,
  frame_length=25.0,
  frame_shift=10.0,
  num_mel_bins=23,
  low_freq=20.0,
  high_freq=0.0,
  preemphasis_coefficient=0.97,
  remove_dc_offset=True,
  window_type='povey',
  round_to_power_of_two=True,
  snip_edges=True,
  use_log_fbank=True,
  use_power=True,
):
  """Kaldi `compute-fbank-feats` on one waveform (already scaled and mean-removed by the caller).

  Returns:
    float64 [num_frames, num_mel_bins]; zero frames if the waveform is shorter than one window.
  """
  if not snip_edges:
    raise NotImplementedError('only snip_edges=True is transcribed')
  waveform = np.asarray(waveform, dtype=np.float64)
  window_size = int(sample_frequency * frame_length * 0.001)
  window_shift = int(sample_frequency * frame_shift * 0.001)
  padded_window_size = window_size
  if round_to_power_of_two:
    padded_window_size = 1
    while padded_window_size < window_size:
      padded_window_size *= 2

  num_samples = waveform.shape[0]
  num_frames = 0 if num_samples < window_size else 1 + (num_samples - window_size) // window_shift
  window = kaldi_window(window_size, window_type)
  banks = mel_banks(num_mel_bins, padded_window_size, sample_frequency, low_freq, high_freq)
  tables = dft_tables(padded_window_size)
  floor = float(np.finfo(np.float32).eps)

  out = np.zeros((num_frames, num_mel_bins))
  for f in range(num_frames):
    # ExtractWindow + ProcessWindow.
    start = f * window_shift
    frame = waveform[start : start + window_size].copy()
    if remove_dc_offset:
      frame -= frame.sum() / window_size
    if preemphasis_coefficient != 0.0:
      for i in range(window_size - 1, 0, -1):
        frame[i] -= preemphasis_coefficient * frame[i - 1]
      frame[0] -= preemphasis_coefficient * frame[0]
    frame *= window
    padded = np.zeros(padded_window_size)
    padded[:window_size] = frame

    # FbankComputer::Compute.
    power = power_spectrum(padded, tables)
    if not use_power:
      power = np.sqrt(power)
    for b, (offset, weights) in enumerate(banks):
      energy = float(np.dot(weights, power[offset : offset + weights.shape[0]]))
      if use_log_fbank:
        energy = math.log(max(energy, floor))
      out[f, b] = energy
  return out
