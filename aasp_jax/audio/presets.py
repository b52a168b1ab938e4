"""Front-end presets: every number that turns a waveform into normalised log-mel features.

A preset is data, not code: one frozen dataclass whose fields drive both the host (numpy) and the
device (JAX) log-mel. It is hashable, so it can be a static argument of a jitted function, and it
round-trips through JSON, so checkpoints and exports can store the exact front end they were trained
with. Look presets up with `get_preset(name, **overrides)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

WINDOWS = ('hann_symmetric', 'hann_periodic', 'hamming', 'povey')
NORM_MODES = ('audioset_2std', 'std')


@dataclasses.dataclass(frozen=True)
class FrontEndPreset:
  """A Kaldi-style log-mel front end (the fields mirror Kaldi / torchaudio `fbank` options).

  Attributes:
    name: registry name, kept so checkpoints say which recipe they started from.
    sample_rate: rate (Hz) the decoder resamples to and the fbank assumes.
    frame_length_ms: analysis window length; samples = int(sample_rate * ms * 0.001) as in Kaldi.
    frame_shift_ms: hop between frames.
    round_to_power_of_two: zero-pad each frame to the next power of two (Kaldi default) instead of
      using the window length as the FFT size.
    num_mel_bins: number of triangular mel filters.
    low_freq: lower edge of the first filter, Hz.
    high_freq: upper edge of the last filter, Hz; <= 0 means nyquist + high_freq (Kaldi convention).
    preemphasis: coefficient of x[i] -= c * x[i-1] inside each frame (x[-1] taken as x[0]).
    remove_dc_offset: subtract each frame's mean before pre-emphasis.
    window: 'hann_symmetric' (Kaldi "hanning"), 'hann_periodic', 'hamming' (Kaldi, symmetric) or
      'povey' (symmetric Hann to the power 0.85, Kaldi's and torchaudio's default).
    log_floor: power floor before the log (float32 eps in Kaldi / torchaudio).
    subtract_waveform_mean: subtract the clip's mean from the waveform first (EAT / Audio-MAE do).
    waveform_scale: multiply the [-1, 1] waveform by this first (BEATs uses 2**15).
    target_length: number of frames after zero-padding (log domain) or cropping.
    norm_mean: mean of the log-mel over the pre-training set.
    norm_std: standard deviation of the log-mel over the pre-training set.
    norm_mode: 'audioset_2std' -> (x - mean) / (2 std) (AST / Audio-MAE / EAT / BEATs convention);
      'std' -> (x - mean) / std.
  """

  name: str = 'eat_audiomae'
  sample_rate: int = 16000
  frame_length_ms: float = 25.0
  frame_shift_ms: float = 10.0
  round_to_power_of_two: bool = True
  num_mel_bins: int = 128
  low_freq: float = 20.0
  high_freq: float = 0.0
  preemphasis: float = 0.97
  remove_dc_offset: bool = True
  window: str = 'hann_symmetric'
  log_floor: float = float(np.finfo(np.float32).eps)
  subtract_waveform_mean: bool = True
  waveform_scale: float = 1.0
  target_length: int = 1024
  norm_mean: float = -4.2677393
  norm_std: float = 4.5689974
  norm_mode: str = 'audioset_2std'

  def __post_init__(self):
    # Fail at construction, not deep inside a jitted step, with the offending field named.
    if self.window not in WINDOWS:
      raise ValueError(f'window must be one of {WINDOWS}, got {self.window!r}')
    if self.norm_mode not in NORM_MODES:
      raise ValueError(f'norm_mode must be one of {NORM_MODES}, got {self.norm_mode!r}')
    for field in ('sample_rate', 'num_mel_bins', 'target_length'):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f'{field} must be a positive integer, got {value!r}')
    for field in ('frame_length_ms', 'frame_shift_ms', 'norm_std', 'log_floor', 'waveform_scale'):
      if not getattr(self, field) > 0:
        raise ValueError(f'{field} must be > 0, got {getattr(self, field)!r}')
    if not 0.0 <= self.preemphasis <= 1.0:
      raise ValueError(f'preemphasis must be in [0, 1], got {self.preemphasis!r}')
    if self.window_length < 2 or self.frame_shift < 1:
      raise ValueError(
        f'frame_length_ms={self.frame_length_ms} / frame_shift_ms={self.frame_shift_ms} give '
        f'{self.window_length} / {self.frame_shift} samples at {self.sample_rate} Hz; too short'
      )
    if self.n_fft % 2:
      # Kaldi's mel banks take n_fft / 2 bins and need that to be exact.
      raise ValueError(f'n_fft must be even, got {self.n_fft} (set round_to_power_of_two=True)')
    nyquist = 0.5 * self.sample_rate
    if not 0.0 <= self.low_freq < self.high_freq_hz <= nyquist:
      raise ValueError(
        f'need 0 <= low_freq < high_freq <= nyquist ({nyquist} Hz); got low_freq={self.low_freq}, '
        f'high_freq={self.high_freq} (-> {self.high_freq_hz} Hz)'
      )

  # Derived sizes, computed exactly as Kaldi / torchaudio do (truncation, not rounding).

  @property
  def window_length(self) -> int:
    """Samples per analysis window (400 at 16 kHz / 25 ms)."""
    return int(self.sample_rate * self.frame_length_ms * 0.001)

  @property
  def frame_shift(self) -> int:
    """Samples between frame starts (160 at 16 kHz / 10 ms)."""
    return int(self.sample_rate * self.frame_shift_ms * 0.001)

  @property
  def n_fft(self) -> int:
    """FFT size after zero-padding the window (512 for a 400-sample window)."""
    if self.round_to_power_of_two:
      return 1 << (self.window_length - 1).bit_length()
    return self.window_length

  @property
  def high_freq_hz(self) -> float:
    """Upper mel edge in Hz after resolving the `high_freq <= 0` convention."""
    return self.high_freq if self.high_freq > 0 else 0.5 * self.sample_rate + self.high_freq

  @property
  def norm_scale(self) -> float:
    """Divisor of the normalisation: 2 std or std depending on `norm_mode`."""
    return 2.0 * self.norm_std if self.norm_mode == 'audioset_2std' else self.norm_std

  def num_frames(self, num_samples: int) -> int:
    """Frames Kaldi emits with snip_edges=True: 1 + (S - window) // shift, or 0 if S < window."""
    if num_samples < self.window_length:
      return 0
    return 1 + (num_samples - self.window_length) // self.frame_shift

  def to_dict(self) -> dict[str, Any]:
    """Plain JSON-serialisable dict of every field (for checkpoints and exports)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> FrontEndPreset:
    """Inverse of `to_dict`; rejects unknown keys so a stale checkpoint cannot be misread."""
    _check_fields(d.keys(), 'preset dict field(s)')
    return cls(**d)


def _check_fields(keys, what: str) -> None:
  valid = [f.name for f in dataclasses.fields(FrontEndPreset)]
  unknown = sorted(set(keys) - set(valid))
  if unknown:
    raise ValueError(f'unknown {what} {unknown}; valid fields: {valid}')


PRESETS: dict[str, FrontEndPreset] = {
  # EAT / Audio-MAE / SSLAM: torchaudio.compliance.kaldi.fbank(wave - wave.mean(), htk_compat=True,
  # use_energy=False, window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10), padded
  # to 1024 frames, then (x + 4.2677393) / (2 * 4.5689974). htk_compat only moves the energy
  # coefficient, which use_energy=False drops, so it needs no field.
  'eat_audiomae': FrontEndPreset(),
  # BEATs (BEATs.preprocess): kaldi.fbank(wave * 2**15, num_mel_bins=128, frame_length=25,
  # frame_shift=10) with torchaudio's defaults otherwise, i.e. the 'povey' window and no waveform
  # mean removal, then (fbank - 15.41663) / (2 * 6.55582): BEATs divides by 2 std as well.
  'beats': FrontEndPreset(
    name='beats',
    window='povey',
    subtract_waveform_mean=False,
    waveform_scale=float(2**15),
    norm_mean=15.41663,
    norm_std=6.55582,
  ),
}


def get_preset(name: str = 'eat_audiomae', **overrides: Any) -> FrontEndPreset:
  """Returns the registered preset `name`, with any fields replaced by `overrides`.

  Raises:
    ValueError: for an unknown preset name or override field (the message lists the valid ones), or
      for override values the preset rejects.
  """
  if name not in PRESETS:
    raise ValueError(f'unknown front-end preset {name!r}; valid presets: {sorted(PRESETS)}')
  _check_fields(overrides.keys(), f'override field(s) for preset {name!r}:')
  return dataclasses.replace(PRESETS[name], **overrides)
