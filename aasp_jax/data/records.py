"""The ArrayRecord record format of packed clips: bytes in, bytes out, no pickle.

A record is

    magic b'AASP' | version (uint16 LE) | metadata length n (uint32 LE) | n bytes of JSON | payload

The JSON metadata holds `id`, `labels`, `sample_rate`, `num_samples`, `codec`, `source` (the file
the clip came from) and `start` (its offset in that file, seconds). The payload is the mono waveform
as 16-bit samples, either FLAC-compressed ('flac') or raw little-endian int16 ('pcm16'). Both are
lossless at 16 bits: decoding gives back exactly the int16 samples that were encoded.

JSON and a fixed header keep records readable from any language and safe to load from untrusted
storage, which pickle is not.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any, Sequence

import numpy as np
import soundfile as sf

MAGIC = b'AASP'
VERSION = 1
CODECS = ('flac', 'pcm16')
METADATA_KEYS = ('id', 'labels', 'sample_rate', 'num_samples', 'codec', 'source', 'start')

# Float to int16: x * 32768, rounded half to even, clipped to [-32768, 32767]; int16 / 32768 back.
# With 32768 (not 32767) every int16 value maps to a float and back to itself, so decoding and
# re-encoding a record is the identity; the price is that +1.0 clips to 32767 / 32768.
INT16_SCALE = 32768.0

_HEADER = struct.Struct('<4sHI')


def to_int16(waveform: np.ndarray) -> np.ndarray:
  """Quantises a float waveform in [-1, 1] to int16 (see INT16_SCALE); out-of-range values clip."""
  scaled = np.rint(np.asarray(waveform, dtype=np.float64) * INT16_SCALE)
  return np.clip(scaled, -32768, 32767).astype(np.int16)


def from_int16(pcm: np.ndarray) -> np.ndarray:
  """int16 samples as a float32 waveform in [-1, 1)."""
  return (np.asarray(pcm, dtype=np.float32) / np.float32(INT16_SCALE)).astype(np.float32)


def count_clipped(waveform: np.ndarray) -> int:
  """How many samples `to_int16` has to clip (beyond int16 full scale after rounding)."""
  scaled = np.rint(np.asarray(waveform, dtype=np.float64) * INT16_SCALE)
  return int(np.count_nonzero((scaled > 32767) | (scaled < -32768)))


def encode_record(
  clip_id: str,
  waveform_float32: np.ndarray,
  sample_rate: int,
  labels: Sequence[str] = (),
  codec: str = 'flac',
  source: str = '',
  start: float = 0.0,
) -> bytes:
  """Encodes one mono clip as a record (quantised to int16 with `to_int16`).

  Args:
    clip_id: unique id of the clip within its pack.
    waveform_float32: [S] mono waveform in [-1, 1], S >= 1; values beyond full scale are clipped.
    sample_rate: the waveform's rate in Hz.
    labels: zero or more label strings.
    codec: 'flac' (compressed) or 'pcm16' (raw int16, fastest to decode).
    source: the file the clip was read from.
    start: the clip's offset in `source`, in seconds.

  Raises:
    ValueError: for an unknown codec, a waveform that is not 1-D, empty or not finite.
  """
  if codec not in CODECS:
    raise ValueError(f'unknown codec {codec!r}; valid codecs: {CODECS}')
  wave = np.asarray(waveform_float32)
  if wave.ndim != 1 or wave.shape[0] == 0:
    raise ValueError(f'record {clip_id!r}: need a non-empty 1-D waveform, got shape {wave.shape}')
  if not np.isfinite(wave).all():
    raise ValueError(f'record {clip_id!r}: waveform has NaN or Inf samples')
  pcm = to_int16(wave)
  if codec == 'pcm16':
    payload = pcm.astype('<i2').tobytes()
  else:
    buf = io.BytesIO()
    sf.write(buf, pcm, int(sample_rate), format='FLAC', subtype='PCM_16')
    payload = buf.getvalue()
  metadata = {
    'id': str(clip_id),
    'labels': [str(label) for label in labels],
    'sample_rate': int(sample_rate),
    'num_samples': int(pcm.shape[0]),
    'codec': codec,
    'source': str(source),
    'start': float(start),
  }
  meta = json.dumps(metadata, sort_keys=True, separators=(',', ':'), allow_nan=False).encode()
  return _HEADER.pack(MAGIC, VERSION, len(meta)) + meta + payload


def decode_record_header(data: bytes) -> dict[str, Any]:
  """The metadata of a record, without decoding its audio (cheap, for listings).

  Raises:
    ValueError: naming what is wrong (not a record, truncated, newer version, bad JSON or fields).
  """
  metadata, _ = _split(data)
  return metadata


def decode_record(data: bytes) -> dict[str, Any]:
  """Decodes a record: its metadata plus `waveform`, float32 [num_samples] = int16 / 32768.

  Raises:
    ValueError: naming what is wrong, including a payload that does not match the metadata.
  """
  metadata, payload = _split(data)
  n = metadata['num_samples']
  where = f'record {metadata["id"]!r}'
  if metadata['codec'] == 'pcm16':
    if len(payload) != 2 * n:
      raise ValueError(f'{where}: pcm16 payload has {len(payload)} bytes, expected {2 * n}')
    pcm = np.frombuffer(payload, dtype='<i2')
  else:
    try:
      pcm, rate = sf.read(io.BytesIO(payload), dtype='int16', always_2d=True)
    except (sf.SoundFileError, RuntimeError) as e:
      raise ValueError(f'{where}: cannot decode its FLAC payload: {e}') from e
    if pcm.shape != (n, 1) or rate != metadata['sample_rate']:
      raise ValueError(
        f'{where}: FLAC payload holds {pcm.shape[0]} frames x {pcm.shape[1]} channel(s) at {rate} '
        f'Hz; metadata says {n} mono frames at {metadata["sample_rate"]} Hz'
      )
    pcm = pcm[:, 0]
  return {**metadata, 'waveform': from_int16(pcm)}


def _split(data: bytes) -> tuple[dict[str, Any], memoryview]:
  """Checks the header and metadata; returns the metadata and a view of the payload."""
  view = memoryview(data)
  if len(view) < _HEADER.size:
    raise ValueError(
      f'record truncated: {len(view)} bytes, shorter than the {_HEADER.size}-byte header'
    )
  magic, version, meta_len = _HEADER.unpack_from(view)
  if magic != MAGIC:
    raise ValueError(
      f'not an aasp-jax clip record: magic {bytes(magic)!r}, expected {MAGIC!r} '
      '(records are written by `aasp-data pack`)'
    )
  if version != VERSION:
    raise ValueError(
      f'record format version {version} is not supported (this reader knows {VERSION}); '
      're-pack the data or use the aasp-jax version that wrote it'
    )
  end = _HEADER.size + meta_len
  if end > len(view):
    raise ValueError(f'record truncated: metadata needs {end} bytes, the record has {len(view)}')
  try:
    metadata = json.loads(bytes(view[_HEADER.size : end]).decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'record has bad JSON metadata: {e}') from e
  _check_metadata(metadata)
  return metadata, view[end:]


def _check_metadata(metadata: Any) -> None:
  if not isinstance(metadata, dict):
    raise ValueError(f'record metadata must be a JSON object, got {type(metadata).__name__}')
  missing = [k for k in METADATA_KEYS if k not in metadata]
  if missing:
    raise ValueError(f'record metadata lacks {missing}; it has {sorted(metadata)}')
  rid = metadata['id']
  problems = []
  if not isinstance(rid, str):
    problems.append('id is not a string')
  if not isinstance(metadata['labels'], list) or not all(
    isinstance(x, str) for x in metadata['labels']
  ):
    problems.append('labels is not a list of strings')
  for key in ('sample_rate', 'num_samples'):
    value = metadata[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      problems.append(f'{key}={value!r} is not a positive integer')
  if metadata['codec'] not in CODECS:
    problems.append(f'codec={metadata["codec"]!r} is not one of {CODECS}')
  if not isinstance(metadata['source'], str):
    problems.append('source is not a string')
  if isinstance(metadata['start'], bool) or not isinstance(metadata['start'], (int, float)):
    problems.append(f'start={metadata["start"]!r} is not a number')
  if problems:
    raise ValueError(f'record {rid!r} has bad metadata: {"; ".join(problems)}')
