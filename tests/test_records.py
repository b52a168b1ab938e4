"""Tests of the clip record format: lossless 16-bit round trips, errors that say what is wrong."""

import json
import struct

import numpy as np
import pytest

import audio_factory
from aasp_jax.data import records


def _wave(seconds=0.5, rate=16000, seed=0):
  # Includes full-scale values, the int16 extremes and exact zeros.
  wave = audio_factory.noise(seconds, rate, amplitude=0.3, seed=seed)
  wave[:4] = [1.0, -1.0, 0.0, 32767 / 32768]
  return wave


@pytest.mark.parametrize('codec', records.CODECS)
def test_round_trip_is_exact_at_16_bits(codec):
  wave = _wave()
  data = records.encode_record(
    'dir/a.flac#1',
    wave,
    16000,
    labels=('en', 'speech'),
    codec=codec,
    source='/x/a.flac',
    start=240.5,
  )
  rec = records.decode_record(data)
  assert rec['waveform'].dtype == np.float32
  np.testing.assert_array_equal(rec['waveform'], records.from_int16(records.to_int16(wave)))
  assert {k: v for k, v in rec.items() if k != 'waveform'} == {
    'id': 'dir/a.flac#1',
    'labels': ['en', 'speech'],
    'sample_rate': 16000,
    'num_samples': wave.shape[0],
    'codec': codec,
    'source': '/x/a.flac',
    'start': 240.5,
  }
  assert records.decode_record_header(data) == {k: v for k, v in rec.items() if k != 'waveform'}
  # Decoding then re-encoding is the identity, so re-packing a pack loses nothing.
  again = records.encode_record(
    rec['id'], rec['waveform'], 16000, rec['labels'], codec, rec['source'], rec['start']
  )
  assert again == data


def test_flac_is_smaller_and_pcm_is_raw():
  wave = audio_factory.sine(440.0, 1.0, 16000)
  flac = records.encode_record('a', wave, 16000, codec='flac')
  pcm = records.encode_record('a', wave, 16000, codec='pcm16')
  assert len(flac) < len(pcm) // 2
  header = records.decode_record_header(pcm)
  assert len(pcm) > 2 * header['num_samples'] and pcm.endswith(records.to_int16(wave).tobytes())


def test_quantisation_rounds_and_clips():
  wave = np.array([0.0, 0.4 / 32768, 0.6 / 32768, -0.6 / 32768, 1.0, 1.5, -1.0, -1.5], np.float32)
  np.testing.assert_array_equal(records.to_int16(wave), [0, 0, 1, -1, 32767, 32767, -32768, -32768])
  assert records.count_clipped(wave) == 3  # 1.0 and 1.5 above 32767, -1.5 below -32768
  pcm = np.arange(-32768, 32768, dtype=np.int16)
  np.testing.assert_array_equal(records.to_int16(records.from_int16(pcm)), pcm)


def test_unicode_ids_and_labels():
  data = records.encode_record('café/ü.wav', _wave(), 8000, labels=('Straße', '音楽'))
  rec = records.decode_record_header(data)
  assert (
    rec['id'] == 'café/ü.wav' and rec['labels'] == ['Straße', '音楽'] and rec['sample_rate'] == 8000
  )


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(codec='mp3'), 'unknown codec'),
    (dict(waveform_float32=np.zeros((2, 10), np.float32)), 'non-empty 1-D'),
    (dict(waveform_float32=np.zeros(0, np.float32)), 'non-empty 1-D'),
    (dict(waveform_float32=np.array([0.0, np.nan], np.float32)), 'NaN or Inf'),
  ],
)
def test_encode_rejects_bad_input(kwargs, match):
  args = dict(clip_id='a', waveform_float32=_wave(), sample_rate=16000) | kwargs
  with pytest.raises(ValueError, match=match):
    records.encode_record(**args)


def _with_metadata(meta: dict, payload: bytes = b'') -> bytes:
  blob = json.dumps(meta).encode()
  return struct.pack('<4sHI', b'AASP', 1, len(blob)) + blob + payload


@pytest.mark.parametrize('codec', records.CODECS)
def test_decode_errors_say_what_is_wrong(codec):
  good = records.encode_record('clip-7', _wave(), 16000, codec=codec)
  meta = records.decode_record_header(good)
  cases = [
    (b'AAS', 'shorter than the 10-byte header'),
    (b'RIFF' + good[4:], "magic b'RIFF'"),
    (good[:4] + struct.pack('<H', 2) + good[6:], 'version 2 is not supported'),
    (good[:20], 'record truncated: metadata needs'),
    (struct.pack('<4sHI', b'AASP', 1, 5) + b'{"id"', 'bad JSON metadata'),
    (_with_metadata({k: v for k, v in meta.items() if k != 'codec'}), r"lacks \['codec'\]"),
    (_with_metadata(meta | {'num_samples': -3, 'labels': 'x'}), 'num_samples=-3'),
    (_with_metadata(meta | {'codec': 'ogg'}), "codec='ogg'"),
  ]
  for data, match in cases:
    with pytest.raises(ValueError, match=match):
      records.decode_record(data)
  # A damaged payload is caught when the audio is decoded; the header alone still reads.
  damaged = good[:-100]
  assert records.decode_record_header(damaged)['id'] == 'clip-7'
  with pytest.raises(ValueError, match="record 'clip-7'"):
    records.decode_record(damaged)


def test_flac_payload_must_match_its_metadata():
  good = records.encode_record('a', _wave(rate=16000), 16000, codec='flac')
  meta = records.decode_record_header(good)
  (meta_len,) = struct.unpack_from('<I', good, 6)
  payload = good[10 + meta_len :]
  assert records.decode_record(_with_metadata(meta, bytes(payload)))['id'] == 'a'
  with pytest.raises(ValueError, match='metadata says'):
    records.decode_record(_with_metadata(meta | {'sample_rate': 8000}, bytes(payload)))
