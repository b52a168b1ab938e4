"""Input-pipeline throughput per worker process, for 10 s clips.

Paths, each measured in this one run on the same clips (median of repeats; one process with one
read thread = one single-core worker):
  (a) ArrayRecord -> decode -> crop            (waveforms for on-device features)
  (b) (a) + host log-mel                       (Kaldi fbank in numpy, padded and normalised)
  (c) the naive baseline: librosa.load + librosa.feature.melspectrogram per file
The source clips are real recordings (the committed CC0 fixtures, tiled to 10 s) stored as 44.1 kHz
FLAC, as datasets usually ship; the packs hold them resampled to 16 kHz.

  python benchmarks/input_pipeline.py [--clips 48] [--repeats 3]
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import soundfile as sf
from absl import flags

FIXTURES = os.path.join(os.path.dirname(__file__), '..', 'tests', 'fixtures', 'audio')


def make_source_clips(folder: str, n: int, seconds: float = 10.0, sr: int = 44100) -> list[str]:
  import librosa

  recordings = []
  for name in sorted(os.listdir(FIXTURES)):
    if name.endswith('.flac'):
      wave, rate = sf.read(os.path.join(FIXTURES, name), dtype='float32', always_2d=True)
      recordings.append(librosa.resample(wave.mean(1), orig_sr=rate, target_sr=sr))
  rng = np.random.default_rng(0)
  paths = []
  for i in range(n):
    base = recordings[i % len(recordings)]
    tiled = np.tile(base, int(np.ceil(seconds * sr / len(base))) + 1)
    offset = int(rng.integers(0, len(base)))
    clip = tiled[offset : offset + int(seconds * sr)] * rng.uniform(0.3, 0.9)
    path = os.path.join(folder, f'clip_{i:04d}.flac')
    sf.write(path, clip, sr, subtype='PCM_16')
    paths.append(path)
  return paths


def time_epochs(fn, repeats: int) -> float:
  fn()  # warm-up: imports, numba compilation, file cache
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--clips', type=int, default=48)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--threads', type=int, default=4, help='read threads for the second figure')
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()

  import librosa

  from aasp_jax.audio import presets
  from aasp_jax.data import pack, pipeline

  preset = presets.get_preset('eat_audiomae')
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, 'src')
    os.makedirs(src)
    paths = make_source_clips(src, args.clips)

    def naive():
      for p in paths:
        y, _ = librosa.load(p, sr=16000)
        mel = librosa.feature.melspectrogram(
          y=y, sr=16000, n_fft=512, win_length=400, hop_length=160, n_mels=128
        )
        librosa.power_to_db(mel)

    results['c'] = time_epochs(naive, args.repeats)

    for codec in ('flac', 'pcm16'):
      out = os.path.join(tmp, f'pack_{codec}')
      pack.pack(
        pack.PackConfig(source=src, out_dir=out, num_shards=4, codec=codec, workers=1),
        progress=False,
      )
      for features, key in (('waveform', 'a'), ('log_mel', 'b')):
        for threads in (1, args.threads):
          # 1 read thread: what a single-core worker process delivers. More threads overlap the
          # GIL-free decode work and grain's per-element hand-offs inside one worker.
          opts = pipeline.PipelineOptions(
            preset=preset,
            batch_size=8,
            num_epochs=1,
            features=features,
            drop_remainder=False,
            read_threads=threads,
          )

          def epoch(opts=opts, out=out):
            n = 0
            for batch in pipeline.make_dataset(out, opts, 0, 1):
              n += len(batch.get('num_samples', ()))
            assert n == args.clips, n

          results[f'{key}_{codec}_{threads}'] = time_epochs(epoch, args.repeats)

  rate = {k: args.clips / v for k, v in results.items()}
  t = args.threads
  print(
    f'{args.clips} clips of 10 s; one process = one worker; {os.cpu_count()} CPU cores; '
    f'median of {args.repeats} epochs'
  )
  print(f'{"path":57s} {"1 thread":>9s} {"x naive":>8s} {f"{t} threads":>10s} {"x naive":>8s}')
  for name, key in (
    ('(a) ArrayRecord(FLAC) -> decode -> crop', 'a_flac'),
    ('(a) ArrayRecord(PCM16) -> decode -> crop', 'a_pcm16'),
    ('(b) ArrayRecord(FLAC) -> decode -> crop -> host log-mel', 'b_flac'),
    ('(b) ArrayRecord(PCM16) -> decode -> crop -> host log-mel', 'b_pcm16'),
  ):
    r1, rt = rate[f'{key}_1'], rate[f'{key}_{t}']
    print(f'{name:57s} {r1:9.1f} {r1 / rate["c"]:8.1f} {rt:10.1f} {rt / rate["c"]:8.1f}')
  print(f'{"(c) librosa.load + melspectrogram (44.1 kHz FLAC)":57s} {rate["c"]:9.1f} {1.0:8.1f}')
  print(
    'targets (1 thread): (a) >= 200 clips/s: '
    f'FLAC {rate["a_flac_1"]:.0f}, PCM16 {rate["a_pcm16_1"]:.0f}; (b) >= 60: '
    f'FLAC {rate["b_flac_1"]:.0f}, PCM16 {rate["b_pcm16_1"]:.0f}; (a) >= 10x (c): '
    f'{rate["a_pcm16_1"] / rate["c"]:.1f}x (PCM16)'
  )


if __name__ == '__main__':
  main()
