"""The `aasp-embed` command: embeddings of a folder of audio or a manifest with a trained encoder.

  aasp-embed --checkpoint runs/quickstart --input data/sonicpi/audio --output sonicpi.npz
  aasp-embed --checkpoint runs/quickstart/checkpoints/300 --input clips.csv --output out.npz \
      --which student --pooling mean --layer average --hop_seconds 5.12 --timestamps

Writes OUT.npz with `clip_ids` [N] (str), `embeddings` [N, D] (float32 scene embeddings) and, with
--timestamps, `timestamp_embeddings` [N, T, D'] and `timestamps_ms` [N, T] (float32; clips with
fewer than T timestamps are padded with zeros and NaN times) and `num_timestamps` [N]. Next to it,
OUT.json summarises the run: the checkpoint and options, clips embedded, clips skipped per reason
and each skipped clip's id, reason and detail, and the throughput. Windowing, padding and pooling
are those of `aasp_jax.evaluate.embed`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

from aasp_jax.data import manifest
from aasp_jax.evaluate import embed, pretrained


def _layer(text: str):
  """'-1', '3', 'average' or '1,2,3' (the average of those blocks)."""
  if text == 'average':
    return text
  try:
    values = [int(v) for v in text.split(',')]
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"--layer {text!r}: give -1, a block index, 'average' or a comma-separated list of indices"
    ) from None
  return values[0] if len(values) == 1 else values


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='aasp-embed', description=__doc__.split('\n\n')[0])
  parser.add_argument(
    '--checkpoint', required=True, help='training workdir, its checkpoints/ folder or a step folder'
  )
  parser.add_argument('--input', required=True, help='folder of audio, or a .csv/.tsv/.jsonl file')
  parser.add_argument('--output', required=True, help='the .npz file to write (and a .json next)')
  parser.add_argument('--which', choices=pretrained.WHICH, default='teacher', help='which encoder')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: newest)')
  parser.add_argument('--pooling', choices=embed.POOLINGS, default='cls_mean', help='scene pooling')
  parser.add_argument(
    '--timestamp_pooling',
    choices=embed.TIMESTAMP_POOLINGS,
    default='concat',
    help='how the frequency patches of a time patch are pooled',
  )
  parser.add_argument(
    '--layer',
    type=_layer,
    default=-1,
    help="-1 (final output), a block index, 'average', or indices like 2,3 (default -1)",
  )
  parser.add_argument(
    '--hop_seconds', type=float, default=None, help='window hop for long clips (default: a window)'
  )
  parser.add_argument('--timestamps', action='store_true', help='also write timestamp embeddings')
  parser.add_argument('--batch_size', type=int, default=8, help='windows per forward pass')
  return parser


def _outputs(path: str) -> tuple[str, str]:
  base = path.removesuffix('.npz')
  return base + '.npz', base + '.json'


def main(argv: list[str] | None = None) -> int:
  """Runs `aasp-embed`; returns the exit status (0: ok, 1: bad input or no clip embedded)."""
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  npz_path, json_path = _outputs(args.output)
  try:
    model = pretrained.load_pretrained(args.checkpoint, which=args.which, step=args.step)
    embedder = embed.Embedder(
      model,
      pooling=args.pooling,
      timestamp_pooling=args.timestamp_pooling,
      layer=args.layer,
      hop_seconds=args.hop_seconds,
      batch_size=args.batch_size,
    )
    ignored: dict[str, int] = {}
    entries = manifest.read_entries(args.input, ignored)
    if not entries:
      raise ValueError(f'{args.input}: no audio files found.')
    start = time.perf_counter()
    result = embedder.embed_files(entries, timestamps=args.timestamps)
    seconds = time.perf_counter() - start
  except (ValueError, OSError) as e:
    print(f'aasp-embed: error: {e}', file=sys.stderr)
    return 1

  arrays = {'clip_ids': np.asarray(result.clip_ids, dtype=str), 'embeddings': result.embeddings}
  if args.timestamps:
    frames = list(zip(result.timestamp_embeddings, result.timestamps_ms))
    emb, times = embed.pad_timestamps(frames, embedder.timestamp_embedding_size)
    arrays.update(
      timestamp_embeddings=emb,
      timestamps_ms=times,
      num_timestamps=np.asarray([len(t) for t in result.timestamps_ms], np.int64),
    )
  os.makedirs(os.path.dirname(os.path.abspath(npz_path)), exist_ok=True)
  np.savez(npz_path, **arrays)
  embedded = len(result.clip_ids)
  clips_per_s = embedded / seconds if seconds > 0 else float('nan')
  summary = {
    'checkpoint': model.source,
    'which': model.which,
    'step': model.step,
    'input': os.path.abspath(args.input),
    'output': os.path.abspath(npz_path),
    'pooling': embedder.pooling,
    'timestamp_pooling': embedder.timestamp_pooling if args.timestamps else None,
    'layer': args.layer,
    'window_seconds': embedder.preset.target_length * embedder.preset.frame_shift_ms / 1000.0,
    'hop_seconds': embedder.hop_seconds,
    'scene_embedding_size': embedder.scene_embedding_size,
    'timestamp_embedding_size': embedder.timestamp_embedding_size if args.timestamps else None,
    'clips': len(entries),
    'embedded': embedded,
    'skipped': result.skipped,
    'skipped_clips': [
      {'clip_id': clip_id, 'path': path, 'reason': reason, 'detail': detail}
      for clip_id, path, reason, detail in result.skipped_clips
    ],
    'ignored_non_audio_files': ignored,
    'seconds': seconds,
    'clips_per_second': clips_per_s,
  }
  with open(json_path, 'w') as f:
    json.dump(summary, f, indent=1)
  skipped = sum(result.skipped.values())
  reasons = ', '.join(f'{r}: {n}' for r, n in result.skipped.items() if n)
  print(
    f'aasp-embed: embedded {embedded} of {len(entries)} clip(s) in {seconds:.1f} s '
    f'({clips_per_s:.2f} clips/s, compilation included); skipped {skipped}'
    + (f' ({reasons})' if skipped else '')
    + f'; wrote {npz_path} and {json_path}'
  )
  if not embedded:
    print(
      'aasp-embed: error: no clip could be embedded; see the skipped clips above.', file=sys.stderr
    )
    return 1
  return 0


def run() -> None:
  """Console-script entry point."""
  sys.exit(main())


if __name__ == '__main__':
  run()
