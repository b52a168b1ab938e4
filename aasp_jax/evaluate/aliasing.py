"""Aliasing-stability measurements of a frozen encoder (design doc section 6, "Aliasing stability").

A 16-frame patchifier samples each mel band's time series at 100 / 16 = 6.25 tokens/s, so temporal
modulation above 3.125 Hz (the token Nyquist) aliases into, or vanishes from, its tokens, and a
shift of the input by less than one patch can change what the tokens see. Three measurements:

- `shift_stability`: for each clip, the normalised log-mel of a segment of target_length +
  max(shifts) frames; the window starting at frame s is embedded and compared (cosine) with the
  window starting at frame 0. Shifting the log-mel (not the waveform) keeps every frame identical
  between the two windows, so only the patch grid's phase changes.
- `modulation_probe`: synthetic clips whose classes differ only in the rate of a sinusoidal
  amplitude modulation (random carrier frequency, carrier phase, modulation phase and level per
  clip), embedded and classified with `linear_probe.probe`; accuracy is reported overall and for
  the classes below / above the token Nyquist.
- the AaPE stem's per-clip decays alpha and frequencies omega [G, N] (sown by `models.aape.AaPE`),
  collected on the unshifted windows of `shift_stability`; `omega_to_hz` converts them to Hz of
  modulation.

Audio is read through the training input pipeline (same decoding and skip accounting), in entry
order, cropped from the start; clips too short for the segment are skipped as 'too_short' and counted.
"""

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aasp_jax.audio import fbank_device, fbank_host
from aasp_jax.audio import presets as presets_lib
from aasp_jax.data import clips, manifest, pipeline, sources
from aasp_jax.evaluate import embeddings, linear_probe
from aasp_jax.evaluate import pretrained as pretrained_lib

_logger = logging.getLogger(__name__)

POOLINGS = ('cls_mean', 'cls', 'mean')
# Modulation rates (Hz) of the probe's classes: two below the 3.125 Hz token Nyquist, four above.
DEFAULT_RATES_HZ = (1.5, 2.5, 4.0, 5.0, 7.0, 9.0)
# Carrier frequencies are log-uniform in this range (Hz): inside the mel range of any preset, and
# low enough that a 16 kHz waveform represents them cleanly.
CARRIER_RANGE_HZ = (150.0, 4000.0)
# Clip levels are uniform in dB over this range (peak amplitude relative to full scale).
LEVEL_RANGE_DB = (-30.0, -6.0)
# White noise this far below each clip's level keeps the modulation troughs off the log floor.
NOISE_DB = -60.0


# ---------------------------------------------------------------------------------------------
# Embedding


def pool(encoder_out: dict, pooling: str = 'cls_mean') -> jax.Array:
  """A clip embedding from an encoder output, float32 [batch, D'].

  'cls_mean' is [CLS, mean patch token] (as `embeddings.pooled_embedding`), 'cls' the CLS token and
  'mean' the mean patch token.
  """
  if pooling not in POOLINGS:
    raise ValueError(f'pooling={pooling!r} is not valid; choose one of {POOLINGS}.')
  cls = encoder_out['cls'].astype(jnp.float32)
  mean = jnp.mean(encoder_out['tokens'].astype(jnp.float32), axis=1)
  if pooling == 'cls':
    return cls
  if pooling == 'mean':
    return mean
  return jnp.concatenate([cls, mean], axis=-1)


@functools.partial(jax.jit, static_argnames=('encoder', 'pooling'))
def embed_features(params, x_btf: jax.Array, encoder: nn.Module, pooling: str = 'cls_mean'):
  """(embedding [B, D'], AaPE alpha [B, G, N] or None, omega [B, G, N] or None) of log-mel windows.

  The stem's sown intermediates are returned when it sows them (AaPE); a conv stem sows none.
  """
  with nn.logical_axis_rules(()):
    out, state = encoder.apply({'params': params}, x_btf, mutable=['intermediates'])
  sown = state.get('intermediates', {}).get('stem', {})
  alpha = sown['alpha'][0] if 'alpha' in sown else None
  omega = sown['omega'][0] if 'omega' in sown else None
  return pool(out, pooling), alpha, omega


