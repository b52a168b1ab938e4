"""Host (numpy) Kaldi log-mel features for one clip, plus the pad/crop and normalisation steps.

Use this in data workers, evaluation and export; the jitted training step uses `fbank_device`, which
computes the same features in JAX. `pad_or_crop` and `normalize` accept numpy or JAX arrays, so both
paths share one definition of those steps.

The spectrum is computed in float64, which makes the host path the accurate one: before the final
cast to float32 (the dtype the models consume) it agrees with a direct float64 transcription of
Kaldi to ~1e-12. A float32 spectrum would not do: bins just above the log floor in loud frames
would carry ~1e-3 of error in their log (see `fbank_device`, which avoids it differently).
"""

import jax.numpy as jnp
import numpy as np

from aasp_jax.audio import mel
from aasp_jax.audio import presets as presets_lib


def log_mel(waveform: np.ndarray, preset: presets_lib.FrontEndPreset) -> np.ndarray:
  """Raw Kaldi log-mel filterbank of one clip (no padding, no normalisation).

  Args:
    waveform: [S] mono waveform at `preset.sample_rate`, float in [-1, 1].
    preset: the front end; its `subtract_waveform_mean` and `waveform_scale` apply here.

  Returns:
    float32 [T, num_mel_bins] with T = 1 + (S - window_length) // frame_shift.

  Raises:
    ValueError: if `waveform` is not 1-D or is shorter than one analysis window.
  """
  x_s = np.asarray(waveform, dtype=np.float64)
  if x_s.ndim != 1:
    raise ValueError(f'log_mel expects a 1-D mono waveform, got shape {x_s.shape}')
  idx_tn = mel.frame_indices(x_s.shape[0], preset)
  if preset.subtract_waveform_mean:
    x_s = x_s - x_s.mean()
  if preset.waveform_scale != 1.0:
    x_s = x_s * preset.waveform_scale

  frames_tn = mel.process_frames(x_s[idx_tn], preset)
  spectrum_tk = np.fft.rfft(frames_tn, n=preset.n_fft, axis=1)
  power_tk = spectrum_tk.real**2 + spectrum_tk.imag**2
  mel_tf = power_tk @ mel.mel_banks(preset)
  return np.log(np.maximum(mel_tf, preset.log_floor)).astype(np.float32)


def pad_or_crop(x_tf, target_length: int):
  """Zero-pads (at the end, in the log domain) or crops (keeps the first frames) the time axis.

  Works on numpy and JAX arrays; the time axis is the second to last ([..., T, F]). Padding with 0
  before normalisation is what AST / Audio-MAE / EAT do, so padded frames normalise to
  -mean / (2 std) (+0.467 for `eat_audiomae`); keep it for weight compatibility.
  """
  num_frames = x_tf.shape[-2]
  if num_frames >= target_length:
    return x_tf[..., :target_length, :]
  xp = np if isinstance(x_tf, np.ndarray) else jnp
  pad_width = [(0, 0)] * (x_tf.ndim - 2) + [(0, target_length - num_frames), (0, 0)]
  return xp.pad(x_tf, pad_width)


def normalize(x, preset: presets_lib.FrontEndPreset):
  """(x - norm_mean) / norm_scale on numpy or JAX arrays, keeping x's float dtype.

  Written as a multiply by the reciprocal (rounded once, in Python): XLA may lower a division to a
  reciprocal-multiply while numpy divides exactly, and then padded frames would differ by an ulp
  between host and device. Python-float constants do not promote a float32 array in numpy (NEP 50)
  or JAX (weak types), so both paths perform the identical float32 operations.
  """
  return (x - preset.norm_mean) * (1.0 / preset.norm_scale)


def features(waveform: np.ndarray, preset: presets_lib.FrontEndPreset) -> np.ndarray:
  """Model input for one clip: log_mel, then pad/crop to target_length, then normalise.

  Returns:
    float32 [preset.target_length, preset.num_mel_bins].
  """
  return normalize(pad_or_crop(log_mel(waveform, preset), preset.target_length), preset)
