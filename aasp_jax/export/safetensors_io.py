"""Reads and writes safetensors files with numpy alone (no pickle, no torch, no JAX).

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian unsigned header
length N, then N bytes of UTF-8 JSON {name: {'dtype', 'shape', 'data_offsets': [begin, end]},
'__metadata__': {str: str}}, then the tensors' raw little-endian, C-ordered bytes; offsets are
relative to the first byte after the header. The writer pads the header with spaces to a multiple
of 8 bytes, as the reference implementation does, so the data stays aligned.

Reading never trusts the file: a header that reaches past the file, JSON that does not parse,
an unknown dtype, a byte range that does not match its shape, reaches past the data, overlaps
another or leaves bytes unaccounted for all raise `ExportFormatError` naming the file and the
problem, instead of returning garbage or failing later with an unrelated message.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np

# safetensors dtype code -> little-endian numpy dtype. BF16 and the F8 types have no numpy dtype;
# aasp-jax exports float32 only, so they are not needed here.
DTYPES = {
  'F64': np.dtype('<f8'),
  'F32': np.dtype('<f4'),
  'F16': np.dtype('<f2'),
  'I64': np.dtype('<i8'),
  'I32': np.dtype('<i4'),
  'I16': np.dtype('<i2'),
  'I8': np.dtype('i1'),
  'U64': np.dtype('<u8'),
  'U32': np.dtype('<u4'),
  'U16': np.dtype('<u2'),
  'U8': np.dtype('u1'),
  'BOOL': np.dtype('?'),
  'C64': np.dtype('<c8'),
}
_CODES = {dtype.newbyteorder('<'): code for code, dtype in DTYPES.items()}
METADATA_KEY = '__metadata__'
# The reference implementation refuses headers above 100 MB; a corrupted length field must not
# make us allocate gigabytes.
MAX_HEADER_BYTES = 100_000_000


class ExportFormatError(ValueError):
  """A file is not a valid safetensors file / aasp-jax export (the message names the file)."""


def _dtype_code(name: str, array: np.ndarray) -> str:
  code = _CODES.get(array.dtype.newbyteorder('<'))
  if code is None:
    raise ValueError(
      f'tensor {name!r} has dtype {array.dtype}, which safetensors_io cannot store; '
      f'use one of {sorted(str(d) for d in DTYPES.values())}.'
    )
  return code


def _check_metadata(metadata, where: str) -> dict[str, str]:
  if metadata is None:
    return {}
  if not isinstance(metadata, Mapping) or not all(
    isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
  ):
    raise ExportFormatError(f'{where}: __metadata__ must map strings to strings; got {metadata!r}.')
  return dict(metadata)


def serialize(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
  """(header bytes incl. the 8-byte length, [tensor bytes in file order]) for `save`."""
  header: dict = {}
  metadata = _check_metadata(metadata, 'save')
  if metadata:
    header[METADATA_KEY] = metadata
  chunks, offset = [], 0
  # Sorted names make the file a deterministic function of its contents.
  for name in sorted(tensors):
    if not isinstance(name, str) or not name or name == METADATA_KEY:
      raise ValueError(f'tensor names must be non-empty strings other than {METADATA_KEY!r}.')
    array = np.asarray(tensors[name])
    code = _dtype_code(name, array)
    data = np.ascontiguousarray(array, dtype=DTYPES[code]).tobytes(order='C')
    header[name] = {
      'dtype': code,
      'shape': [int(d) for d in array.shape],
      'data_offsets': [offset, offset + len(data)],
    }
    chunks.append(data)
    offset += len(data)
  text = json.dumps(header, separators=(',', ':'), ensure_ascii=False).encode('utf-8')
  text += b' ' * (-len(text) % 8)
  return len(text).to_bytes(8, 'little') + text, chunks


def save(
  path: str | os.PathLike,
  tensors: Mapping[str, np.ndarray],
  metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes `tensors` (name -> array) and string `metadata` to `path` as a safetensors file.

  The file is written next to `path` and renamed into place, so a crash never leaves a truncated
  file under the final name.

  Raises:
    ValueError: for a dtype safetensors_io cannot store, a bad name or non-string metadata.
  """
  head, chunks = serialize(tensors, metadata)
  path = os.fspath(path)
  partial = path + '.partial'
  with open(partial, 'wb') as f:
    f.write(head)
    f.writelines(chunks)
  os.replace(partial, path)


def _no_duplicates(pairs):
  seen = {}
  for key, value in pairs:
    if key in seen:
      raise ValueError(f'duplicate key {key!r}')
    seen[key] = value
  return seen


