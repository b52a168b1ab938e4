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

_FRAMES_PER_BLOCK = 128


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
  num_frames = preset.num_frames(x_s.shape[0])
  if num_frames < 1:
    mel.frame_starts(x_s.shape[0], preset)  # raises the precise error for a too-short clip
  if preset.subtract_waveform_mean:
    x_s = x_s - x_s.mean()
  if preset.waveform_scale != 1.0:
    x_s = x_s * preset.waveform_scale
  # Kaldi processes each frame f = x[s : s + n]: f -= mean(f); f[i] -= c f[i-1] (i > 0),
  # f[0] -= c f[0]; f *= w. That equals z - m (1 - c) w with y = x - c x[-1] computed once over the
  # clip, z[i] = w[i] y[s + i] for i > 0, z[0] = w[0] (1 - c) x[s], and m the frame mean; the last
  # term is rank one, so it is subtracted in the spectrum: one pass over the frames instead of four.
  c, n, shift = preset.preemphasis, preset.window_length, preset.frame_shift
  w_n = mel.window(preset)
  y_s = x_s.copy()
  y_s[1:] -= c * x_s[:-1]
  starts_t = np.arange(num_frames) * shift
  frames_tn = np.lib.stride_tricks.sliding_window_view(y_s, n)[::shift][:num_frames]
  if preset.remove_dc_offset:
    csum = np.concatenate([[0.0], np.cumsum(x_s)])
    dc_t = (csum[starts_t + n] - csum[starts_t]) * ((1.0 - c) / n)
    window_spectrum_k = np.fft.rfft(w_n, n=preset.n_fft)
  banks_kf = mel.mel_banks(preset).astype(np.float32)
  out_tf = np.empty((num_frames, preset.num_mel_bins), np.float32)
  # Blocks of frames keep every temporary small and cache-resident: on a 10 s clip whole-clip
  # temporaries (MBs each) spent more time getting fresh pages from the OS than computing.
  # One zero-padded buffer for every block: the FFT then needs no padding copy of its own.
  buffer_tn = np.zeros((min(_FRAMES_PER_BLOCK, num_frames), preset.n_fft))
  for t0 in range(0, num_frames, _FRAMES_PER_BLOCK):
    block = slice(t0, t0 + _FRAMES_PER_BLOCK)
    rows = min(_FRAMES_PER_BLOCK, num_frames - t0)
    z_tn = buffer_tn[:rows]
    np.multiply(frames_tn[block], w_n, out=z_tn[:, :n])
    z_tn[:, 0] = (w_n[0] * (1.0 - c)) * x_s[starts_t[block]]
    spectrum_tk = np.fft.rfft(z_tn, axis=1)
    if preset.remove_dc_offset:
      spectrum_tk -= dc_t[block, None] * window_spectrum_k
    power_tk = np.square(spectrum_tk.real)
    power_tk += np.square(spectrum_tk.imag)
    # The power is positive, so float32 from here on keeps ~6e-8 relative (log) error: the float64
    # was needed for the spectrum's cancellations, not for these sums.
    mel_tf = power_tk.astype(np.float32) @ banks_kf
    np.maximum(mel_tf, np.float32(preset.log_floor), out=mel_tf)
    out_tf[block] = np.log(mel_tf, out=mel_tf)
  return out_tf


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
