"""Scene and timestamp embeddings of a frozen encoder for audio of any length (the plain Python API).

  from aasp_jax.evaluate import embed, pretrained
  embedder = embed.Embedder(pretrained.load_pretrained('runs/quickstart'), pooling='cls_mean')
  scene = embedder.scene_embeddings(waves_bs, num_samples_b)             # [B, D]
  frames, times_ms = embedder.timestamp_embeddings(waves_bs, num_samples_b)  # [B, T, D'], [B, T]

Windows. The encoder sees `preset.target_length` frames (its window, W) at a time. A clip of n
frames is cut into windows that start every `hop` frames: window k covers frames [k hop, k hop + W),
and there are just enough windows to reach the clip's last frame (one window when n <= W). Windows
are cut from the waveform (window k starts at sample k hop frame_shift), so their frames are
exactly the clip's frames: Kaldi framing is local, and the waveform mean the front end removes
cannot change a frame when per-frame DC removal is on (both shipped presets: 'eat_audiomae' removes
the DC offset per frame, 'beats' does not remove the mean at all). A preset that removes the
waveform mean but not the per-frame DC offset gets each window's own mean removed.

Padding. A window that reaches past the clip's end is padded as the training front end pads
(log-mel frames past the true length are 0 before normalisation). Time patches that hold no frame
of the clip are padding: they are masked as attention keys (`token_valid_bn`) and left out of every
pooled output and of the timestamps; the last, partly filled patch is kept. A clip's windows and
their lengths come from its own true length only, so a clip gives the same embeddings alone or in a
zero-padded batch with longer clips, and in any position of any batch.

What masking guarantees depends on the stem:
  * conv stem: tokens are patch-local and positions are a fixed table, so with padding masked the
    embeddings of a clip shorter than the window do not depend on the window length W at all
    (tests/test_embed.py checks W = 64 against W = 128).
  * AaPE: its Lambda encoder estimates the SBLU parameters from the modulation spectrum of the
    whole window, and each subband's mean is removed over the whole window before the band-pass,
    so the AaPE feature branch of every token sees the window's padding frames. A clip's
    embeddings are still a function of the clip (and W) alone, never of the batch; but for a clip
    that does not fill its last window they change with W through that branch, and only through
    it: with the fusion gate at 0 they equal the conv stem's W-independent result (tested).

Timestamps. A time patch's timestamp is the centre (ms) of the samples its frames cover:
(first frame) * frame_shift + (15 frame shifts + one analysis window) / 2, i.e. 87.5 ms after its
first frame's start with the default 10 ms / 25 ms front end, then one every 160 ms. With
overlapping windows (hop < W) a patch is reported once, by the window whose centre is nearest to
the patch's centre (ties go to the earlier window): windows own disjoint, consecutive stretches of
time, so timestamps are strictly increasing. With hop = W (the default) every patch is reported;
with hop a multiple of the patch duration (160 ms by default) the timestamps lie on one regular grid.

Pooling. Scene ('pooling'): 'cls', 'mean' (mean of the valid patch tokens) or 'cls_mean' (both,
concatenated). A clip's scene embedding is the mean of its windows' pooled outputs, each weighted
by its number of valid tokens. Timestamp ('timestamp_pooling'): the frequency patches of a time
patch are concatenated ('concat', n_freq * width values) or averaged ('average', width values).

Layers ('layer'): -1 is the encoder's final (normalised) output; an int i in [0, depth) is block i's
output (before the final norm); 'average' averages every block's output, a sequence of ints the
listed blocks'. The encoder returns per-block outputs of the patch tokens only, so intermediate
layers support 'mean' and the timestamp poolings, not 'cls'.

Compilation. The front end and the encoder run in one jitted function over a fixed number of
windows (`batch_size`; a short last batch is padded with copies of its last window), so each
Embedder compiles one program for scene embeddings and one for timestamps, whatever the clips'
lengths and batch sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aasp_jax.audio import fbank_device
from aasp_jax.audio import presets as presets_lib
from aasp_jax.data import clips, manifest
from aasp_jax.evaluate import embeddings, pretrained

_logger = logging.getLogger(__name__)

POOLINGS = ('cls', 'mean', 'cls_mean')
TIMESTAMP_POOLINGS = ('concat', 'average')
# Skipped clips named in the log message; the counts always cover all of them.
_LOGGED_IDS = 10


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


def resolve_layers(layer, depth: int) -> tuple[int, ...] | None:
  """The blocks whose outputs are averaged, or None for the final normalised output.

  Args:
    layer: -1 (final output), an int block index in [0, depth), 'average' (all blocks) or a
      sequence of block indices (their average).
    depth: the encoder's number of blocks.

  Raises:
    ValueError: naming the bad value and the valid choices.
  """
  valid = f"-1 (final output), a block index in [0, {depth}), 'average', or a list of indices"
  if isinstance(layer, str):
    if layer != 'average':
      raise ValueError(f'layer={layer!r}: choose {valid}.')
    return tuple(range(depth))
  if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
    layer = int(layer)
    if layer == -1:
      return None
    if not 0 <= layer < depth:
      raise ValueError(f'layer={layer}: the encoder has {depth} blocks; choose {valid}.')
    return (layer,)
  if isinstance(layer, Sequence) and len(layer):
    blocks = set()
    for i in layer:
      if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < depth:
        raise ValueError(f'layer={list(layer)}: {i!r} is not a block index; choose {valid}.')
      blocks.add(int(i))
    return tuple(sorted(blocks))
  raise ValueError(f'layer={layer!r}: choose {valid}.')


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f'{name}={value!r}: choose one of {choices}.')


# ----------------------------------------------------------------------------------------------
# The forward pass over a batch of windows
# ----------------------------------------------------------------------------------------------


def _frames_from_samples(num_samples, preset: presets_lib.FrontEndPreset):
  """Kaldi frames of clips with `num_samples` samples (vectorised `preset.num_frames`)."""
  return jnp.where(
    num_samples >= preset.window_length,
    1 + (num_samples - preset.window_length) // preset.frame_shift,
    0,
  )


@functools.partial(
  jax.jit,
  static_argnames=('encoder', 'preset', 'patch_t', 'patch_f', 'layers', 'timestamp_pooling'),
)
def window_outputs(
  params,
  waveform_ws: jax.Array,
  num_samples_w: jax.Array,
  *,
  encoder: nn.Module,
  preset: presets_lib.FrontEndPreset,
  patch_t: int,
  patch_f: int,
  layers: tuple[int, ...] | None,
  timestamp_pooling: str | None,
) -> dict[str, jax.Array]:
  """Front end and encoder over windows [W, samples] with true lengths [W], padding masked.

  Returns float32 arrays: 'count' [W] (valid tokens), 'mean' [W, D] (mean of the valid tokens of
  the chosen layer), 'cls' [W, D] (final output only), and with a `timestamp_pooling` 'patches'
  [W, n_time, D'] (every time patch, padding included: the host drops it).
  """
  with nn.logical_axis_rules(()):  # one device, whatever sharding context the caller is in
    x_wtf = fbank_device.features(waveform_ws, preset, num_samples_w)
    n_time, n_freq = preset.target_length // patch_t, preset.num_mel_bins // patch_f
    frames_w = _frames_from_samples(jnp.asarray(num_samples_w, jnp.int32), preset)
    # A time patch is valid if it holds at least one frame of the clip.
    time_valid_wt = jnp.arange(n_time)[None, :] * patch_t < frames_w[:, None]
    token_valid_wn = jnp.repeat(time_valid_wt, n_freq, axis=1)  # time-major token grid
    out = encoder.apply(
      {'params': params},
      x_wtf,
      token_valid_bn=token_valid_wn,
      deterministic=True,
      return_layers=layers is not None,
    )
  if layers is None:
    tokens_wnd = out['tokens'].astype(jnp.float32)
  else:
    tokens_wnd = jnp.mean(out['layers'][jnp.asarray(layers)].astype(jnp.float32), axis=0)
  valid_wn1 = token_valid_wn[..., None].astype(jnp.float32)
  count_w = jnp.sum(token_valid_wn, axis=1).astype(jnp.float32)
  result = {
    'count': count_w,
    'mean': jnp.sum(tokens_wnd * valid_wn1, axis=1) / jnp.maximum(count_w, 1.0)[:, None],
  }
  if layers is None:
    result['cls'] = out['cls'].astype(jnp.float32)
  if timestamp_pooling is not None:
    grid_wtfd = tokens_wnd.reshape(tokens_wnd.shape[0], n_time, n_freq, tokens_wnd.shape[-1])
    if timestamp_pooling == 'concat':
      result['patches'] = grid_wtfd.reshape(grid_wtfd.shape[0], n_time, -1)
    else:
      result['patches'] = jnp.mean(grid_wtfd, axis=2)
  return result


# ----------------------------------------------------------------------------------------------
# The embedder
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileEmbeddings:
  """Embeddings of the files that could be read, in entry order.

  Attributes:
    indices: int64 [N], strictly increasing indices into the entries that were embedded.
    clip_ids: [N] their ids (the entry's clip_id, else its path).
    embeddings: float32 [N, scene_embedding_size].
    timestamp_embeddings: with timestamps, one float32 [T_i, timestamp_embedding_size] per clip.
    timestamps_ms: with timestamps, one float32 [T_i] per clip.
    skipped: {reason: count} for every reason in `clips.SKIP_REASONS` (zeros included).
    skipped_clips: (clip_id, path, reason, detail) of every skipped entry.
  """

  indices: np.ndarray
  clip_ids: tuple[str, ...]
  embeddings: np.ndarray
  timestamp_embeddings: tuple[np.ndarray, ...] | None
  timestamps_ms: tuple[np.ndarray, ...] | None
  skipped: dict[str, int]
  skipped_clips: tuple[tuple[str, str, str, str], ...]


class Embedder:
  """Scene and timestamp embeddings of one frozen encoder (see the module docstring).

  Attributes:
    model: the `pretrained.Pretrained` encoder.
    preset: its front end; `preset.target_length` frames is the window.
    pooling, timestamp_pooling, layers: the resolved options.
    hop_frames: frames between window starts.
    batch_size: windows per forward pass.
    sample_rate: the rate (Hz) waveforms must have.
    scene_embedding_size, timestamp_embedding_size: output widths.
  """

  def __init__(
    self,
    model: pretrained.Pretrained,
    *,
    pooling: str = 'cls_mean',
    timestamp_pooling: str = 'concat',
    layer: int | str | Sequence[int] = -1,
    hop_seconds: float | None = None,
    batch_size: int = 8,
  ):
    """Checks the options and puts the parameters on the first local device.

    Args:
      model: from `pretrained.load_pretrained` or `pretrained.random_encoder`.
      pooling: scene pooling, one of POOLINGS.
      timestamp_pooling: how a time patch's frequency patches are pooled, one of
        TIMESTAMP_POOLINGS.
      layer: see `resolve_layers`.
      hop_seconds: seconds between window starts, rounded to whole frames (default: the window's
        length, i.e. no overlap); at least one frame and at most one window.
      batch_size: windows per forward pass (every pass has this shape).

    Raises:
      ValueError: for an unknown option, a hop outside [one frame, one window], 'cls' pooling of an
        intermediate layer, or a window that does not tile into patches.
    """
    _check_choice('pooling', pooling, POOLINGS)
    _check_choice('timestamp_pooling', timestamp_pooling, TIMESTAMP_POOLINGS)
    m, preset = model.config.model, model.preset
    self.layers = resolve_layers(layer, m.depth)
    if self.layers is not None and pooling != 'mean':
      raise ValueError(
        f'pooling={pooling!r} needs the CLS token, which only the final output (layer=-1) has; '
        "use pooling='mean' with an intermediate layer."
      )
    if preset.target_length % m.patch_t or preset.num_mel_bins % m.patch_f:
      raise ValueError(
        f'{model.source}: the window of {preset.target_length} frames x {preset.num_mel_bins} mel '
        f'bins does not tile into {m.patch_t} x {m.patch_f} patches; set the preset target_length '
        f'to a multiple of {m.patch_t}.'
      )
    if batch_size < 1:
      raise ValueError(f'batch_size must be positive, got {batch_size}.')
    window = preset.target_length
    if hop_seconds is None:
      self.hop_frames = window
    else:
      self.hop_frames = round(hop_seconds * preset.sample_rate / preset.frame_shift)
      if not 1 <= self.hop_frames <= window:
        raise ValueError(
          f'hop_seconds={hop_seconds} is {self.hop_frames} frames; it must be between one frame '
          f'({preset.frame_shift / preset.sample_rate:g} s) and one window '
          f'({window * preset.frame_shift / preset.sample_rate:g} s).'
        )
    self.model = model
    self.preset = preset
    self.pooling = pooling
    self.timestamp_pooling = timestamp_pooling
    self.batch_size = batch_size
    self.patch_t, self.patch_f = m.patch_t, m.patch_f
    self.sample_rate = preset.sample_rate
    width, n_freq = m.width, preset.num_mel_bins // m.patch_f
    self.scene_embedding_size = 2 * width if pooling == 'cls_mean' else width
    self.timestamp_embedding_size = n_freq * width if timestamp_pooling == 'concat' else width
    self._params = jax.device_put(nn.meta.unbox(model.params), jax.local_devices()[0])

  @property
  def window_samples(self) -> int:
    """Samples of one window: exactly `target_length` frames."""
    p = self.preset
    return p.window_length + (p.target_length - 1) * p.frame_shift

  @property
  def hop_seconds(self) -> float:
    return self.hop_frames * self.preset.frame_shift / self.preset.sample_rate

  # Windows -------------------------------------------------------------------------------------

  def window_starts(self, num_samples: int) -> np.ndarray:
    """Start frames of the windows of a clip of `num_samples` samples (at least one window)."""
    frames, window = self.preset.num_frames(num_samples), self.preset.target_length
    if frames <= window:
      return np.zeros(1, np.int64)
    return np.arange(1 + math.ceil((frames - window) / self.hop_frames)) * self.hop_frames

  def _cut(self, wave: np.ndarray, num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(windows [K, window_samples] zero-padded, their true lengths [K], start frames [K])."""
    starts = self.window_starts(num_samples)
    length = self.window_samples
    chunks = np.zeros((len(starts), length), np.float32)
    valid = np.zeros(len(starts), np.int32)
    for k, start in enumerate(starts * self.preset.frame_shift):
      piece = wave[start : min(num_samples, start + length)]
      chunks[k, : len(piece)] = piece
      valid[k] = len(piece)
    return chunks, valid, starts

  def _forward(self, chunks: np.ndarray, valid: np.ndarray, timestamps: bool) -> dict:
    """Runs every window through `window_outputs` in fixed-size batches; host numpy outputs."""
    outputs = []
    for first in range(0, len(chunks), self.batch_size):
      rows = slice(first, first + self.batch_size)
      out = window_outputs(
        self._params,
        embeddings.pad_rows(chunks[rows], self.batch_size),
        embeddings.pad_rows(valid[rows], self.batch_size),
        encoder=self.model.encoder,
        preset=self.preset,
        patch_t=self.patch_t,
        patch_f=self.patch_f,
        layers=self.layers,
        timestamp_pooling=self.timestamp_pooling if timestamps else None,
      )
      n = len(chunks[rows])
      outputs.append({k: np.asarray(v)[:n] for k, v in out.items()})  # padding rows dropped
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}

  # Pooling -------------------------------------------------------------------------------------

  def _scene(self, out: dict, windows: slice) -> np.ndarray:
    """The token-count-weighted mean of a clip's windows' pooled outputs."""
    weights = out['count'][windows].astype(np.float64)
    weights = weights / weights.sum()
    parts = []
    if self.pooling in ('cls', 'cls_mean'):
      parts.append(weights @ out['cls'][windows].astype(np.float64))
    if self.pooling in ('mean', 'cls_mean'):
      parts.append(weights @ out['mean'][windows].astype(np.float64))
    return np.concatenate(parts).astype(np.float32)

  def patch_centres_ms(self, start_frame: int) -> np.ndarray:
    """Timestamps (ms) of the time patches of the window that starts at `start_frame`."""
    p = self.preset
    first_frames = start_frame + self.patch_t * np.arange(p.target_length // self.patch_t)
    span = (self.patch_t - 1) * p.frame_shift + p.window_length  # samples one patch covers
    return (first_frames * p.frame_shift + span / 2) * 1000.0 / p.sample_rate

  def _timestamps(
    self, out: dict, windows: slice, starts: np.ndarray, valid: np.ndarray
  ) -> tuple[np.ndarray, np.ndarray]:
    """A clip's (embeddings [T, D'], timestamps [T] ms): valid patches, each from one window."""
    p = self.preset
    centres_ms = np.stack([self.patch_centres_ms(s) for s in starts])  # [K, n_time]
    window_centres_ms = (starts + p.target_length / 2) * p.frame_shift * 1000.0 / p.sample_rate
    # np.argmin returns the first minimum: ties go to the earlier window.
    owner_kt = np.argmin(np.abs(centres_ms[..., None] - window_centres_ms), axis=-1)
    frames = np.array([p.num_frames(int(v)) for v in valid])
    has_clip_frames = np.arange(centres_ms.shape[1])[None, :] * self.patch_t < frames[:, None]
    keep_kt = (owner_kt == np.arange(len(starts))[:, None]) & has_clip_frames
    patches = out['patches'][windows]
    return patches[keep_kt].astype(np.float32), centres_ms[keep_kt].astype(np.float32)

  # Public API ----------------------------------------------------------------------------------

  def _checked(self, waveforms, num_samples) -> tuple[np.ndarray, np.ndarray]:
    waves = np.asarray(waveforms)
    if waves.ndim != 2 or not np.issubdtype(waves.dtype, np.floating):
      raise ValueError(
        f'waveforms must be a float array [batch, samples] at {self.sample_rate} Hz; got '
        f'{waves.dtype} {waves.shape}.'
      )
    waves = waves.astype(np.float32, copy=False)
    if num_samples is None:
      lengths = np.full(waves.shape[0], waves.shape[1], np.int64)
    else:
      lengths = np.asarray(num_samples).astype(np.int64).reshape(-1)
      if lengths.shape != (waves.shape[0],) or (lengths > waves.shape[1]).any():
        raise ValueError(
          f'num_samples must hold one length per clip, each at most the {waves.shape[1]} samples '
          f'given; got {np.asarray(num_samples).tolist()}.'
        )
    short = np.flatnonzero(lengths < self.preset.window_length)
    if short.size:
      raise ValueError(
        f'clip(s) {short.tolist()} are shorter than one analysis window '
        f'({self.preset.window_length} samples at {self.sample_rate} Hz) and have no frame.'
      )
    for i in range(waves.shape[0]):
      if not np.isfinite(waves[i, : lengths[i]]).all():
        raise ValueError(f'clip {i} holds NaN or Inf samples.')
    return waves, lengths

  def _embed(self, waves: Sequence[np.ndarray], lengths: Sequence[int], timestamps: bool):
    """Scene embeddings [B, D] and, with timestamps, per-clip (embeddings, timestamps) lists."""
    cut = [self._cut(w, int(n)) for w, n in zip(waves, lengths)]
    chunks = np.concatenate([c[0] for c in cut])
    valid = np.concatenate([c[1] for c in cut])
    out = self._forward(chunks, valid, timestamps)
    bounds = np.cumsum([0] + [len(c[0]) for c in cut])
    spans = [slice(a, b) for a, b in itertools.pairwise(bounds)]
    scene = np.stack([self._scene(out, s) for s in spans])
    if not timestamps:
      return scene, None
    frames = [self._timestamps(out, s, c[2], c[1]) for s, c in zip(spans, cut)]
    return scene, frames

  def scene_embeddings(self, waveforms, num_samples=None) -> np.ndarray:
    """float32 [B, scene_embedding_size] for waveforms [B, S] (zero-padded to S; true lengths
    `num_samples` [B], default S), at `sample_rate`."""
    waves, lengths = self._checked(waveforms, num_samples)
    if not len(waves):
      return np.zeros((0, self.scene_embedding_size), np.float32)
    return self._embed(waves, lengths, timestamps=False)[0]

  def timestamp_embeddings(self, waveforms, num_samples=None) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [B, T, timestamp_embedding_size], float32 timestamps [B, T] in ms).

    T is the largest number of timestamps of a clip in the batch; a clip with fewer is padded with
    zero embeddings and NaN timestamps (`np.isfinite(timestamps)` marks the real ones). Clips of
    equal length (HEAR's case) have equal T and no padding.
    """
    waves, lengths = self._checked(waveforms, num_samples)
    if not len(waves):
      return (
        np.zeros((0, 0, self.timestamp_embedding_size), np.float32),
        np.zeros((0, 0), np.float32),
      )
    _, frames = self._embed(waves, lengths, timestamps=True)
    return pad_timestamps(frames, self.timestamp_embedding_size)

  def embed_files(
    self,
    entries: Sequence[manifest.Entry],
    *,
    timestamps: bool = False,
    clips_per_pass: int | None = None,
  ) -> FileEmbeddings:
    """Decodes and embeds every readable entry; unusable clips are counted per reason and named.

    Clips are decoded with `clips.load_clip` (each entry's [start, end) window, resampled to the
    model's rate) and validated as the evaluation pipeline does (`embeddings.pipeline_options`):
    missing, empty, unreadable, non-finite and silent clips and clips without one analysis window
    are skipped. `clips_per_pass` clips (default: batch_size) are decoded, then embedded together.
    """
    options = embeddings.pipeline_options(self.preset, self.batch_size)
    group = clips_per_pass or self.batch_size
    skipped = clips.SkipCounter()
    skipped_clips, indices, scenes, frames = [], [], [], []
    pending: list[tuple[int, np.ndarray]] = []

    def flush():
      if not pending:
        return
      scene, per_clip = self._embed(
        [w for _, w in pending], [len(w) for _, w in pending], timestamps
      )
      indices.extend(i for i, _ in pending)
      scenes.append(scene)
      frames.extend(per_clip or ())
      pending.clear()

    for i, entry in enumerate(entries):
      try:
        wave, _ = clips.load_clip(
          entry.path,
          self.sample_rate,
          entry.start,
          entry.end,
          min_samples=options.min_samples,
          silence_rms=options.silence_rms,
        )
      except clips.ClipSkipped as e:
        skipped.add(e.reason)
        skipped_clips.append((entry.clip_id or entry.path, entry.path, e.reason, e.detail))
        continue
      pending.append((i, wave))
      if len(pending) >= group:
        flush()
    flush()
    if skipped_clips:
      _log_skipped(skipped_clips, len(entries), skipped.as_dict())
    scene = (
      np.concatenate(scenes) if scenes else np.zeros((0, self.scene_embedding_size), np.float32)
    )
    return FileEmbeddings(
      indices=np.asarray(indices, np.int64),
      clip_ids=tuple(entries[i].clip_id or entries[i].path for i in indices),
      embeddings=scene,
      timestamp_embeddings=tuple(f[0] for f in frames) if timestamps else None,
      timestamps_ms=tuple(f[1] for f in frames) if timestamps else None,
      skipped=skipped.as_dict(),
      skipped_clips=tuple(skipped_clips),
    )


def pad_timestamps(
  frames: Sequence[tuple[np.ndarray, np.ndarray]], size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Stacks per-clip (embeddings [T_i, size], timestamps [T_i]) into [B, T, size] and [B, T],
  padding with zero embeddings and NaN timestamps."""
  longest = max((len(ts) for _, ts in frames), default=0)
  emb = np.zeros((len(frames), longest, size), np.float32)
  times = np.full((len(frames), longest), np.nan, np.float32)
  for i, (e, ts) in enumerate(frames):
    emb[i, : len(ts)] = e
    times[i, : len(ts)] = ts
  return emb, times


def _log_skipped(skipped_clips, total: int, counts: dict[str, int]) -> None:
  ids = [clip[0] for clip in skipped_clips[:_LOGGED_IDS]]
  more = f' and {len(skipped_clips) - _LOGGED_IDS} more' if len(skipped_clips) > _LOGGED_IDS else ''
  reasons = ', '.join(f'{r}: {n}' for r, n in counts.items() if n)
  _logger.warning(
    'Embed: skipped %d of %d clip(s) (%s): %s%s',
    len(skipped_clips),
    total,
    reasons,
    ', '.join(ids),
    more,
  )