def _parse_header(raw: bytes, where: str) -> tuple[dict, dict[str, str]]:
  try:
    header = json.loads(raw.decode('utf-8'), object_pairs_hook=_no_duplicates)
  except (UnicodeDecodeError, ValueError) as e:
    raise ExportFormatError(f'{where}: the header is not valid UTF-8 JSON ({e}).') from None
  if not isinstance(header, dict):
    raise ExportFormatError(f'{where}: the header must be a JSON object, got {type(header)}.')
  metadata = _check_metadata(header.pop(METADATA_KEY, None), where)
  for name, entry in header.items():
    if not isinstance(entry, dict) or set(entry) != {'dtype', 'shape', 'data_offsets'}:
      raise ExportFormatError(
        f"{where}: tensor {name!r} must have exactly 'dtype', 'shape' and 'data_offsets'; "
        f'got {entry!r}.'
      )
    if entry['dtype'] not in DTYPES:
      raise ExportFormatError(
        f'{where}: tensor {name!r} has unknown dtype {entry["dtype"]!r}; known: {sorted(DTYPES)}.'
      )
    shape, offsets = entry['shape'], entry['data_offsets']
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
      raise ExportFormatError(f'{where}: tensor {name!r} has an invalid shape {shape!r}.')
    if (
      not isinstance(offsets, list)
      or len(offsets) != 2
      or not all(_is_count(o) for o in offsets)
      or offsets[0] > offsets[1]
    ):
      raise ExportFormatError(f'{where}: tensor {name!r} has invalid data_offsets {offsets!r}.')
    expected = math.prod(shape) * DTYPES[entry['dtype']].itemsize
    if offsets[1] - offsets[0] != expected:
      raise ExportFormatError(
        f'{where}: tensor {name!r} is {entry["dtype"]} {shape}, i.e. {expected} bytes, but its '
        f'data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes.'
      )
  return header, metadata


def _is_count(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_layout(header: dict, data_bytes: int, where: str) -> None:
  """Byte ranges must tile the data exactly: no overlap, no gap, nothing past the end."""
  end = 0
  previous = None
  for name, entry in sorted(header.items(), key=lambda kv: tuple(kv[1]['data_offsets'])):
    begin, stop = entry['data_offsets']
    if stop > data_bytes:
      raise ExportFormatError(
        f'{where}: tensor {name!r} needs data bytes [{begin}, {stop}) but the file holds only '
        f'{data_bytes} data bytes: the file is truncated.'
      )
    if begin < end:
      raise ExportFormatError(
        f'{where}: tensors {previous!r} and {name!r} overlap (bytes [{begin}, {end})).'
      )
    if begin > end:
      raise ExportFormatError(f'{where}: data bytes [{end}, {begin}) belong to no tensor.')
    end, previous = stop, name
  if end != data_bytes:
    raise ExportFormatError(
      f'{where}: the file holds {data_bytes} data bytes but its tensors cover only {end}: '
      'trailing bytes belong to no tensor.'
    )


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str], int]:
  """(tensor entries {name: {'dtype', 'shape', 'data_offsets'}}, metadata, data start) of `path`,
  validated against the file's size, without reading the tensors."""
  where = os.fspath(path)
  size = os.path.getsize(where)
  with open(where, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise ExportFormatError(
        f'{where}: {size} bytes is too short for a safetensors file (it starts with an 8-byte '
        'header length).'
      )
    length = int.from_bytes(head, 'little')
    if length > MAX_HEADER_BYTES or 8 + length > size:
      raise ExportFormatError(
        f'{where}: the header length field says {length} bytes but the file has {size} bytes '
        f'(header limit {MAX_HEADER_BYTES}): the file is truncated or not safetensors.'
      )
    header, metadata = _parse_header(f.read(length), where)
  _check_layout(header, size - 8 - length, where)
  return header, metadata, 8 + length


def load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors {name: writable numpy array}, metadata {str: str}) of the safetensors file `path`.

  Raises:
    ExportFormatError: naming the file and the problem, for a corrupted or truncated file.
  """
  where = os.fspath(path)
  header, metadata, start = read_header(where)
  with open(where, 'rb') as f:
    f.seek(start)
    # A bytearray keeps the arrays writable (np.frombuffer over bytes would be read-only).
    data = bytearray(f.read())
  tensors = {}
  for name, entry in header.items():
    begin, stop = entry['data_offsets']
    dtype = DTYPES[entry['dtype']]
    count = (stop - begin) // dtype.itemsize
    # frombuffer rejects an offset at the very end of the buffer, which an empty tensor may have.
    array = np.frombuffer(data, dtype, count, begin) if count else np.zeros(0, dtype)
    tensors[name] = array.reshape(entry['shape']).astype(dtype.newbyteorder('='), copy=False)
  return tensors, metadata


def read_json_object(path: str | os.PathLike, folder_holds: str) -> dict:
  """A JSON object file of an export folder (config.json, preprocessor_config.json), with errors
  naming the file; `folder_holds` says what a complete folder contains."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: missing (an aasp-jax export folder holds {folder_holds}).')
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except (UnicodeDecodeError, ValueError) as e:
    raise ExportFormatError(f'{path}: not valid JSON ({e}).') from None
  if not isinstance(value, dict):
    raise ExportFormatError(f'{path}: must hold a JSON object.')
  return value
