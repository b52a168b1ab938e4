"""Packs a folder of real speech with both codecs and checks that reading it back is lossless.

  python benchmarks/pack_roundtrip_asterisk.py [FOLDER] [--workers 2] [--shards 8]

FOLDER defaults to ../shared/data/asterisk (1,075 Asterisk voice prompts, 16 kHz mono FLAC). For
each codec it packs the folder with `aasp-data pack`'s code, reads every record back through
grain's ArrayRecordDataSource, and compares it with the int16-quantised output of
`clips.load_clip` on the source window. It prints packed / skipped counts, the pack's size and
speed, and the largest round-trip error (0 for a lossless pack).
"""

import argparse
import os
import sys
import tempfile
import time

import grain
import numpy as np

from aasp_jax.data import clips
from aasp_jax.data import pack
from aasp_jax.data import records


def _round_trip(folder: str, out_dir: str, codec: str, workers: int, shards: int) -> None:
  config = pack.PackConfig(folder, out_dir, num_shards=shards, workers=workers, codec=codec)
  report = pack.pack(config, progress=sys.stderr.isatty())
  print(f'--- codec={codec}')
  print(pack.format_summary(report))
  source = grain.sources.ArrayRecordDataSource(pack.list_shards(out_dir))
  t0 = time.perf_counter()
  decoded = [records.decode_record(source[i]) for i in range(len(source))]
  read_s = time.perf_counter() - t0
  max_err_int16, max_err_float, max_err_vs_float = 0, 0.0, 0.0
  for rec in decoded:
    end = rec['start'] + rec['num_samples'] / rec['sample_rate']
    start = rec['start'] or None
    wave, _ = clips.load_clip(rec['source'], rec['sample_rate'], start, end, min_samples=0)
    expected = records.to_int16(wave)
    got = records.to_int16(rec['waveform'])
    max_err_int16 = max(max_err_int16, int(np.abs(expected.astype(np.int32) - got).max()))
    max_err_float = max(
      max_err_float, float(np.abs(records.from_int16(expected) - rec['waveform']).max())
    )
    # Against the unquantised decode: bounded by half an int16 step (1.5e-5) for in-range audio.
    max_err_vs_float = max(max_err_vs_float, float(np.abs(wave - rec['waveform']).max()))
  size_mb = report['bytes'] / 2**20
  kb_per_s = report['bytes'] / max(report['seconds_of_audio'], 1e-9) / 1e3
  clips_per_s = report['entries_in'] / report['wall_seconds']
  print(
    f'records {len(decoded)}; {size_mb:.1f} MiB ({kb_per_s:.1f} kB per second of audio); '
    f'packed at {clips_per_s:.1f} clips/s with {workers} workers; '
    f'read + decoded at {len(decoded) / read_s:.0f} records/s'
  )
  print(
    f'max |round-trip error|: {max_err_int16} int16 steps, {max_err_float:.3g} as float '
    f'(vs the unquantised decode: {max_err_vs_float:.3g})'
  )


def main() -> None:
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
    'folder', nargs='?', default=os.path.join(repo, '..', 'shared', 'data', 'asterisk')
  )
  parser.add_argument('--workers', type=int, default=os.cpu_count() or 1)
  parser.add_argument('--shards', type=int, default=8)
  args = parser.parse_args()
  folder = os.path.normpath(args.folder)
  if not os.path.isdir(folder):
    sys.exit(f'{folder} is not a folder; pass the asterisk folder (or any audio folder) as FOLDER')
  with tempfile.TemporaryDirectory() as tmp:
    for codec in records.CODECS:
      _round_trip(folder, os.path.join(tmp, codec), codec, args.workers, args.shards)


if __name__ == '__main__':
  main()
