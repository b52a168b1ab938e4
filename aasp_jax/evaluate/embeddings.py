"""Clip embeddings of a frozen encoder, for linear probes and other downstream evaluations.

Audio is read through the training input pipeline (same decoding, validation and skip accounting),
in entry order: no shuffling, one epoch, each clip cropped from its start (or zero-padded) to the
preset's length. Log-mel features are computed on device and the encoder runs once per batch in a
single jitted function; the last batch is padded to the full batch size so it reuses the one
compiled program. A clip's embedding is [CLS, mean of the patch tokens] of the encoder's final
(normalised) output, float32 [2 * width].

Clips the pipeline cannot use (missing, unreadable, too short, ...) are counted per reason,
logged with their ids, and returned; the embeddings carry the entry index of every clip they hold.
"""

import dataclasses
import functools
import logging
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aasp_jax.audio import fbank_device
from aasp_jax.audio import presets as presets_lib
from aasp_jax.data import clips, manifest, pipeline, sources

_logger = logging.getLogger(__name__)

# Skipped clip ids named in the log message; the counts always cover all of them.
_LOGGED_IDS = 10


@dataclasses.dataclass(frozen=True)
class ClipEmbeddings:
  """Embeddings of the clips that could be read, in entry order.

  Attributes:
    embeddings: float32 [N, 2 * width], [CLS, mean token] per clip.
    indices: int64 [N], strictly increasing indices into the `entries` that were embedded.
    skipped: {reason: count} for every reason in `clips.SKIP_REASONS` (zeros included).
  """

  embeddings: np.ndarray
  indices: np.ndarray
  skipped: dict[str, int]

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())


def pooled_embedding(encoder_out: dict) -> jax.Array:
  """[CLS, mean of the patch tokens] of an encoder output, float32 [batch, 2 * width]."""
  tokens_mean = jnp.mean(encoder_out['tokens'].astype(jnp.float32), axis=1)
  return jnp.concatenate([encoder_out['cls'].astype(jnp.float32), tokens_mean], axis=-1)


@functools.partial(jax.jit, static_argnames=('encoder', 'preset'))
def embed_waveforms(
  encoder_params,
  waveform: jax.Array,
  num_samples: jax.Array,
  encoder: nn.Module,
  preset: presets_lib.FrontEndPreset,
) -> jax.Array:
  """Log-mel on device, then the deterministic encoder: [B, S] waveforms -> [B, 2 * width].

  The encoder and preset are static (both hashable), so repeated evaluations of the same model
  during training reuse one compiled program per batch shape.
  """
  # No logical-axis rules: this runs on one device, whatever sharding context the caller is in.
  with nn.logical_axis_rules(()):
    features_btf = fbank_device.features(waveform, preset, num_samples)
    out = encoder.apply({'params': encoder_params}, features_btf)
  return pooled_embedding(out)


def pipeline_options(
  preset: presets_lib.FrontEndPreset, batch_size: int, min_samples: int | None = None
) -> pipeline.PipelineOptions:
  """Deterministic, single-pass reading: entry order, crops from the start, the tail batch kept.

  `min_samples` defaults to one analysis window: evaluation embeds short one-shots whole
  (zero-padded) although pre-training skips clips shorter than one patch; a clip shorter than one
  window has no frame at all and is skipped as 'too_short'.
  """
  return pipeline.PipelineOptions(
    preset=preset,
    batch_size=batch_size,
    shuffle=False,
    num_epochs=1,
    crop='start',
    drop_remainder=False,
    min_samples=preset.window_length if min_samples is None else min_samples,
  )


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  """Pads the leading axis to `rows` by repeating the last row: always a valid input, so one
  compiled program serves a short last batch; callers drop the padding rows' outputs."""
  missing = rows - array.shape[0]
  if missing <= 0:
    return array
  return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)])


