"""Training metrics on disk: TensorBoard event files plus a JSON-lines file, written by process 0.

clu's `metric_writers` would be the natural choice, but importing it imports TensorFlow (~1.3 GB
for tensorflow-cpu) only to write event files. tensorboardX writes the same event files in pure
Python (tens of KB, protobuf is already installed), so it is used instead. The JSON-lines file is
the machine-readable record (tests compare runs with it; `plot_loss_curves` draws it).

On resume, entries written after the restored checkpoint by the interrupted run are dropped from the
JSON-lines file, and TensorBoard is told to purge them (`purge_step`), so both read as one run.
"""

import json
import math
import os

import jax

JSONL_NAME = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
LOSS_KEYS = ('loss', 'frame_loss', 'utterance_loss', 'contrastive_loss')


class MetricsWriter:
  """Writes scalars per step; a no-op on every process but 0."""

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self.jsonl_path = os.path.join(workdir, JSONL_NAME)
    self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIR)
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    _drop_entries_after(self.jsonl_path, resume_step or 0)
    from tensorboardX import SummaryWriter  # only process 0 needs it

    purge = None if resume_step is None else resume_step + 1
    self._tb = SummaryWriter(self.tensorboard_dir, purge_step=purge, flush_secs=30)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in sorted(scalars.items())}
    with open(self.jsonl_path, 'a') as f:
      f.write(json.dumps({'step': int(step), **clean}) + '\n')
    for key, value in clean.items():
      self._tb.add_scalar(key, value, global_step=step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _drop_entries_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  kept = [e for e in read_jsonl(path) if e['step'] <= step]
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(json.dumps(e) + '\n' for e in kept)
  os.replace(tmp, path)  # atomic: a crash here keeps the old file


def plot_loss_curves(jsonl_path: str, png_path: str) -> str:
  """Draws the loss terms, the learning rate, the effective rank and the online probe accuracies
  against the step into a PNG; returns its path."""
  import matplotlib

  matplotlib.use('Agg')  # no display on servers
  import matplotlib.pyplot as plt

  entries = read_jsonl(jsonl_path)
  keys = [k for k in LOSS_KEYS if any(k in e for e in entries)]
  probe_keys = sorted({k for e in entries for k in e if k.startswith('probe/')})
  fig, axes = plt.subplots(1, 4 if probe_keys else 3, figsize=(20 if probe_keys else 15, 4))
  for key in keys:
    points = [(e['step'], e[key]) for e in entries if key in e and math.isfinite(e[key])]
    axes[0].plot(*zip(*points), label=key)
  axes[0].set_xlabel('step')
  axes[0].set_ylabel('loss')
  axes[0].set_title('loss terms')
  axes[0].legend()
  lr = [(e['step'], e['learning_rate']) for e in entries if 'learning_rate' in e]
  if lr:
    axes[1].plot(*zip(*lr))
  axes[1].set_xlabel('step')
  axes[1].set_title('learning rate')
  rank = [(e['step'], e['effective_rank']) for e in entries if 'effective_rank' in e]
  if rank:
    axes[2].plot(*zip(*rank))
  axes[2].set_xlabel('step')
  axes[2].set_title('effective rank of the clip embeddings (batch)')
  for key in probe_keys:
    points = [(e['step'], e[key]) for e in entries if key in e]
    axes[3].plot(*zip(*points), marker='o', label=key[len('probe/'):])
  if probe_keys:
    axes[3].set_xlabel('step')
    axes[3].set_title('online probe accuracy (student)')
    axes[3].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
  return png_path
