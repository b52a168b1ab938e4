"""The `aasp-data` command: `pack` audio into ArrayRecord shards, or measure log-mel `stats`.

  aasp-data pack SOURCE OUT_DIR --shards 64 --workers 16 --codec flac
  aasp-data stats SOURCE --num_clips 2000 --out stats.json

SOURCE is a folder of audio (scanned recursively, symlinked folders included) or a CSV / JSON Lines
manifest (relative paths resolve against the manifest's folder); `stats` also takes what training
takes: a folder written by `pack`, a shard glob, or a comma-separated list. An interrupted `pack`
resumes when the same command is run again; a pack that holds no clip at all exits with status 1,
naming the skip reasons.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from aasp_jax.data import clips
from aasp_jax.data import pack as pack_lib
from aasp_jax.data import stats as stats_lib


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='aasp-data', description=__doc__.split('\n\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)

  p = sub.add_parser('pack', help='decode audio into ArrayRecord shards of clip records')
  p.add_argument('source', help='folder of audio files, or a .csv/.tsv/.jsonl manifest')
  p.add_argument('out_dir', help='output folder (new, empty, or a pack to resume)')
  p.add_argument('--shards', type=int, required=True, help='number of shards')
  p.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='decoding processes')
  p.add_argument('--codec', choices=('flac', 'pcm16'), default='flac', help='record payload codec')
  p.add_argument('--sample_rate', type=int, default=16000, help='rate of the packed clips, Hz')
  p.add_argument(
    '--max_seconds',
    type=float,
    default=120.0,
    help='split longer files into pieces of at most this',
  )
  p.add_argument(
    '--strict', action='store_true', help='fail on the first clip that would be skipped'
  )
  p.add_argument(
    '--min_samples',
    type=int,
    default=clips.DEFAULT_MIN_SAMPLES,
    help='skip clips shorter than this after resampling (default: one 16-frame patch)',
  )
  p.add_argument(
    '--silence_rms', type=float, default=clips.DEFAULT_SILENCE_RMS, help='skip clips below this RMS'
  )
  p.add_argument('--no_progress', action='store_true', help='no progress bar')

  s = sub.add_parser('stats', help='mean and std of the raw log-mel, for the front-end preset')
  s.add_argument('source', help='folder of audio, a manifest, a pack folder or a shard glob')
  s.add_argument('--num_clips', type=int, default=1000, help='clips to use, drawn at random')
  s.add_argument('--preset', default='eat_audiomae', help='front-end preset name')
  s.add_argument('--seed', type=int, default=0, help='seed of the random choice of clips')
  s.add_argument(
    '--max_seconds', type=float, default=120.0, help='read at most this much of each audio file'
  )
  s.add_argument('--out', help='write the statistics to this JSON file')
  s.add_argument('--no_progress', action='store_true', help='no progress bar')
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs `aasp-data`; returns the exit status (0 ok, 1 failed, 130 interrupted)."""
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  try:
    if args.command == 'pack':
      config = pack_lib.PackConfig(
        source=args.source,
        out_dir=args.out_dir,
        num_shards=args.shards,
        workers=args.workers,
        codec=args.codec,
        sample_rate=args.sample_rate,
        max_seconds=args.max_seconds,
        strict=args.strict,
        min_samples=args.min_samples,
        silence_rms=args.silence_rms,
      )
      report = pack_lib.pack(config, progress=not args.no_progress)
      print(pack_lib.format_summary(report))
    else:
      result = stats_lib.compute_stats(
        args.source,
        num_clips=args.num_clips,
        preset=args.preset,
        seed=args.seed,
        max_seconds=args.max_seconds,
        progress=not args.no_progress,
      )
      if args.out:
        stats_lib.write_stats(result, args.out)
      print(json.dumps(result, indent=1))
      print(stats_lib.override_flags(result))
  except KeyboardInterrupt:
    if args.command == 'pack':
      print('aasp-data: interrupted; run the same command again to resume', file=sys.stderr)
    return 130
  except (clips.ClipSkipped, pack_lib.PackError, ValueError, OSError) as e:
    print(f'aasp-data {args.command}: error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
