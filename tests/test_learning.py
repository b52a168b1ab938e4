"""The tiny config learns on real recorded audio: 200 CPU steps, no NaN, the loss falls clearly.

Data: the committed CC0 Sonic Pi fixtures, through the real grain pipeline (random 0.65 s crops).
The learning rate is raised and the schedule shortened for a 200-step run; everything else is the
pre-training objective (teacher targets, M clones, frame + utterance + contrastive losses).
"""

import os

import jax
import numpy as np
import pytest

import train_helpers
from aasp_jax.data import pipeline
from conftest import FIXTURES

STEPS = 200


@pytest.mark.slow
def test_tiny_config_learns_on_real_audio():
  cfg, objective, tx, schedule, mesh, state, _ = train_helpers.setup(
    '', ['global_batch=8', f'total_steps={STEPS}', 'optimizer.lr=0.006', 'objective.num_clones=4']
  )
  opts = pipeline.PipelineOptions(preset=objective.preset, batch_size=cfg.global_batch, seed=0)
  batches = iter(pipeline.make_dataset(os.path.join(FIXTURES, 'audio'), opts, 0, 1))
  first = next(batches)
  abstract = {k: first[k] for k in ('waveform', 'num_samples')}
  step, _ = train_helpers.compile_for(cfg, objective, tx, schedule, mesh, abstract)
  history = []
  rng = jax.random.key(0)
  batch = first
  for i in range(STEPS):
    state, metrics = step(state, {k: batch[k] for k in abstract}, rng)
    history.append({k: float(v) for k, v in metrics.items()})
    assert np.isfinite(history[-1]['loss']), f'non-finite loss at step {i}: {history[-1]}'
    assert batch['skipped'].sum() == 0
    batch = next(batches)
  start = np.mean([h['loss'] for h in history[:10]])
  end = np.mean([h['loss'] for h in history[-10:]])
  frame_start = np.mean([h['frame_loss'] for h in history[:10]])
  frame_end = np.mean([h['frame_loss'] for h in history[-10:]])
  print(
    f'loss {start:.3f} -> {end:.3f}; frame loss {frame_start:.3f} -> {frame_end:.3f}; '
    f'effective rank {history[0]["effective_rank"]:.2f} -> {history[-1]["effective_rank"]:.2f}'
  )
  assert end < 0.7 * start
