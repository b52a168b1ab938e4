"""The Quick-start main job: a tiny AaSP encoder pre-trained for a few CPU minutes (600 steps) on
the bundled CC0 Sonic Pi recordings (data/sonicpi), then scored with the shared probe protocol on
both bundled tasks against random encoders and log-mel statistics (aasp_jax/quickstart.py).

  python -m aasp_jax.quickstart                     # what `make demo` runs
  aasp-pretrain --config=configs/quickstart.py --workdir=runs/quickstart   # the training part alone

Same objective, optimizer and code path as configs/pretrain.py; only sizes and the schedule are
small. `benchmarks/learning.py` runs this config (600 steps) with its variants and seeds; the
online probe here draws the probe curve of the run's PNG.
"""

import os

from configs import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SONICPI = os.path.join(REPO, 'data', 'sonicpi')


def get_config(arg: str | None = None):
  config = pretrain.get_config('variant=tiny,target_length=256' + (',' + arg if arg else ''))
  config.model.dtype = 'float32'  # bf16 matmuls are slower than fp32 on most CPUs
  config.objective.num_clones = 4
  config.objective.projection_hidden = 128
  config.objective.projection_dim = 64
  config.optimizer.lr = 1e-3
  config.optimizer.warmup_fraction = 0.1
  # The EMA must move within a few hundred steps for the teacher's targets to improve.
  config.optimizer.ema_start = 0.99
  config.optimizer.ema_end = 0.999
  config.optimizer.ema_anneal_steps = 600
  config.global_batch = 16
  config.total_steps = 600
  config.mesh.data = -1
  config.data.train = os.path.join(SONICPI, 'labels.csv')
  config.data.read_threads = 2
  # 32 of the 206 clips are single hits shorter than one patch (0.185 s); keep them, zero-padded,
  # as the probe does. Only clips without one 25 ms analysis window are skipped.
  config.data.min_samples = 400
  config.checkpoint.every_steps = 100
  config.logging.log_every_steps = 10
  # The shared probe protocol on both bundled tasks, online every 200 steps (the PNG draws it)
  # and at the end against random encoders and log-mel statistics (aasp_jax/quickstart.py).
  config.probe.tasks = ','.join(
    os.path.join(REPO, 'data', name, 'task.csv') for name in ('sonicpi', 'gm_instruments')
  )
  config.probe.every_steps = 200
  return config
