"""The embedding API (`aasp_jax.evaluate.embed`) and the `aasp-embed` command, on real tiny
checkpoints (width 32, depth 2, 64-frame windows) and the bundled fixture audio.

References are independent of the Embedder's chunking, batching and padding: `direct_window` takes
one window's samples of a clip, unpadded, computes the front end of that piece alone (its features
are padded to the window as the training front end pads), builds the padding mask from its frame
count, and applies the encoder to that single example; pooling is then done in numpy.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aasp_jax.audio import fbank_device
from aasp_jax.data import clips
from aasp_jax.evaluate import embed, embed_cli, pretrained
from conftest import FIXTURES

AUDIO = os.path.join(FIXTURES, 'audio')
# At 16 kHz: 3.53 s (351 frames: 6 windows of 64), 1.75 s (173 frames: 3 windows), 0.21 s (19
# frames: one window holding two patches, the second with 3 frames of the clip); perc_swash.flac is
# 0.32 s (30 frames).
LONG, MEDIUM, SHORT = 'guit_harmonics.flac', 'loop_amen.flac', 'hat_raw.flac'
BATCH = 4


@pytest.fixture(scope='module')
def waves():
  return {
    name: clips.load_clip(os.path.join(AUDIO, name), 16000)[0]
    for name in os.listdir(AUDIO)
    if name.endswith('.flac')
  }


@pytest.fixture(scope='module')
def models(tiny_checkpoints):
  return {stem: pretrained.load_pretrained(tiny_checkpoints[stem]) for stem in ('conv', 'aape')}


def padded_batch(arrays):
  """Zero-pads 1-D waveforms to the longest: ([B, S], true lengths [B])."""
  out = np.zeros((len(arrays), max(map(len, arrays))), np.float32)
  for i, a in enumerate(arrays):
    out[i, : len(a)] = a
  return out, np.array([len(a) for a in arrays])


@functools.cache
def _apply(encoder):
  return jax.jit(functools.partial(encoder.apply, return_layers=True))


def direct_window(model, wave, start_frame):
  """One window of `wave` from `start_frame`, unbatched: (cls [D], tokens [n, D], layers
  [depth, n, D], valid tokens [n] bool, n_time)."""
  p, m = model.preset, model.config.model
  length = p.window_length + (p.target_length - 1) * p.frame_shift
  piece = wave[start_frame * p.frame_shift : start_frame * p.frame_shift + length]
  x = fbank_device.features(jnp.asarray(piece)[None], p)  # this piece alone, no num_samples
  n_time, n_freq = p.target_length // m.patch_t, p.num_mel_bins // m.patch_f
  time_valid = np.arange(n_time) * m.patch_t < p.num_frames(len(piece))
  valid = np.repeat(time_valid, n_freq)
  out = _apply(model.encoder)({'params': model.params}, x, token_valid_bn=jnp.asarray(valid)[None])
  out = jax.tree.map(lambda a: np.asarray(a, np.float64), out)
  return out['cls'][0], out['tokens'][0], out['layers'][:, 0], valid, n_time


def reference_scene(model, wave, starts, pooling='cls_mean', layers=None):
  """Token-count-weighted mean over windows of [CLS, masked token mean] (numpy)."""
  parts, weights = [], []
  for s in starts:
    cls, tokens, blocks, valid, _ = direct_window(model, wave, s)
    if layers is not None:
      tokens = blocks[list(layers)].mean(axis=0)
    mean = tokens[valid].mean(axis=0)
    parts.append({'cls': cls, 'mean': mean, 'cls_mean': np.concatenate([cls, mean])}[pooling])
    weights.append(valid.sum())
  return np.average(np.stack(parts), axis=0, weights=np.array(weights, np.float64))


def test_scene_and_timestamps_match_a_direct_per_window_reference(models, waves):
  model, wave = models['conv'], waves[LONG]
  embedder = embed.Embedder(model, batch_size=BATCH)
  w = model.preset.target_length
  frames = model.preset.num_frames(len(wave))
  starts = np.arange(0, frames, w)  # hop = window: windows at 0, 64, ..., the last one padded
  assert list(embedder.window_starts(len(wave))) == list(starts) and len(starts) == 6

  scene = embedder.scene_embeddings(wave[None])
  np.testing.assert_allclose(scene[0], reference_scene(model, wave, starts), atol=2e-5, rtol=1e-5)

  emb, times = embedder.timestamp_embeddings(wave[None])
  n_time, n_freq, width = w // 16, 8, model.config.model.width
  want = []
  for s in starts:
    _, tokens, _, valid, _ = direct_window(model, wave, s)
    grid = tokens.reshape(n_time, n_freq * width)  # time-major: concat of the frequency patches
    want.append(grid[valid.reshape(n_time, n_freq)[:, 0]])
  want = np.concatenate(want)
  # Every patch with a frame of the clip, once: ceil(frames / 16) patches, centres 87.5 + 160 k ms.
  assert emb.shape == (1, -(-frames // 16), n_freq * width) == (1,) + want.shape
  np.testing.assert_allclose(emb[0], want, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(times[0], 87.5 + 160.0 * np.arange(len(want)))


def test_full_windows_need_no_mask(models, waves):
  """A clip of exactly two windows: no padding, so the plain (unmasked) encoder is the reference."""
  model = models['conv']
  p = model.preset
  wave = waves[LONG][: p.window_length + (2 * p.target_length - 1) * p.frame_shift]
  want = []
  for s in (0, p.target_length):
    chunk = wave[s * p.frame_shift :][: p.window_length + (p.target_length - 1) * p.frame_shift]
    out = model.encoder.apply({'params': model.params}, fbank_device.features(chunk[None], p))
    want.append(np.concatenate([out['cls'][0], np.mean(out['tokens'][0], axis=0)]))
  scene = embed.Embedder(model, batch_size=BATCH).scene_embeddings(wave[None])
  np.testing.assert_allclose(scene[0], np.mean(want, axis=0), atol=2e-5, rtol=1e-5)


def test_intermediate_layers_match_the_reference(models, waves):
  model, wave = models['conv'], waves[MEDIUM]
  starts = [0, 64, 128]
  embedder = embed.Embedder(model, pooling='mean', layer='average', batch_size=BATCH)
  assert embedder.layers == (0, 1)
  np.testing.assert_allclose(
    embedder.scene_embeddings(wave[None])[0],
    reference_scene(model, wave, starts, 'mean', layers=(0, 1)),
    atol=2e-5,
    rtol=1e-5,
  )
  # Another list of blocks reuses the program's options but not its static layer tuple.
  block1 = embed.Embedder(model, pooling='mean', layer=[1], batch_size=BATCH)
  np.testing.assert_allclose(
    block1.scene_embeddings(wave[None])[0],
    reference_scene(model, wave, starts, 'mean', layers=(1,)),
    atol=2e-5,
    rtol=1e-5,
  )


@pytest.mark.parametrize('stem', ['conv', 'aape'])
def test_padded_batch_equals_each_clip_alone(models, waves, stem):
  embedder = embed.Embedder(models[stem], batch_size=BATCH)
  names = [SHORT, LONG, MEDIUM]
  batch, lengths = padded_batch([waves[n] for n in names])
  before = embed.window_outputs._cache_size()
  scene = embedder.scene_embeddings(batch, lengths)
  emb, times = embedder.timestamp_embeddings(batch, lengths)
  for i, name in enumerate(names):
    alone = waves[name][None]
    np.testing.assert_allclose(scene[i], embedder.scene_embeddings(alone)[0], atol=1e-6, rtol=0)
    e, t = embedder.timestamp_embeddings(alone)
    real = np.isfinite(times[i])
    assert real.sum() == t.shape[1] and real[: t.shape[1]].all()  # padding only at the end
    np.testing.assert_array_equal(times[i, real], t[0])
    np.testing.assert_allclose(emb[i, real], e[0], atol=1e-6, rtol=0)
    assert not emb[i, ~real].any()
  # One program for scene embeddings and one for timestamps, whatever the batch and clip sizes.
  assert embed.window_outputs._cache_size() - before <= 2


def _with_window(model, frames):
  """The same encoder fed `frames`-frame windows (positions come from a fixed table)."""
  return dataclasses.replace(model, preset=dataclasses.replace(model.preset, target_length=frames))


def test_conv_short_clip_does_not_depend_on_the_window_length(models, waves):
  """Padding is fully masked: a 0.32 s clip gives the same embeddings in 64- and 128-frame windows."""
  wave = waves['perc_swash.flac']
  out = {}
  for frames in (64, 128):
    embedder = embed.Embedder(_with_window(models['conv'], frames), batch_size=BATCH)
    out[frames] = embedder.scene_embeddings(wave[None]), embedder.timestamp_embeddings(wave[None])
  np.testing.assert_allclose(out[64][0], out[128][0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[64][1][0], out[128][1][0], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(out[64][1][1], out[128][1][1])


def _with_gate(model, value):
  params = jax.tree.map(lambda a: a, model.params)  # a copy of the dict structure
  stem = dict(params['stem'])
  stem['gate'] = np.full_like(stem['gate'], value)
  params['stem'] = stem
  return dataclasses.replace(model, params=params)


def test_aape_depends_on_the_window_length_only_through_its_feature_branch(models, waves):
  """AaPE's Lambda encoder and subband mean removal see the whole window, padding included, so
  a short clip's embedding changes with the window length; with the fusion gate at 0 (the AaPE
  branch off) it does not, i.e. attention and pooling mask the padding completely."""
  wave = waves['perc_swash.flac'][None]
  model = models['aape']
  assert set(model.params['stem']) >= {'gate', 'lambda_encoder', 'conv_stem'}

  def scene(gate, frames):
    m = _with_window(_with_gate(model, gate), frames)
    return embed.Embedder(m, pooling='mean', batch_size=BATCH).scene_embeddings(wave)[0]

  np.testing.assert_allclose(scene(0.0, 64), scene(0.0, 128), atol=1e-5, rtol=0)
  assert np.abs(scene(1.0, 64) - scene(1.0, 128)).max() > 1e-3


def test_overlapping_windows_report_each_patch_once_from_the_nearest_window(models, waves):
  model, wave = models['conv'], waves[LONG]
  frames = model.preset.num_frames(len(wave))
  # Half-window hop (32 frames, a whole number of patches): window k starts at 32 k and owns the
  # patches nearest its centre, so timestamps stay on the 160 ms grid and global patch j comes
  # from window max(0, (j - 1) // 2) (patches 0, 1, 2 from window 0, then two per window).
  embedder = embed.Embedder(model, hop_seconds=0.32, batch_size=BATCH)
  emb, times = embedder.timestamp_embeddings(wave[None])
  np.testing.assert_allclose(times[0], 87.5 + 160.0 * np.arange(-(-frames // 16)))
  for j in (1, 5, 20):
    k = max(0, (j - 1) // 2)
    _, tokens, _, _, n_time = direct_window(model, wave, 32 * k)
    want = tokens.reshape(n_time, -1)[j - 2 * k]
    np.testing.assert_allclose(emb[0, j], want, atol=2e-5, rtol=1e-5)
  # A hop that is not a whole number of patches still gives strictly increasing timestamps that
  # cover the clip.
  _, times = embed.Embedder(model, hop_seconds=0.25, batch_size=BATCH).timestamp_embeddings(
    wave[None]
  )
  assert (np.diff(times[0]) > 0).all() and np.diff(times[0]).max() < 320
  assert times[0, 0] == 87.5 and times[0, -1] > (frames - 16) * 10


def test_bad_options_and_inputs_fail_clearly(models):
  model = models['conv']
  with pytest.raises(ValueError, match='CLS'):
    embed.Embedder(model, pooling='cls', layer=0)
  with pytest.raises(ValueError, match='2 blocks'):
    embed.Embedder(model, layer=5)
  with pytest.raises(ValueError, match='pooling'):
    embed.Embedder(model, pooling='max')
  with pytest.raises(ValueError, match='one window'):
    embed.Embedder(model, hop_seconds=2.0)
  embedder = embed.Embedder(model, batch_size=BATCH)
  with pytest.raises(ValueError, match='shorter than one analysis window'):
    embedder.scene_embeddings(np.zeros((2, 1000), np.float32), [1000, 300])
  with pytest.raises(ValueError, match=r'\[batch, samples\]'):
    embedder.scene_embeddings(np.zeros(16000, np.float32))


def test_cli_writes_embeddings_and_counts_a_corrupt_file(models, tiny_checkpoints, tmp_path, waves):
  folder = tmp_path / 'audio'
  folder.mkdir()
  for name in waves:
    os.symlink(os.path.join(AUDIO, name), folder / name)
  (folder / 'corrupt.flac').write_bytes(b'fLaC' + bytes(range(256)) * 8)
  out = tmp_path / 'out' / 'emb.npz'
  status = embed_cli.main(
    [
      f'--checkpoint={tiny_checkpoints["conv"]}',
      f'--input={folder}',
      f'--output={out}',
      '--timestamps',
      f'--batch_size={BATCH}',
    ]
  )
  assert status == 0
  data = np.load(out)
  names = sorted(waves)
  assert list(data['clip_ids']) == names
  embedder = embed.Embedder(models['conv'], batch_size=BATCH)
  batch, lengths = padded_batch([waves[n] for n in names])
  np.testing.assert_allclose(
    data['embeddings'], embedder.scene_embeddings(batch, lengths), atol=1e-6, rtol=0
  )
  emb, times = embedder.timestamp_embeddings(batch, lengths)
  np.testing.assert_allclose(data['timestamp_embeddings'], emb, atol=1e-6, rtol=0)
  np.testing.assert_array_equal(data['timestamps_ms'], times)
  np.testing.assert_array_equal(data['num_timestamps'], np.isfinite(times).sum(axis=1))

  summary = json.loads((tmp_path / 'out' / 'emb.json').read_text())
  assert summary['embedded'] == 4 and summary['clips'] == 5
  assert summary['skipped'] == dict.fromkeys(clips.SKIP_REASONS, 0) | {'unreadable': 1}
  assert [c['clip_id'] for c in summary['skipped_clips']] == ['corrupt.flac']
  assert summary['clips_per_second'] > 0


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys):
  status = embed_cli.main(
    [f'--checkpoint={tmp_path / "nope"}', f'--input={AUDIO}', f'--output={tmp_path / "x.npz"}']
  )
  assert status == 1
  assert 'no such checkpoint folder' in capsys.readouterr().err
