"""The HEAR 2021 API (`aasp_jax.evaluate.hear`) on a real tiny AaPE checkpoint (64-frame, 0.64 s
windows), so 2 s sounds are cut into several windows.

What HEAR specifies: `load_model(path)` returns a model with `sample_rate`, `scene_embedding_size`
and `timestamp_embedding_size`; `get_scene_embeddings(audio [n, samples], model)` returns float32
[n, scene_embedding_size]; `get_timestamp_embeddings` returns float32 [n, T, size] and timestamps
[n, T] in milliseconds, increasing. Each sound must be embedded independently of its batch.
"""

import os

import numpy as np
import pytest

from aasp_jax.data import clips
from aasp_jax.evaluate import hear
from conftest import FIXTURES

SECONDS = 2.0  # 198 frames: 4 windows of 64 frames, the last one padded


@pytest.fixture(scope='module')
def model(tiny_checkpoints):
  return hear.load_model(tiny_checkpoints['aape'], batch_size=4)


@pytest.fixture(scope='module')
def audio():
  """[3, 2 s]: two real recordings (one looped to length) and quiet noise, float32 at 16 kHz."""
  n = int(SECONDS * 16000)
  folder = os.path.join(FIXTURES, 'audio')
  guitar = clips.load_clip(os.path.join(folder, 'guit_harmonics.flac'))[0][:n]
  amen = np.resize(clips.load_clip(os.path.join(folder, 'loop_amen.flac'))[0], n)
  noise = 0.05 * np.random.default_rng(0).standard_normal(n)
  return np.stack([guitar, amen, noise]).astype(np.float32)


def test_model_attributes(model):
  assert model.sample_rate == 16000 and isinstance(model.sample_rate, int)
  width = (
    32  # the tiny checkpoint's width; defaults: [CLS, mean] scene, 8 concatenated freq patches
  )
  assert (model.scene_embedding_size, model.timestamp_embedding_size) == (2 * width, 8 * width)


def test_shapes_types_and_timestamps(model, audio):
  scene = hear.get_scene_embeddings(audio, model)
  assert isinstance(scene, np.ndarray) and scene.dtype == np.float32
  assert scene.shape == (3, model.scene_embedding_size) and np.isfinite(scene).all()

  emb, times = hear.get_timestamp_embeddings(audio, model)
  frames = 1 + (audio.shape[1] - 400) // 160
  num_timestamps = -(-frames // 16)  # every time patch that holds a frame of the sound
  assert emb.dtype == np.float32 and times.dtype == np.float32
  assert emb.shape == (3, num_timestamps, model.timestamp_embedding_size)
  assert times.shape == (3, num_timestamps) and np.isfinite(emb).all()
  # Patch centres: 87.5 ms (16 frames of 10 ms with a 25 ms window), then one every 160 ms, the
  # same for every sound, across the window boundaries at 640, 1280 and 1920 ms.
  np.testing.assert_array_equal(times, np.tile(87.5 + 160.0 * np.arange(num_timestamps), (3, 1)))
  # Different sounds give different embeddings (the model is not constant).
  assert np.abs(scene[0] - scene[2]).max() > 1e-3


def test_batch_equals_per_sound_calls(model, audio):
  scene = hear.get_scene_embeddings(audio, model)
  emb, times = hear.get_timestamp_embeddings(audio, model)
  for i in range(len(audio)):
    np.testing.assert_allclose(
      hear.get_scene_embeddings(audio[i : i + 1], model)[0], scene[i], atol=1e-6, rtol=0
    )
    e, t = hear.get_timestamp_embeddings(audio[i : i + 1], model)
    np.testing.assert_allclose(e[0], emb[i], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(t[0], times[i])


def test_overlapping_windows_keep_timestamps_increasing(tiny_checkpoints, audio):
  # A 0.2 s hop (20 frames) is not a whole number of 16-frame patches: the windows' patch grids
  # are offset from one another, and each patch is taken from the window centred nearest to it.
  model = hear.load_model(tiny_checkpoints['aape'], hop_seconds=0.2, batch_size=4)
  emb, times = hear.get_timestamp_embeddings(audio[:1], model)
  steps = np.diff(times[0])
  assert (steps > 0).all() and steps.max() < 2 * 160
  assert times[0, 0] == 87.5 and times[0, -1] >= SECONDS * 1000 - 160
  assert emb.shape == (1, len(times[0]), model.timestamp_embedding_size)


def test_bad_calls_fail_clearly(model, audio):
  with pytest.raises(ValueError, match='model_file_path'):
    hear.load_model('')
  with pytest.raises(ValueError, match=r'\[n_sounds, n_samples\]'):
    hear.get_scene_embeddings(audio[0], model)
  with pytest.raises(ValueError, match='float'):
    hear.get_scene_embeddings((audio * 32767).astype(np.int16), model)


def test_torch_tensors_round_trip(model, audio):
  torch = pytest.importorskip('torch')
  scene = hear.get_scene_embeddings(torch.from_numpy(audio), model)
  emb, times = hear.get_timestamp_embeddings(torch.from_numpy(audio), model)
  assert isinstance(scene, torch.Tensor) and scene.dtype == torch.float32
  assert isinstance(emb, torch.Tensor) and isinstance(times, torch.Tensor)
  np.testing.assert_allclose(scene.numpy(), hear.get_scene_embeddings(audio, model), atol=1e-6)


def test_torch_integer_audio_is_rejected_like_numpy(model, audio):
  # An int16 tensor used to be cast to float without scaling: values up to 32767, silently.
  torch = pytest.importorskip('torch')
  pcm = torch.from_numpy((audio * 32767).astype(np.int16))
  with pytest.raises(ValueError, match='torch.int16'):
    hear.get_scene_embeddings(pcm, model)
  with pytest.raises(ValueError, match='torch.int16'):
    hear.get_timestamp_embeddings(pcm, model)
