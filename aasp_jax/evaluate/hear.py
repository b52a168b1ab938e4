"""The HEAR 2021 API (hearbenchmark.com) for AaSP checkpoints.

  from aasp_jax.evaluate import hear
  model = hear.load_model('runs/quickstart')                 # a checkpoint, as in load_pretrained
  scene = hear.get_scene_embeddings(audio, model)            # [n_sounds, model.scene_embedding_size]
  emb, ts = hear.get_timestamp_embeddings(audio, model)      # [n_sounds, T, size], [n_sounds, T] ms

`audio` is float32 [n_sounds, n_samples] at `model.sample_rate` (16 kHz), values in [-1, 1]: a
numpy array, or a torch tensor when torch is installed (the outputs are then torch tensors on the
input's device). Outputs are float32. Audio longer than the encoder's window is cut into windows,
timestamps are the centres of the encoder's time patches (strictly increasing), and each sound is
embedded from its own samples only, so a batch gives the same embeddings as one call per sound:
see `aasp_jax.evaluate.embed` for the windowing and pooling rules.
"""

from __future__ import annotations

import numpy as np

from aasp_jax.evaluate import embed, pretrained


def load_model(model_file_path: str = '', **options) -> embed.Embedder:
  """Loads an encoder checkpoint as a HEAR model.

  Args:
    model_file_path: a training workdir, its `checkpoints/` folder or a `checkpoints/<step>` folder.
    **options: `which` ('teacher' | 'student') and `step` (see `pretrained.load_pretrained`), and the
      `embed.Embedder` options: pooling, timestamp_pooling, layer, hop_seconds, batch_size.

  Returns:
    an `embed.Embedder`, with the attributes HEAR reads: `sample_rate`, `scene_embedding_size` and
    `timestamp_embedding_size`.
  """
  if not model_file_path:
    raise ValueError(
      'load_model needs model_file_path: a training workdir, its checkpoints/ folder or a '
      'checkpoints/<step> folder (AaSP models have no built-in weights).'
    )
  which = options.pop('which', 'teacher')
  step = options.pop('step', None)
  return embed.Embedder(pretrained.load_pretrained(model_file_path, which, step), **options)


def get_scene_embeddings(audio, model: embed.Embedder):
  """float32 [n_sounds, model.scene_embedding_size], of the same array type as `audio`."""
  waves, back = _to_numpy(audio, model)
  return back(model.scene_embeddings(waves))


def get_timestamp_embeddings(audio, model: embed.Embedder):
  """(float32 embeddings [n_sounds, n_timestamps, model.timestamp_embedding_size], float32
  timestamps [n_sounds, n_timestamps] in milliseconds), of the same array type as `audio`."""
  waves, back = _to_numpy(audio, model)
  emb, timestamps = model.timestamp_embeddings(waves)
  return back(emb), back(timestamps)


def _is_torch(x) -> bool:
  # Checked by type name so that numpy users never import torch.
  return type(x).__module__.split('.')[0] == 'torch'


def _to_numpy(audio, model: embed.Embedder):
  """(float32 numpy [n_sounds, n_samples], a function converting outputs back to audio's type)."""
  if _is_torch(audio):
    import torch  # only when a tensor is given

    device = audio.device
    if not torch.is_floating_point(audio):  # as for numpy: int16 PCM must be scaled by the caller
      raise ValueError(
        f'audio must hold float samples in [-1, 1]; got a torch {audio.dtype} tensor (scale int16 '
        'PCM by 1 / 32768 first).'
      )
    waves = audio.detach().to('cpu', torch.float32).numpy()

    def back(x):
      return torch.from_numpy(np.ascontiguousarray(x)).to(device)

  else:
    waves = np.asarray(audio)

    def back(x):
      return x

  if waves.ndim != 2:
    raise ValueError(
      f'audio must be [n_sounds, n_samples] at {model.sample_rate} Hz; got shape {waves.shape}.'
    )
  if not np.issubdtype(waves.dtype, np.floating):
    raise ValueError(
      f'audio must hold float samples in [-1, 1]; got dtype {waves.dtype} (scale int16 PCM by '
      '1 / 32768 first).'
    )
  return waves.astype(np.float32, copy=False), back
