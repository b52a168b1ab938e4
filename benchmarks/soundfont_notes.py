"""Unlabelled instrument notes for pre-training, rendered from two freely licensed General MIDI
SoundFonts that are not the probe task's: in-domain audio for the GM instrument-family probe
without its clips.

  python benchmarks/soundfont_notes.py [--out benchmarks/results/learning/soundfont_notes]

Sources (Debian bookworm main, fetched with `apt-get download`, sha256 checked):
  * timgm6mb-soundfont 1.3-5, TimGM6mb.sf2: Tim Brechbill / David Bolton, GPL-2 ("I created some of
    the samples myself and all others are either public domain or fall under the terms of the GNU
    General Public License");
  * csound-soundfont 1:6.18.1+dfsg-1, sf_GMbank.sf2: public domain (its licence field).
Each package's copyright file is copied next to the audio. Nothing here is shipped in the
repository: the notes are a benchmark input, rebuilt by this script.

Rendering (deterministic): for every bank-0 preset and each key of KEYS, the first zone (lowest
sample id) of the preset's instruments whose key range holds the key plays its sample, pitch-shifted
by resampling (root key = the sample's original pitch), its loop repeated to NOTE_SECONDS, a 30 ms
fade-out, 16 kHz, 16-bit FLAC. Bank-128 (drum) samples are played once as stored. A (sample, key)
pair is rendered once whichever presets share it. Right channels of stereo pairs and ROM samples are
skipped (as in data/gm_instruments/build.py, whose SF2 parser this reuses).

Overlap with the probe: FluidR3 (the probe's SoundFont) and TimGM6mb both contain public-domain
samples. Every source sample is compared with every probe clip (data/gm_instruments/audio, both at
16 kHz): a normalised cross-correlation (either sign) above OVERLAP_CORRELATION at any lag within +-LAG samples of
their first OVERLAP_SECONDS marks it as a duplicate, and none of its notes is written. The count is
printed and recorded in summary.json.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'data', 'gm_instruments'))
sys.path.insert(0, REPO)

import build as gm  # noqa: E402  (data/gm_instruments/build.py: the SF2 parser)

SOUNDFONTS = (
  # name, package, version, sha256 of the .deb, sf2 path in the .deb, copyright path in the .deb
  (
    'timgm6mb',
    'timgm6mb-soundfont',
    '1.3-5',
    '034abdfb296d9353433513dad5dbdcab46425ee6008fc02fe7039b46e75edc54',
    'usr/share/sounds/sf2/TimGM6mb.sf2',
    'usr/share/doc/timgm6mb-soundfont/copyright',
  ),
  (
    'csound_gmbank',
    'csound-soundfont',
    '1:6.18.1+dfsg-1',
    '0d05bec0cff2486f4537dd0236fece99f3565b62959717f82e975be8e0cf1393',
    'usr/share/sounds/sf2/sf_GMbank.sf2',
    'usr/share/doc/csound-soundfont/copyright',
  ),
)
KEYS = (36, 43, 48, 55, 60, 67, 72, 79, 84)
NOTE_SECONDS = 1.5
FADE_SECONDS = 0.03
SAMPLE_RATE = gm.SAMPLE_RATE
OVERLAP_SECONDS = 0.5
OVERLAP_CORRELATION = 0.9
LAG = 64


def fetch(name: str, package: str, version: str, sha256: str, into: str) -> tuple[str, str]:
  """Downloads the package, checks its sha256, extracts it; returns (folder, sha256)."""
  subprocess.run(
    ['apt-get', 'download', f'{package}={version}'],
    check=True,
    cwd=into,
    stdout=subprocess.DEVNULL,
    timeout=300,
  )
  (deb,) = glob.glob(os.path.join(into, f'{package}_*.deb'))
  digest = gm.sha256_of(deb)
  if digest != sha256:
    raise ValueError(f'{deb}: sha256 {digest}, expected {sha256}')
  folder = os.path.join(into, name)
  subprocess.run(['dpkg-deb', '-x', deb, folder], check=True, timeout=300)
  return folder, digest


def read_frames(f, sf2, s, frames: int) -> np.ndarray:
  """`frames` frames of sample s from its start, its loop repeated (or zero-padded if it has none)."""
  f.seek(sf2.smpl_offset + 2 * s.start)
  data = np.frombuffer(f.read(2 * (s.end - s.start)), dtype='<i2').astype(np.float32) / 32768.0
  loop_ok = s.start <= s.loop_start < s.loop_end <= s.end and s.loop_end - s.loop_start >= 2
  if len(data) < frames and loop_ok:
    head = data[: s.loop_end - s.start]
    loop = data[s.loop_start - s.start : s.loop_end - s.start]
    data = np.concatenate([head] + [loop] * (-(-(frames - len(head)) // len(loop))))
  return data[:frames]


def render(f, sf2, s, key: int | None) -> np.ndarray:
  """The sample played at `key` (None: as stored) for NOTE_SECONDS at 16 kHz, faded out."""
  import soxr

  root = s.original_pitch if 0 <= s.original_pitch <= 127 else 60
  ratio = 1.0 if key is None else 2.0 ** ((key - root) / 12.0)
  rate = s.sample_rate * ratio  # playing the frames at this rate sounds the key
  wave = read_frames(f, sf2, s, int(np.ceil(NOTE_SECONDS * rate)) + 1)
  out = soxr.resample(wave, rate, SAMPLE_RATE, quality='HQ')[: int(NOTE_SECONDS * SAMPLE_RATE)]
  fade = min(len(out), int(FADE_SECONDS * SAMPLE_RATE))
  out[len(out) - fade :] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
  peak = float(np.max(np.abs(out))) if len(out) else 0.0
  return out / peak * 0.9 if peak > 0.9 else out


def _unit(x: np.ndarray, n: int) -> np.ndarray:
  x = np.pad(x[:n], (0, max(0, n - len(x)))).astype(np.float64)
  x -= x.mean()
  norm = np.linalg.norm(x)
  return x / norm if norm > 0 else x


def probe_clips() -> list[tuple[str, np.ndarray]]:
  import soundfile as sf

  n = int(OVERLAP_SECONDS * SAMPLE_RATE)
  out = []
  with open(os.path.join(REPO, 'data', 'gm_instruments', 'task.csv')) as f:
    for row in csv.DictReader(f):
      wave, rate = sf.read(
        os.path.join(REPO, 'data', 'gm_instruments', row['path']), dtype='float32'
      )
      assert rate == SAMPLE_RATE, row['path']
      out.append((row['path'], _unit(wave, n)))
  return out


def max_correlation(x: np.ndarray, refs: np.ndarray) -> np.ndarray:
  """Max over lags |l| <= LAG of the |normalised cross-correlation| of x with each row of refs."""
  size = 1 << int(np.ceil(np.log2(2 * refs.shape[1])))
  fx = np.fft.rfft(x, size)
  corr = np.fft.irfft(np.fft.rfft(refs, size, axis=1) * np.conj(fx)[None], size, axis=1)
  lags = np.concatenate([corr[:, : LAG + 1], corr[:, -LAG:]], axis=1)
  return np.max(np.abs(lags), axis=1)  # a polarity-inverted copy is a copy too


def playable(sf2, sid: int) -> bool:
  s = sf2.samples[sid]
  return not (s.sample_type & gm.SAMPLE_ROM or s.sample_type & gm.SAMPLE_RIGHT or s.end <= s.start)


def notes_of(sf2) -> list[tuple[int, int | None]]:
  """(sample id, key or None for drums), deduplicated, in a fixed order."""
  notes = []
  for preset in sorted(sf2.presets, key=lambda p: (p.bank, p.program, p.name)):
    zones = [z for z in gm.preset_samples(sf2, preset) if playable(sf2, z[2])]
    if preset.bank == 128:
      notes += [(sid, None) for _, _, sid in zones]
    elif preset.bank == 0:
      for key in KEYS:
        hits = sorted(sid for lo, hi, sid in zones if lo <= key <= hi)
        if hits:
          notes.append((hits[0], key))
  return list(dict.fromkeys(notes))


def build(out: str) -> dict:
  import soxr

  audio = os.path.join(out, 'audio')
  os.makedirs(audio, exist_ok=True)
  probes = probe_clips()
  names = [p for p, _ in probes]
  refs = np.stack([r for _, r in probes])
  n = int(OVERLAP_SECONDS * SAMPLE_RATE)
  summary = {'keys': list(KEYS), 'note_seconds': NOTE_SECONDS, 'soundfonts': {}}
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, package, version, sha, sf2_in, copyright_in in SOUNDFONTS:
      folder, digest = fetch(name, package, version, sha, tmp)
      sf2 = gm.parse_sf2(os.path.join(folder, sf2_in))
      with (
        open(os.path.join(folder, copyright_in), encoding='utf-8') as src,
        open(os.path.join(out, f'LICENSE.{name}'), 'w', encoding='utf-8') as dst,
      ):
        dst.write(src.read())
      notes = notes_of(sf2)
      sources = sorted({sid for sid, _ in notes})
      duplicates = {}  # sample id -> the probe clip it matches
      with open(os.path.join(folder, sf2_in), 'rb') as f:
        for sid in sources:
          s = sf2.samples[sid]
          stored = read_frames(f, sf2, s, int(OVERLAP_SECONDS * s.sample_rate) + 1)
          if s.sample_rate != SAMPLE_RATE:
            stored = soxr.resample(stored, s.sample_rate, SAMPLE_RATE, quality='HQ')
          corr = max_correlation(_unit(stored, n), refs)
          if corr.max() > OVERLAP_CORRELATION:
            duplicates[sid] = names[int(corr.argmax())]
        written = 0
        for sid, key in notes:
          if sid in duplicates:
            continue
          s = sf2.samples[sid]
          file = f'{name}__{sid:04d}_{gm.slug(s.name)}__{"drum" if key is None else key}.flac'
          gm.write_clip(render(f, sf2, s, key), SAMPLE_RATE, os.path.join(audio, file))
          rows.append(f'audio/{file}')
          written += 1
      summary['soundfonts'][name] = {
        'package': f'{package} {version}',
        'deb_sha256': digest,
        'notes': written,
        'source_samples': len(sources),
        'samples_matching_a_probe_clip': {
          f'{sid}:{sf2.samples[sid].name}': clip for sid, clip in duplicates.items()
        },
      }
      print(
        f'{name}: {written} notes from {len(sources)} samples; '
        f'{len(duplicates)} samples match a probe clip and were left out',
        flush=True,
      )
  with open(os.path.join(out, 'manifest.csv'), 'w', newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(['path'])
    writer.writerows([r] for r in rows)
  summary['clips'] = len(rows)
  summary['seconds'] = len(rows) * NOTE_SECONDS
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  print(f'{len(rows)} notes, {len(rows) * NOTE_SECONDS / 60:.1f} min -> {out}/manifest.csv')
  return summary


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
    '--out', default=os.path.join(REPO, 'benchmarks', 'results', 'learning', 'soundfont_notes')
  )
  build(parser.parse_args().out)


if __name__ == '__main__':
  main()
