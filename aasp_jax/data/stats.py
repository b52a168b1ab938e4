"""`aasp-data stats`: the mean and std of the raw log-mel over a data set, for the front-end preset.

The preset's `norm_mean` / `norm_std` normalise the log-mel; the shipped values are AudioSet's. For
other data, measure them here and pass the printed overrides to the config (or use the JSON with
`presets.get_preset(name, norm_mean=..., norm_std=...)`).

The statistics are over every value of the raw log-mel (`fbank_host.log_mel`: before padding and
normalisation) of `num_clips` clips drawn at random (fixed seed) from any data spec training accepts
(a folder, a manifest, a pack folder, a shard glob, or a comma-separated list of them). Each clip's
count, mean and sum of squared deviations are taken in float64 and merged with Chan's pairwise
formula, which stays accurate over millions of frames where a running sum of squares would cancel
catastrophically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

import numpy as np

from aasp_jax.audio import fbank_host
from aasp_jax.audio import presets as presets_lib
from aasp_jax.data import clips
from aasp_jax.data import pack as pack_lib
from aasp_jax.data import records


@dataclasses.dataclass
class Moments:
  """Count, mean and sum of squared deviations of a set of values (float64), mergeable."""

  count: int = 0
  mean: float = 0.0
  m2: float = 0.0

  def add(self, values: np.ndarray) -> None:
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
      return
    mean = float(x.mean())
    self.merge(Moments(int(x.size), mean, float(np.square(x - mean).sum())))

  def merge(self, other: Moments) -> None:
    """Chan et al.'s pairwise update: exact in exact arithmetic, stable in floating point."""
    total = self.count + other.count
    if total == 0:
      return
    delta = other.mean - self.mean
    self.mean += delta * other.count / total
    self.m2 += other.m2 + delta * delta * self.count * other.count / total
    self.count = total

  @property
  def std(self) -> float:
    """Population standard deviation (ddof=0), as the AudioSet statistics are computed."""
    return math.sqrt(self.m2 / self.count) if self.count else 0.0


def selection_order(num_items: int, seed: int) -> np.ndarray:
  """The order clips are tried in: a seeded permutation, so the first N are a uniform sample."""
  return np.random.default_rng(seed).permutation(num_items)


def compute_stats(
  source: str | os.PathLike,
  *,
  num_clips: int = 1000,
  preset: str = 'eat_audiomae',
  seed: int = 0,
  max_seconds: float | None = 120.0,
  progress: bool = False,
) -> dict[str, Any]:
  """Mean and std of the raw log-mel over `num_clips` clips of `source`.

  Args:
    source: a data spec as training takes it (see `sources`): a folder of audio, a manifest, a
      pack folder, a shard glob, or a comma-separated list of them.
    num_clips: clips to use (all of them if the source has fewer).
    preset: front-end preset name; its sample rate and fbank settings apply.
    seed: seed of the random choice of clips.
    max_seconds: read at most this much of each audio file (packed records are used whole); None
      reads files whole.
    progress: show a progress bar on stderr.

  Returns:
    {'preset', 'norm_mean', 'norm_std', 'num_clips', 'num_frames', 'source', 'seed', 'skipped'}.

  Raises:
    ValueError: if no clip could be used, or a pack's sample rate differs from the preset's.
  """
  if num_clips < 1:
    raise ValueError(f'--num_clips must be >= 1, got {num_clips}')
  fe = presets_lib.get_preset(preset)
  source = os.fspath(source)
  skipped = clips.SkipCounter()
  num_items, load = _open_source(source, fe, max_seconds)
  moments = Moments()
  used = frames = 0
  target = min(num_clips, num_items)
  with pack_lib.ProgressBar(target, 'log-mel stats', enabled=progress) as advance:
    for index in selection_order(num_items, seed):
      if used == target:
        break
      try:
        wave = load(int(index))
      except clips.ClipSkipped as e:
        skipped.add(e.reason)
        continue
      if wave.shape[0] < fe.window_length:
        skipped.add('too_short')
        continue
      x_tf = fbank_host.log_mel(wave, fe)
      moments.add(x_tf)
      used += 1
      frames += x_tf.shape[0]
      advance()
  if not used:
    raise ValueError(f'no usable clip in {source} (skipped: {skipped.as_dict()})')
  return {
    'preset': fe.name,
    'norm_mean': moments.mean,
    'norm_std': moments.std,
    'num_clips': used,
    'num_frames': frames,
    'source': os.path.abspath(source),
    'seed': seed,
    'skipped': skipped.as_dict(),
  }


def override_flags(stats: dict[str, Any]) -> str:
  """The config overrides that make a run use these statistics."""
  return (
    f'--config.frontend.norm_mean={stats["norm_mean"]!r} '
    f'--config.frontend.norm_std={stats["norm_std"]!r}'
  )


def _open_source(
  source: str, fe: presets_lib.FrontEndPreset, max_seconds: float | None
) -> tuple[int, Callable[[int], np.ndarray]]:
  """(number of clips, load(i) -> float32 waveform at the preset's rate) for any data spec that
  training accepts (`sources.open_source`: folders, manifests, packs, shard globs, lists)."""
  # Imported here: sources pulls in grain, which the rest of this module does not need.
  from aasp_jax.data import sources

  data = sources.open_source(source)

  def load(i: int) -> np.ndarray:
    element = data[i]
    if 'record' in element:
      record = records.decode_record(element['record'])
      if record['sample_rate'] != fe.sample_rate:
        raise ValueError(
          f'{source}: record {record["id"]!r} is at {record["sample_rate"]} Hz but preset '
          f'{fe.name!r} expects {fe.sample_rate} Hz; re-pack with --sample_rate {fe.sample_rate}'
        )
      return record['waveform']
    start, end = element['start'], element['end']
    if max_seconds is not None:
      cap = (start or 0.0) + max_seconds
      end = cap if end is None else min(end, cap)
    wave, _ = clips.load_clip(element['path'], fe.sample_rate, start, end)
    return wave

  return len(data), load


def write_stats(stats: dict[str, Any], path: str | os.PathLike) -> None:
  with open(path, 'w') as f:
    json.dump(stats, f, indent=1)
    f.write('\n')