@functools.partial(jax.jit, static_argnames=('preset',))
def segment_features(
  waveform: jax.Array, num_samples: jax.Array, preset: presets_lib.FrontEndPreset
) -> jax.Array:
  """Normalised log-mel of whole segments, [B, S] -> [B, frames(S), F] (no pad or crop)."""
  return fbank_host.normalize(fbank_device.log_mel(waveform, preset, num_samples), preset)


@functools.partial(jax.jit, static_argnames=('length',))
def _window(segment_btf: jax.Array, start: jax.Array, length: int) -> jax.Array:
  # A traced start: every shift reuses one compiled slice.
  return jax.lax.dynamic_slice_in_dim(segment_btf, start, length, axis=1)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise cosine of two [N, D] arrays, in float64; a zero row against anything gives NaN."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.sum(a * b, axis=1) / norms


# ---------------------------------------------------------------------------------------------
# Shift stability


def read_entries(audio: str) -> list[manifest.Entry]:
  """The clips of a folder (scanned recursively) or a manifest, with clear errors."""
  if not os.path.exists(audio):
    raise FileNotFoundError(
      f'{audio}: no such folder or manifest; give a folder of audio files or a .csv/.tsv/.jsonl '
      'manifest.'
    )
  entries = manifest.read_entries(audio)
  if not entries:
    raise ValueError(
      f'{audio}: no audio files found (extensions: {sorted(manifest.AUDIO_EXTENSIONS)}).'
    )
  return entries


def segment_frames(preset: presets_lib.FrontEndPreset, max_shift: int) -> int:
  """Frames of the segment that holds the windows at every shift: target_length + max_shift."""
  return preset.target_length + max_shift


def segment_samples(preset: presets_lib.FrontEndPreset, max_shift: int) -> int:
  """Samples that give exactly `segment_frames` Kaldi frames (the shortest usable clip)."""
  return preset.window_length + (segment_frames(preset, max_shift) - 1) * preset.frame_shift


def check_shifts(shifts: Sequence[int]) -> tuple[int, ...]:
  """Sorted, distinct, non-negative shifts (in frames)."""
  shifts = tuple(sorted({int(s) for s in shifts}))
  if not shifts:
    raise ValueError('give at least one shift (in frames).')
  if shifts[0] < 0:
    raise ValueError(f'shifts must be >= 0 frames (0 is the reference window); got {shifts}.')
  return shifts


@dataclasses.dataclass(frozen=True)
class ShiftStability:
  """Cosine similarity of shifted-window embeddings to the unshifted ones.

  Attributes:
    shifts: the shifts s (frames), ascending.
    cosine: float64 [clips, len(shifts)], cos(embedding(window at s), embedding(window at 0)).
    clip_ids: the measured clips' ids, in entry order.
    examined: entries read (measured + skipped).
    skipped: {reason: count} over the examined entries, every reason of `clips.SKIP_REASONS`.
    segment_seconds: the shortest usable clip (target_length + max(shifts) frames).
    alpha: AaPE decays [clips, G, N] of the unshifted windows (None for a conv stem).
    omega: AaPE frequencies [clips, G, N], rad per Delta-step (None for a conv stem).
    example_window: the first measured clip's unshifted normalised log-mel [T, F].
  """

  shifts: tuple[int, ...]
  cosine: np.ndarray
  clip_ids: tuple[str, ...]
  examined: int
  skipped: dict[str, int]
  segment_seconds: float
  alpha: np.ndarray | None
  omega: np.ndarray | None
  example_window: np.ndarray

  @property
  def mean(self) -> np.ndarray:
    return self.cosine.mean(axis=0)

  @property
  def std(self) -> np.ndarray:
    return self.cosine.std(axis=0)


