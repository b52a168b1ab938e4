"""Decode and validate one audio clip, with a named reason whenever a clip has to be skipped.

Both the pack tool (`aasp-data pack`) and the training pipeline read audio through `load_clip`, so
a file is accepted or rejected for the same reason everywhere, and every rejection is counted under
one of `SKIP_REASONS` instead of crashing a worker or vanishing silently. Conversions that keep the
clip (resampling, downmixing, splitting long files) are not skips; they are counted under `HANDLED`.

Decoding follows `aasp_jax.audio.decode`: libsndfile through soundfile, channels averaged, explicit
resampling with the same soxr call. Unlike `decode.load_audio` it can read a window [start, end) of
a file by seeking, so a 10 s window of a 2-hour file decodes 10 s, not 2 hours.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import logging
import os
import stat
from typing import Mapping, NamedTuple

import librosa
import numpy as np
import soundfile as sf

from aasp_jax.audio import decode

_logger = logging.getLogger(__name__)

# Checks run in this order and the first that applies names the skip.
SKIP_REASONS = ('missing', 'empty', 'unreadable', 'non_finite', 'silent', 'too_short')

# Conversions that keep the clip. 'split_long' (a file cut into several records) and 'clipped'
# (samples beyond int16 full scale when a record is encoded) are counted by the pack tool.
HANDLED = ('resampled', 'downmixed', 'split_long', 'clipped')

# One 16-frame patch of the 25 ms / 10 ms fbank at 16 kHz: 400 + 15 * 160 = 2,960 samples (0.185 s).
DEFAULT_MIN_SAMPLES = 2960
# -100 dBFS; an int16 file whose samples move by even one step (3e-5) is louder than this.
DEFAULT_SILENCE_RMS = 1e-5

_ADVICE = {
  'missing': 'check the path (manifest paths are relative to the manifest folder) or drop it',
  'empty': 'the file holds no audio in the requested range; drop it or fix its start/end',
  'unreadable': 'the file cannot be opened (permissions, a symlink loop) or is not audio '
  'libsndfile can decode; fix it, re-encode it (FLAC or WAV) or drop it',
  'non_finite': 'the file holds NaN or Inf samples; re-export it from its source or drop it',
  'silent': 'the clip is digital silence; drop it, or lower silence_rms if it is just very quiet',
  'too_short': 'the clip is shorter than min_samples (by default one 16-frame patch); drop it, or '
  'lower min_samples',
}

# Rate pairs already announced at INFO level in this process; later clips log at DEBUG, so a data
# worker does not print one line per clip (the same policy as aasp_jax.audio.decode).
_announced_rates: set[tuple[int, int]] = set()


class ClipSkipped(Exception):
  """A clip that cannot be used, with the reason (one of SKIP_REASONS) and what went wrong.

  Attributes:
    reason: one of SKIP_REASONS.
    path: the file (or the name given to `decode_audio_bytes`).
    detail: what was found, e.g. the decoder's message or the measured RMS.
  """

  def __init__(self, reason: str, path: str, detail: str):
    if reason not in SKIP_REASONS:
      raise ValueError(f'unknown skip reason {reason!r}; valid reasons: {SKIP_REASONS}')
    self.reason = reason
    self.path = os.fspath(path)
    self.detail = detail
    super().__init__(reason, self.path, detail)

  def __str__(self) -> str:
    return f'{self.path}: skipped ({self.reason}): {self.detail}; {_ADVICE[self.reason]}'

  def __reduce__(self):
    # Worker processes send exceptions back to the parent; rebuild from the three fields.
    return (ClipSkipped, (self.reason, self.path, self.detail))


@dataclasses.dataclass
class ClipInfo:
  """What decoding found out about a clip.

  Attributes:
    orig_sample_rate: the file's rate in Hz.
    channels: the file's channel count (before averaging).
    num_samples: samples of the returned waveform, i.e. after resampling.
    resampled: the file's rate differed from the requested one.
    downmixed: the file had more than one channel.
  """

  orig_sample_rate: int
  channels: int
  num_samples: int
  resampled: bool
  downmixed: bool

  def handled(self) -> tuple[str, ...]:
    """The HANDLED tags that apply to this clip ('resampled', 'downmixed')."""
    return tuple(name for name in ('resampled', 'downmixed') if getattr(self, name))


class SourceInfo(NamedTuple):
  """A file's header, read without decoding the audio."""

  frames: int
  sample_rate: int
  channels: int


class SkipCounter:
  """Counts per reason; `as_dict` lists every reason, zeros included, so reports have fixed keys.

  Also counts HANDLED conversions: `SkipCounter(HANDLED)`.
  """

  def __init__(self, reasons: tuple[str, ...] = SKIP_REASONS):
    self._counts = dict.fromkeys(reasons, 0)

  def add(self, reason: str, count: int = 1) -> None:
    if reason not in self._counts:
      raise ValueError(f'unknown reason {reason!r}; valid reasons: {tuple(self._counts)}')
    self._counts[reason] += count

  def update(self, other: SkipCounter | Mapping[str, int]) -> None:
    """Adds the counts of another counter or of a {reason: count} mapping."""
    items = other.as_dict() if isinstance(other, SkipCounter) else other
    for reason, count in items.items():
      self.add(reason, int(count))

  def as_dict(self) -> dict[str, int]:
    return dict(self._counts)

  @property
  def total(self) -> int:
    return sum(self._counts.values())

  def __getitem__(self, reason: str) -> int:
    return self._counts[reason]

  def __repr__(self) -> str:
    return f'SkipCounter({self._counts})'


