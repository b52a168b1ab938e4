"""Throughput of the embedding path (`aasp_jax.evaluate.embed`): clips/s for 10 s clips.

For each model, a randomly initialised encoder (`pretrained.random_encoder`; weights do not change
the cost) embeds N synthetic clips two ways: from arrays (`Embedder.scene_embeddings`: windowing,
device front end, encoder, pooling) and from FLAC files (`Embedder.embed_files`: decoding and
validation added). Compilation is done before timing and reported separately. Default models:
  tiny: configs/quickstart.py (width 128, depth 4, 256-frame windows: 4 windows per 10 s clip)
  B:    configs/pretrain_base.py (ViT-B/16 with AaPE, 1024-frame windows: 1 window per 10 s clip)
Both run in float32 here (`--dtype`): bfloat16 matmuls are slower than float32 on most CPUs.

  python benchmarks/embed_throughput.py                       # tiny (32 clips) and B (4 clips)
  python benchmarks/embed_throughput.py --models tiny --clips 64 --batch_size 16 --timestamps
"""

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import soundfile as sf

from aasp_jax import configuration
from aasp_jax.data import manifest
from aasp_jax.evaluate import embed, pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
  'tiny': os.path.join(REPO, 'configs', 'quickstart.py'),
  'B': os.path.join(REPO, 'configs', 'pretrain_base.py'),
}
DEFAULT_CLIPS = {'tiny': 32, 'B': 4}


def synthetic_clips(count: int, seconds: float, sample_rate: int, seed: int = 0) -> np.ndarray:
  """[count, samples] float32: a few amplitude-modulated tones in noise, different per clip."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  out = np.empty((count, t.size), np.float32)
  for i in range(count):
    freqs = rng.uniform(100, 4000, size=3)
    rate = rng.uniform(0.5, 8.0)
    tones = np.sin(2 * np.pi * freqs[:, None] * t).sum(axis=0) * (
      0.6 + 0.4 * np.sin(2 * np.pi * rate * t)
    )
    out[i] = 0.1 * tones + 0.01 * rng.standard_normal(t.size)
  return out


def timed(fn) -> tuple[float, object]:
  start = time.perf_counter()
  result = fn()
  return time.perf_counter() - start, result


def run_model(name: str, args) -> None:
  cfg = configuration.load_config(MODELS[name], [f'model.dtype={args.dtype}'])
  model = pretrained.random_encoder(cfg, seed=0)
  embedder = embed.Embedder(model, batch_size=args.batch_size, pooling='cls_mean')
  waves = synthetic_clips(args.clips or DEFAULT_CLIPS[name], args.seconds, embedder.sample_rate)
  windows = len(embedder.window_starts(waves.shape[1]))
  m = cfg.model
  print(
    f'\n[{name}] {os.path.relpath(MODELS[name], REPO)}: width {m.width}, depth {m.depth}, stem '
    f'{m.stem}, dtype {args.dtype}; window {embedder.preset.target_length} frames, {windows} '
    f'window(s) per {args.seconds:g} s clip; batch {args.batch_size} windows; {len(waves)} clips'
  )

  def scene():
    return embedder.scene_embeddings(waves)

  compile_s, _ = timed(lambda: embedder.scene_embeddings(waves[:1]))
  seconds, out = timed(scene)
  print(f'  compile + first batch: {compile_s:.1f} s')
  print(
    f'  arrays -> scene embeddings {out.shape}: {len(waves) / seconds:.2f} clips/s '
    f'({len(waves) * windows / seconds:.2f} windows/s, {seconds:.1f} s)'
  )
  if args.timestamps:
    embedder.timestamp_embeddings(waves[:1])  # compile the timestamp program
    seconds, (emb, _) = timed(lambda: embedder.timestamp_embeddings(waves))
    print(f'  arrays -> timestamp embeddings {emb.shape}: {len(waves) / seconds:.2f} clips/s')

  with tempfile.TemporaryDirectory() as folder:
    for i, wave in enumerate(waves):
      sf.write(os.path.join(folder, f'clip{i:04d}.flac'), wave, embedder.sample_rate)
    entries = manifest.scan_folder(folder)
    seconds, result = timed(lambda: embedder.embed_files(entries))
  assert len(result.clip_ids) == len(waves), result.skipped
  print(f'  FLAC files -> scene embeddings (decode included): {len(waves) / seconds:.2f} clips/s')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='tiny,B', help=f'comma-separated, from {list(MODELS)}')
  parser.add_argument('--clips', type=int, default=None, help='clips per model (default 32 / 4)')
  parser.add_argument('--seconds', type=float, default=10.0, help='clip duration')
  parser.add_argument('--batch_size', type=int, default=8, help='windows per forward pass')
  parser.add_argument('--dtype', default='float32', help='model.dtype override')
  parser.add_argument('--timestamps', action='store_true', help='also time timestamp embeddings')
  args = parser.parse_args()
  print(f'devices: {jax.devices()}; host CPUs: {os.cpu_count()}')
  for name in args.models.split(','):
    run_model(name, args)


if __name__ == '__main__':
  main()