def _measure_entries(model, entries, shifts, batch_size, pooling, segment):
  """Runs one pipeline pass over `entries`; returns per-clip results and the skip counts."""
  preset, length = model.preset, model.preset.target_length
  # The evaluation pipeline (embeddings.pipeline_options), cropped to the shifted segment.
  options = dataclasses.replace(
    embeddings.pipeline_options(preset, batch_size, segment), clip_samples=segment
  )
  dataset = pipeline.make_dataset(
    sources.EntrySource(entries), options, process_index=0, process_count=1
  )
  device = jax.local_devices()[0]
  params = jax.device_put(nn.meta.unbox(model.params), device)
  cosines, indices, alphas, omegas, first_window = [], [], [], [], None
  skipped = np.zeros(len(clips.SKIP_REASONS), np.int64)
  for rows, batch, waveform, num_samples in embeddings.padded_device_batches(
    dataset, batch_size, device, skipped
  ):
    segment_btf = segment_features(waveform, num_samples, preset)
    x0_btf = _window(segment_btf, jnp.int32(0), length)
    reference, alpha, omega = embed_features(params, x0_btf, encoder=model.encoder, pooling=pooling)
    reference = np.asarray(reference)[:rows]
    if alpha is not None:
      alphas.append(np.asarray(alpha)[:rows])
      omegas.append(np.asarray(omega)[:rows])
    if first_window is None:
      first_window = np.asarray(x0_btf[0])
    batch_cos = []
    for s in shifts:
      # s = 0 is embedded again rather than reused: it checks that the path is deterministic.
      x_btf = _window(segment_btf, jnp.int32(s), length)
      emb, _, _ = embed_features(params, x_btf, encoder=model.encoder, pooling=pooling)
      batch_cos.append(cosine_similarity(np.asarray(emb)[:rows], reference))
    cosines.append(np.stack(batch_cos, axis=1))
    indices.append(batch['index'].astype(np.int64))
  skipped = pipeline.skip_summary(skipped)
  num = sum(len(i) for i in indices)
  if num + sum(skipped.values()) != len(entries):
    raise RuntimeError(
      f'{len(entries)} clips in, {num} measured and {sum(skipped.values())} skipped: the input '
      'pipeline lost clips without counting them.'
    )
  return cosines, indices, alphas, omegas, first_window, skipped


def shift_stability(
  model: pretrained_lib.Pretrained,
  entries: Sequence[manifest.Entry],
  shifts: Sequence[int] = tuple(range(1, 16)),
  *,
  max_clips: int | None = None,
  batch_size: int = 8,
  pooling: str = 'cls_mean',
) -> ShiftStability:
  """Embedding stability of `model` under sub-patch time shifts of its input.

  Entries are read in order; with `max_clips`, reading stops once that many clips are measured
  (each pass reads only as many further entries as clips are still missing, so no clip is read
  and then dropped, and the skip counts cover exactly the entries examined).

  Raises:
    ValueError: no entries, or none of them usable (the message gives the skip counts and the
      shortest usable clip).
  """
  shifts = check_shifts(shifts)
  if pooling not in POOLINGS:
    raise ValueError(f'pooling={pooling!r} is not valid; choose one of {POOLINGS}.')
  if not entries:
    raise ValueError('no clips to measure.')
  segment = segment_samples(model.preset, shifts[-1])
  wanted = len(entries) if max_clips is None else max(0, int(max_clips))
  if wanted < 1:
    raise ValueError(f'max_clips must be at least 1; got {max_clips}.')
  cosines, indices, alphas, omegas, window = [], [], [], [], None
  skipped = clips.SkipCounter()
  start = 0
  while start < len(entries) and sum(len(i) for i in indices) < wanted:
    take = wanted - sum(len(i) for i in indices)
    chunk = list(entries[start : start + take])
    c, i, a, o, w, s = _measure_entries(model, chunk, shifts, batch_size, pooling, segment)
    cosines += c
    indices += [start + idx for idx in i]
    alphas += a
    omegas += o
    window = w if window is None else window
    skipped.update(s)
    start += len(chunk)
  seconds = segment / model.preset.sample_rate
  if not indices or sum(len(i) for i in indices) == 0:
    reasons = ', '.join(f'{r}: {n}' for r, n in skipped.as_dict().items() if n)
    raise ValueError(
      f'none of the {start} clip(s) examined could be measured ({reasons}); the shift study needs '
      f'clips of at least {seconds:.3f} s ({segment} samples at {model.preset.sample_rate} Hz: '
      f'target_length {model.preset.target_length} + {shifts[-1]} frames).'
    )
  all_indices = np.concatenate(indices)
  if skipped.total:
    _logger.warning(
      'Shift study: skipped %d of %d clip(s) examined (%s)',
      skipped.total,
      start,
      ', '.join(f'{r}: {n}' for r, n in skipped.as_dict().items() if n),
    )
  return ShiftStability(
    shifts=shifts,
    cosine=np.concatenate(cosines),
    clip_ids=tuple(entries[i].clip_id or entries[i].path for i in all_indices),
    examined=start,
    skipped=skipped.as_dict(),
    segment_seconds=seconds,
    alpha=np.concatenate(alphas) if alphas else None,
    omega=np.concatenate(omegas) if omegas else None,
    example_window=window,
  )


