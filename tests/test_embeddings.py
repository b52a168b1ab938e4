"""Clip embeddings through the grain pipeline equal a direct per-clip computation, in entry order,
with one compiled forward pass, and unusable clips are counted instead of lost.

The direct reference decodes each bundled clip on the host (`decode.load_audio`), keeps its first
crop, computes the device features of that one unpadded clip and applies the encoder: no pipeline,
no batching, no padding.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aasp_jax import configuration
from aasp_jax.audio import decode, fbank_device
from aasp_jax.data import clips, manifest
from aasp_jax.evaluate import embeddings
from aasp_jax.models import build
from conftest import REPO_ROOT

AUDIO = os.path.join(REPO_ROOT, 'data', 'sonicpi', 'audio')
# (file, why it is here). Sample counts at 16 kHz; the crop is 10,480 samples (64 frames).
CLIPS = [
  ('ambi_choir.flac', 'longer than the crop (25,145)'),
  ('hat_bdu.flac', 'shorter than one patch (1,563): zero-padded, kept'),
  ('corrupt.flac', 'not audio: skipped as unreadable'),
  ('loop_amen.flac', 'longer than the crop (28,053)'),
  ('elec_tick.flac', 'shorter than one window (311): skipped as too_short'),
  ('bd_808.flac', 'shorter than the crop (8,957)'),
  ('tabla_ke1.flac', 'just over one window (695); alone in the last, padded batch'),
]
BATCH = 2


@pytest.fixture(scope='module')
def model():
  cfg = configuration.load_config(
    'configs/pretrain.py:variant=tiny,target_length=64',
    [
      'model.dtype=float32',
      'model.depth=2',
      'model.width=32',
      'model.num_heads=2',
      'model.mlp_dim=64',
      'model.aape.num_modes=2',
    ],
  )
  encoder = build.build_encoder(cfg.model)
  preset = configuration.frontend_preset(cfg)
  x = jnp.zeros(configuration.input_shape(cfg), jnp.float32)
  # Jitted: an eager init of the AaPE stem takes several times longer than compiling it.
  params = jax.device_get(jax.jit(encoder.init)(jax.random.key(0), x)['params'])
  return encoder, params, preset


@pytest.fixture(scope='module')
def entries(tmp_path_factory):
  folder = tmp_path_factory.mktemp('clips')
  with open(folder / 'corrupt.flac', 'wb') as f:
    f.write(b'fLaC' + bytes(range(256)) * 8)  # a FLAC signature, then garbage
  rows = []
  for name, _ in CLIPS:
    path = folder / name if name == 'corrupt.flac' else os.path.join(AUDIO, name)
    rows.append(f'{path},{name.split("_")[0]}\n')
  with open(folder / 'clips.csv', 'w') as f:
    f.write('path,label\n' + ''.join(rows))
  return manifest.read_manifest(folder / 'clips.csv')


@pytest.fixture(scope='module')
def result(model, entries):
  encoder, params, preset = model
  before = embeddings.embed_waveforms._cache_size()  # noqa: SLF001
  out = embeddings.clip_embeddings(encoder, params, preset, entries, batch_size=BATCH)
  compiled = embeddings.embed_waveforms._cache_size() - before  # noqa: SLF001
  return out, compiled


def direct_embedding(apply, params, preset, path):
  crop = preset.window_length + (preset.target_length - 1) * preset.frame_shift
  wave = decode.load_audio(path, preset.sample_rate)[:crop]
  features = fbank_device.features(jnp.asarray(wave)[None], preset)
  out = apply({'params': params}, features)
  return np.concatenate([out['cls'][0], np.mean(out['tokens'][0], axis=0)])


def test_embeddings_equal_the_direct_per_clip_computation(model, entries, result):
  encoder, params, preset = model
  out, _ = result
  kept = [i for i, (name, _) in enumerate(CLIPS) if name not in ('corrupt.flac', 'elec_tick.flac')]
  np.testing.assert_array_equal(out.indices, kept)
  assert out.embeddings.shape == (len(kept), 2 * encoder.width)
  assert out.embeddings.dtype == np.float32
  apply = jax.jit(encoder.apply)  # one input shape: compiles once (eager would be slower)
  for row, index in enumerate(out.indices):
    want = direct_embedding(apply, params, preset, entries[index].path)
    # Measured <= 7e-7 (float32 rounding of batched vs single-clip matmuls).
    np.testing.assert_allclose(out.embeddings[row], want, atol=1e-5, err_msg=CLIPS[index][0])


def test_unusable_clips_are_counted_not_lost(entries, result):
  out, _ = result
  want = dict.fromkeys(clips.SKIP_REASONS, 0)
  want.update(unreadable=1, too_short=1)
  assert out.skipped == want
  assert out.num_skipped + len(out.indices) == len(entries)


def test_one_compiled_forward_for_all_batches(result):
  # Three batches (2, 2 and a padded 1): the padded tail must not compile a second program.
  _, compiled = result
  assert compiled == 1
