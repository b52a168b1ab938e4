"""Decode an audio file into the float32 mono waveform the front end expects.

Reads with soundfile (WAV, FLAC, OGG, ... through libsndfile), averages the channels, and resamples
explicitly to the preset's rate with librosa's soxr backend. Resampling is logged because a silent
rate change is a classic source of train/eval mismatch. The waveform mean is *not* removed here: the
preset's `subtract_waveform_mean` applies inside the log-mel, so host and device paths do it alike.
"""

import logging
import os

import librosa
import numpy as np
import soundfile as sf

from aasp_jax.audio import presets as presets_lib

_logger = logging.getLogger(__name__)

# soxr's high-quality mode is librosa's default; naming it keeps the choice explicit and stable.
RESAMPLE_TYPE = 'soxr_hq'

# Rate pairs already announced at INFO level in this process; later files log at DEBUG only, so a
# data worker does not print one line per clip.
_announced_rates: set[tuple[int, int]] = set()


def load_audio(
  path: str | os.PathLike, preset_or_sample_rate: presets_lib.FrontEndPreset | int
) -> np.ndarray:
  """Loads `path` as a float32 mono waveform in [-1, 1] at the target rate.

  Args:
    path: an audio file libsndfile can read.
    preset_or_sample_rate: a `FrontEndPreset` (its `sample_rate` is used) or a rate in Hz.

  Returns:
    float32 [S] waveform; channels averaged; resampled if the file's rate differs.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if the file cannot be decoded; the message names the file.
  """
  if isinstance(preset_or_sample_rate, presets_lib.FrontEndPreset):
    target_rate = preset_or_sample_rate.sample_rate
  else:
    target_rate = int(preset_or_sample_rate)
  if target_rate <= 0:
    raise ValueError(f'target sample rate must be positive, got {preset_or_sample_rate!r}')

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'audio file not found: {path}')
  try:
    audio_sc, file_rate = sf.read(path, dtype='float32', always_2d=True)
  except (sf.SoundFileError, RuntimeError) as e:
    raise ValueError(f'cannot decode audio file {path}: {e}') from e

  waveform = audio_sc.mean(axis=1, dtype=np.float32)
  if file_rate != target_rate:
    level = logging.DEBUG if (file_rate, target_rate) in _announced_rates else logging.INFO
    _announced_rates.add((file_rate, target_rate))
    _logger.log(
      level,
      'resampling %s from %d Hz to %d Hz (%s, %d channel(s) averaged)',
      path,
      file_rate,
      target_rate,
      RESAMPLE_TYPE,
      audio_sc.shape[1],
    )
    waveform = librosa.resample(
      waveform, orig_sr=file_rate, target_sr=target_rate, res_type=RESAMPLE_TYPE
    )
  return np.ascontiguousarray(waveform, dtype=np.float32)