def probe_clip(path: str | os.PathLike) -> SourceInfo:
  """Reads a file's header only: frames, rate and channels.

  Raises:
    ClipSkipped: 'missing', 'empty' (0 bytes or 0 frames) or 'unreadable'.
  """
  path = os.fspath(path)
  _check_file(path)
  try:
    info = sf.info(path)
  except (sf.SoundFileError, RuntimeError, OSError, ValueError) as e:
    raise ClipSkipped('unreadable', path, _decoder_message(e)) from None
  if info.frames <= 0:
    raise ClipSkipped('empty', path, 'the file has a valid header but 0 audio frames')
  return SourceInfo(int(info.frames), int(info.samplerate), int(info.channels))


def load_clip(
  path: str | os.PathLike,
  sample_rate: int = 16000,
  start: float | None = None,
  end: float | None = None,
  *,
  min_samples: int = DEFAULT_MIN_SAMPLES,
  silence_rms: float = DEFAULT_SILENCE_RMS,
) -> tuple[np.ndarray, ClipInfo]:
  """Loads [start, end) seconds of `path` as a float32 mono waveform at `sample_rate`.

  Only the requested frames are decoded (soundfile seeks to `start`). Channels are averaged, and a
  file at another rate is resampled with soxr (logged once per rate pair). Samples of integer-PCM
  files lie in [-1, 1) (resampling can overshoot full scale slightly); float files are not rescaled.
  Packing quantises to int16 and counts clips that had to be clipped ('clipped' in HANDLED).

  Args:
    path: an audio file libsndfile can read.
    sample_rate: target rate in Hz.
    start: offset in seconds (None: the beginning).
    end: end in seconds, exclusive (None, or past the end of the file: the end of the file).
    min_samples: fewer samples than this after resampling is 'too_short'.
    silence_rms: an RMS (after removing the mean) below this is 'silent'; 0 disables the check.

  Returns:
    (float32 [S] waveform, ClipInfo).

  Raises:
    ClipSkipped: with one of SKIP_REASONS.
    ValueError: for a negative start or end <= start (a caller's error, not the file's).
  """
  path = os.fspath(path)
  _check_window(start, end)
  _check_file(path)
  try:
    with sf.SoundFile(path) as f:
      mono, info = _read_mono(f, path, start, end)
  except (sf.SoundFileError, RuntimeError, OSError, ValueError) as e:
    raise ClipSkipped('unreadable', path, _decoder_message(e)) from None
  return _finish(mono, info, path, sample_rate, min_samples, silence_rms)


def decode_audio_bytes(
  data: bytes,
  sample_rate: int = 16000,
  *,
  min_samples: int = DEFAULT_MIN_SAMPLES,
  silence_rms: float = DEFAULT_SILENCE_RMS,
  name: str = '<bytes>',
) -> tuple[np.ndarray, ClipInfo]:
  """`load_clip` for encoded audio (FLAC, WAV, OGG, ... bytes) held in memory.

  Args:
    data: the encoded file's bytes.
    sample_rate: target rate in Hz.
    min_samples: as in `load_clip`.
    silence_rms: as in `load_clip`.
    name: what errors call the clip (e.g. its id or origin).

  Raises:
    ClipSkipped: 'empty', 'unreadable', 'non_finite', 'silent' or 'too_short'.
  """
  if not data:
    raise ClipSkipped('empty', name, '0 bytes')
  try:
    with sf.SoundFile(io.BytesIO(data)) as f:
      mono, info = _read_mono(f, name, None, None)
  except (sf.SoundFileError, RuntimeError, OSError, ValueError) as e:
    raise ClipSkipped('unreadable', name, _decoder_message(e)) from None
  return _finish(mono, info, name, sample_rate, min_samples, silence_rms)


def validate_waveform(
  wave: np.ndarray,
  path: str | os.PathLike,
  *,
  min_samples: int = DEFAULT_MIN_SAMPLES,
  silence_rms: float = DEFAULT_SILENCE_RMS,
) -> None:
  """The 'non_finite', 'silent' and 'too_short' checks of a decoded mono waveform.

  Silence is measured as the RMS around the mean: a constant (DC) signal carries no sound, and the
  front end subtracts the waveform mean anyway.

  Raises:
    ClipSkipped: naming `path` and the first failing check, in SKIP_REASONS order.
  """
  path = os.fspath(path)
  finite = np.isfinite(wave)
  if not finite.all():
    bad = int(wave.size - np.count_nonzero(finite))
    first = int(np.argmin(finite))
    raise ClipSkipped(
      'non_finite', path, f'{bad} of {wave.size} samples are NaN or Inf (first at sample {first})'
    )
  if silence_rms > 0:
    rms = float(np.std(wave, dtype=np.float64)) if wave.size else 0.0
    if rms < silence_rms:
      raise ClipSkipped('silent', path, f'RMS {rms:.3g} is below silence_rms={silence_rms:g}')
  if wave.shape[0] < min_samples:
    raise ClipSkipped(
      'too_short', path, f'{wave.shape[0]} samples after resampling, fewer than {min_samples}'
    )