def padded_device_batches(dataset, batch_size: int, device, skipped: np.ndarray):
  """Yields (rows, batch, waveform, num_samples) for each pipeline batch that holds clips: the
  waveforms and lengths padded to `batch_size` rows and put on `device`; `rows` real ones lead.

  Every batch's skip counts, the host-only tail batch's included, are added into `skipped`
  ([len(clips.SKIP_REASONS)]), so the caller can account for every entry.
  """
  for batch in dataset:
    skipped += batch['skipped']
    if 'index' not in batch:  # the host-only tail batch: skip counts only
      continue
    waveform = jax.device_put(pad_rows(batch['waveform'], batch_size), device)
    num_samples = jax.device_put(pad_rows(batch['num_samples'], batch_size), device)
    yield batch['index'].shape[0], batch, waveform, num_samples


def _log_skipped(entries: Sequence[manifest.Entry], indices: np.ndarray, skipped: dict) -> None:
  missing = sorted(set(range(len(entries))) - set(indices.tolist()))
  ids = [entries[i].clip_id or entries[i].path for i in missing[:_LOGGED_IDS]]
  more = f' and {len(missing) - _LOGGED_IDS} more' if len(missing) > _LOGGED_IDS else ''
  reasons = ', '.join(f'{r}: {n}' for r, n in skipped.items() if n)
  _logger.warning(
    'Embeddings: skipped %d of %d clip(s) (%s): %s%s',
    len(missing),
    len(entries),
    reasons,
    ', '.join(ids),
    more,
  )


def clip_embeddings(
  encoder: nn.Module,
  encoder_params,
  preset: presets_lib.FrontEndPreset,
  entries: Sequence[manifest.Entry],
  batch_size: int = 16,
  *,
  min_samples: int | None = None,
) -> ClipEmbeddings:
  """Embeds every readable clip of `entries` with a frozen encoder on the first local device.

  Args:
    encoder: the encoder module (e.g. `build.build_encoder(cfg.model)`); it runs deterministically.
    encoder_params: its parameters as host (numpy) or single-device arrays; boxed (logically
      partitioned) leaves are unboxed.
    preset: the front end the encoder was trained with (its `target_length` sets the crop).
    entries: the clips, e.g. from `manifest.read_manifest`; their labels are not used.
    batch_size: clips per forward pass (every pass has this shape; the last one is padded).
    min_samples: clips shorter than this are skipped as 'too_short' (default: one window).

  Returns:
    ClipEmbeddings; len(indices) + sum(skipped) == len(entries).

  Raises:
    RuntimeError: if the pipeline lost clips without counting them (an accounting bug).
  """
  options = pipeline_options(preset, batch_size, min_samples)
  dataset = pipeline.make_dataset(
    sources.EntrySource(entries), options, process_index=0, process_count=1
  )
  device = jax.local_devices()[0]
  params = jax.device_put(nn.meta.unbox(encoder_params), device)
  chunks, index_chunks = [], []
  skipped_total = np.zeros(len(clips.SKIP_REASONS), np.int64)
  for rows, batch, waveform, num_samples in padded_device_batches(
    dataset, batch_size, device, skipped_total
  ):
    out = embed_waveforms(params, waveform, num_samples, encoder=encoder, preset=preset)
    chunks.append(np.asarray(out)[:rows])  # padding rows dropped
    index_chunks.append(batch['index'].astype(np.int64))
  width = 2 * encoder.width
  embeddings = np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)
  indices = np.concatenate(index_chunks) if index_chunks else np.zeros((0,), np.int64)
  skipped = pipeline.skip_summary(skipped_total)
  if len(indices) + sum(skipped.values()) != len(entries):
    raise RuntimeError(
      f'{len(entries)} clips in, {len(indices)} embedded and {sum(skipped.values())} skipped: '
      'the input pipeline lost clips without counting them.'
    )
  if sum(skipped.values()):
    _log_skipped(entries, indices, skipped)
  return ClipEmbeddings(embeddings.astype(np.float32), indices, skipped)