# ---------------------------------------------------------------------------------------------
# AaPE parameters


def frames_per_second(preset: presets_lib.FrontEndPreset) -> float:
  return preset.sample_rate / preset.frame_shift


def token_nyquist_hz(preset: presets_lib.FrontEndPreset, patch_t: int) -> float:
  """Half the token rate: 3.125 Hz for 10 ms frames and 16-frame patches."""
  return frames_per_second(preset) / patch_t / 2.0


def aape_delta(model: pretrained_lib.Pretrained) -> float | None:
  """The AaPE step size Delta (learned when model.aape.learn_delta); None for a conv stem."""
  if model.config.model.stem != 'aape':
    return None
  stem = model.params.get('stem', {})
  if 'log_delta' in stem:
    return float(np.exp(np.asarray(stem['log_delta'], np.float64)))
  return float(model.config.model.aape.delta)


def omega_to_hz(omega, delta: float, preset: presets_lib.FrontEndPreset) -> np.ndarray:
  """Modulation frequency in Hz: Delta * omega rad/frame times frames/s over 2 pi."""
  return np.asarray(omega, np.float64) * delta * frames_per_second(preset) / (2.0 * math.pi)


# ---------------------------------------------------------------------------------------------
# Modulation-rate probe


def modulated_clip(
  rate_hz: float, num_samples: int, sample_rate: int, rng: np.random.Generator, depth: float = 1.0
) -> np.ndarray:
  """One amplitude-modulated tone, float32 [num_samples].

  x(t) = level * (1 + depth sin(2 pi rate t + phi_m)) / (1 + depth) * sin(2 pi f_c t + phi_c)
  + noise: the rate is the class; the carrier f_c (log-uniform in CARRIER_RANGE_HZ), both phases,
  the level (uniform dB in LEVEL_RANGE_DB) and the noise (NOISE_DB below the level) are drawn from
  `rng`, so nothing but the rate separates the classes.
  """
  if not 0.0 < depth <= 1.0:
    raise ValueError(f'modulation depth must lie in (0, 1]; got {depth}.')
  carrier = math.exp(rng.uniform(math.log(CARRIER_RANGE_HZ[0]), math.log(CARRIER_RANGE_HZ[1])))
  carrier_phase, mod_phase = rng.uniform(0.0, 2.0 * math.pi, size=2)
  level = 10.0 ** (rng.uniform(*LEVEL_RANGE_DB) / 20.0)
  t = np.arange(num_samples) / sample_rate
  envelope = (1.0 + depth * np.sin(2.0 * math.pi * rate_hz * t + mod_phase)) / (1.0 + depth)
  wave = level * envelope * np.sin(2.0 * math.pi * carrier * t + carrier_phase)
  wave += level * 10.0 ** (NOISE_DB / 20.0) * rng.standard_normal(num_samples)
  return wave.astype(np.float32)