def resample(wave: np.ndarray, orig_rate: int, target_rate: int, name: str = '') -> np.ndarray:
  """Resamples a float32 mono waveform with the same soxr call as `aasp_jax.audio.decode`."""
  if orig_rate == target_rate:
    return wave
  pair = (orig_rate, target_rate)
  _logger.log(
    logging.DEBUG if pair in _announced_rates else logging.INFO,
    'resampling %s from %d Hz to %d Hz (%s)',
    name,
    orig_rate,
    target_rate,
    decode.RESAMPLE_TYPE,
  )
  _announced_rates.add(pair)
  out = librosa.resample(
    wave, orig_sr=orig_rate, target_sr=target_rate, res_type=decode.RESAMPLE_TYPE
  )
  return np.ascontiguousarray(out, dtype=np.float32)


def _check_window(start: float | None, end: float | None) -> None:
  if start is not None and not start >= 0:
    raise ValueError(f'start must be >= 0 seconds, got {start!r}')
  if end is not None and not end > (start or 0.0):
    raise ValueError(f'end must be > start, got start={start!r}, end={end!r}')


def _check_file(path: str) -> None:
  """'missing' and 'empty' are told apart from 'unreadable' before libsndfile is asked, and so are
  a broken link, a symlink loop and a permission problem (libsndfile says only 'System error.')."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    if os.path.islink(path):
      raise ClipSkipped('missing', path, f'broken symlink to {os.readlink(path)!r}') from None
    raise ClipSkipped('missing', path, 'no such file') from None
  except OSError as e:
    raise ClipSkipped('unreadable', path, _os_error(e)) from None
  if stat.S_ISDIR(st.st_mode):
    raise ClipSkipped('unreadable', path, 'is a directory, not an audio file')
  if st.st_size == 0:
    raise ClipSkipped('empty', path, '0 bytes')
  try:
    os.close(os.open(path, os.O_RDONLY))
  except OSError as e:
    raise ClipSkipped('unreadable', path, _os_error(e)) from None


def _os_error(e: OSError) -> str:
  if e.errno == errno.ELOOP:
    return 'symlink loop (too many levels of symbolic links)'
  if e.errno in (errno.EACCES, errno.EPERM):
    return 'permission denied'
  return f'{type(e).__name__}: {e.strerror or e}'


def _decoder_message(e: BaseException) -> str:
  return f'{type(e).__name__}: {e}'


def _read_mono(
  f: sf.SoundFile, name: str, start: float | None, end: float | None
) -> tuple[np.ndarray, SourceInfo]:
  """Decodes the window's frames of an open file and averages the channels (file rate, float32)."""
  rate, frames = int(f.samplerate), int(f.frames)
  info = SourceInfo(frames, rate, int(f.channels))
  if frames <= 0:
    raise ClipSkipped('empty', name, 'the file has a valid header but 0 audio frames')
  first = 0 if start is None else int(round(start * rate))
  stop = frames if end is None else min(frames, int(round(end * rate)))
  if first >= stop:
    raise ClipSkipped(
      'empty',
      name,
      f'window [{start}, {end}) s holds no frames; the file lasts {frames / rate:g} s',
    )
  if first:
    f.seek(first)
  audio_sc = f.read(stop - first, dtype='float32', always_2d=True)
  if audio_sc.shape[0] < stop - first:
    # A truncated file whose header promises more frames than the data holds.
    raise ClipSkipped(
      'unreadable',
      name,
      f'truncated: decoded {audio_sc.shape[0]} of the {stop - first} frames the header promises',
    )
  if audio_sc.shape[1] == 1:
    return audio_sc[:, 0], info
  return audio_sc.mean(axis=1, dtype=np.float32), info


def _finish(
  mono: np.ndarray,
  source: SourceInfo,
  name: str,
  sample_rate: int,
  min_samples: int,
  silence_rms: float,
) -> tuple[np.ndarray, ClipInfo]:
  # NaN/Inf are caught before resampling: soxr would smear one bad sample over its filter length.
  validate_waveform(mono, name, min_samples=0, silence_rms=0.0)
  wave = resample(mono, source.sample_rate, sample_rate, name)
  validate_waveform(wave, name, min_samples=min_samples, silence_rms=silence_rms)
  info = ClipInfo(
    orig_sample_rate=source.sample_rate,
    channels=source.channels,
    num_samples=int(wave.shape[0]),
    resampled=source.sample_rate != sample_rate,
    downmixed=source.channels > 1,
  )
  return np.ascontiguousarray(wave, dtype=np.float32), info