def modulation_set(
  rates_hz: Sequence[float],
  clips_per_class: int,
  num_samples: int,
  sample_rate: int,
  seed: int,
  depth: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
  """(waveforms float32 [C * n, S], class ids int64 [C * n]), class-major, deterministic in seed."""
  rng = np.random.default_rng(seed)
  waves, labels = [], []
  for label, rate in enumerate(rates_hz):
    for _ in range(clips_per_class):
      waves.append(modulated_clip(rate, num_samples, sample_rate, rng, depth))
      labels.append(label)
  return np.stack(waves), np.asarray(labels, np.int64)


def embed_waveforms(
  model: pretrained_lib.Pretrained,
  waves: np.ndarray,
  batch_size: int = 8,
  pooling: str = 'cls_mean',
) -> np.ndarray:
  """Embeddings [N, D'] of in-memory waveforms of one length (front end and padding as training)."""
  device = jax.local_devices()[0]
  params = jax.device_put(nn.meta.unbox(model.params), device)
  out = []
  for start in range(0, len(waves), batch_size):
    rows = waves[start : start + batch_size]
    lengths = np.full(len(rows), waves.shape[1], np.int32)
    features = fbank_device.features(
      jax.device_put(embeddings.pad_rows(rows, batch_size), device),
      model.preset,
      jax.device_put(embeddings.pad_rows(lengths, batch_size), device),
    )
    emb, _, _ = embed_features(params, features, encoder=model.encoder, pooling=pooling)
    out.append(np.asarray(emb)[: len(rows)])
  return np.concatenate(out)


def modulation_probe(
  model: pretrained_lib.Pretrained,
  rates_hz: Sequence[float] = DEFAULT_RATES_HZ,
  *,
  train_per_class: int = 24,
  test_per_class: int = 12,
  seed: int = 0,
  seconds: float | None = None,
  batch_size: int = 8,
  pooling: str = 'cls_mean',
  l2_grid: Sequence[float] = linear_probe.DEFAULT_L2_GRID,
  folds: int = linear_probe.DEFAULT_FOLDS,
) -> dict:
  """Linear-probe accuracy on synthetic clips that differ only in their modulation rate.

  Train and test clips are drawn independently (seeds `seed` and `seed + 1`); clips last one model
  window unless `seconds` is given. Accuracies: 'accuracy' (all classes), 'accuracy_below' /
  'accuracy_above' (the same classifier, scored on the test clips of the classes below / above the
  token Nyquist) and 'accuracy_above_only' (a separate probe fitted and scored on the classes above
  the Nyquist only, where every class differs from every other only in aliased modulation; None
  with fewer than two such classes).
  """
  rates = tuple(float(r) for r in rates_hz)
  if len(rates) < 2 or len(set(rates)) != len(rates):
    raise ValueError(f'the probe needs at least two distinct rates; got {rates}.')
  if min(train_per_class, test_per_class) < 1 or train_per_class < folds:
    raise ValueError(
      f'train_per_class={train_per_class} must be >= folds={folds} and test_per_class='
      f'{test_per_class} >= 1.'
    )
  preset = model.preset
  sr = preset.sample_rate
  num_samples = (
    preset.window_length + (preset.target_length - 1) * preset.frame_shift
    if seconds is None
    else round(seconds * sr)
  )
  nyquist = token_nyquist_hz(preset, model.config.model.patch_t)
  train_w, train_y = modulation_set(rates, train_per_class, num_samples, sr, seed)
  test_w, test_y = modulation_set(rates, test_per_class, num_samples, sr, seed + 1)
  train_x = embed_waveforms(model, train_w, batch_size, pooling)
  test_x = embed_waveforms(model, test_w, batch_size, pooling)
  result = linear_probe.probe(train_x, train_y, test_x, test_y, len(rates), l2_grid, folds)
  above = np.asarray([r > nyquist for r in rates])
  correct = result.predictions == test_y

  def accuracy_of(classes: np.ndarray):
    rows = classes[test_y]
    return float(np.mean(correct[rows])) if rows.any() else None

  above_only = None
  if above.sum() >= 2:
    ids = np.flatnonzero(above)
    remap = -np.ones(len(rates), np.int64)
    remap[ids] = np.arange(len(ids))
    tr, te = above[train_y], above[test_y]
    above_only = linear_probe.probe(
      train_x[tr], remap[train_y[tr]], test_x[te], remap[test_y[te]], len(ids), l2_grid, folds
    ).accuracy
  return {
    'rates_hz': list(rates),
    'token_nyquist_hz': nyquist,
    'clip_seconds': num_samples / sr,
    'train_per_class': train_per_class,
    'test_per_class': test_per_class,
    'seed': seed,
    'accuracy': result.accuracy,
    'accuracy_below': accuracy_of(~above),
    'accuracy_above': accuracy_of(above),
    'accuracy_above_only': above_only,
    'chance': 1.0 / len(rates),
    'l2': result.l2,
    'train_accuracy': result.train_accuracy,
  }
