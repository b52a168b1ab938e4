"""The metrics writer: JSON lines and TensorBoard event files agree, a resume drops what the
interrupted run logged after its checkpoint, and the loss-curve PNG is a real image."""

import glob
import json
import struct

import numpy as np
from tensorboardX.proto import event_pb2

from aasp_jax.train import metrics_writer


def read_events(folder) -> list[tuple[int, str, float]]:
  """(step, tag, value) from TFRecord-framed event files, parsed without tensorboardX's writer."""
  out = []
  for path in sorted(glob.glob(f'{folder}/events.out.tfevents.*')):
    data = open(path, 'rb').read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos : pos + 8])
      record = data[pos + 12 : pos + 12 + length]  # skip the length's CRC
      pos += 12 + length + 4  # and the record's CRC
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        out.append((event.step, value.tag, value.simple_value))
  return out


def test_jsonl_and_tensorboard_hold_the_same_scalars(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write(step, {'loss': 1.0 / step, 'learning_rate': np.float32(1e-3 * step)})
  writer.close()
  lines = metrics_writer.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [e['step'] for e in lines] == [1, 2, 3]
  events = read_events(tmp_path / 'tensorboard')
  for e in lines:
    for tag in ('loss', 'learning_rate'):
      (value,) = [v for s, t, v in events if s == e['step'] and t == tag]
      np.testing.assert_allclose(value, e[tag], rtol=1e-6)


def test_resume_drops_entries_after_the_checkpoint(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  for step in range(1, 6):
    writer.write(step, {'loss': float(step)})
  writer.close()
  resumed = metrics_writer.MetricsWriter(str(tmp_path), resume_step=3)
  for step in (4, 5):
    resumed.write(step, {'loss': 10.0 * step})
  resumed.close()
  lines = metrics_writer.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [(e['step'], e['loss']) for e in lines] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50)]


def test_loss_curve_png(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  with open(path, 'w') as f:
    for step in range(1, 11):
      entry = {'step': step, 'loss': 3.0 / step, 'frame_loss': 1.0 / step, 'learning_rate': 1e-3}
      f.write(json.dumps(entry) + '\n')
  png = metrics_writer.plot_loss_curves(str(path), str(tmp_path / 'loss.png'))
  import matplotlib.image

  image = matplotlib.image.imread(png)
  assert image.shape[0] >= 300 and image.shape[1] >= 800
  assert image.std() > 0.01  # something was drawn


def test_curve_png_adds_effective_rank_and_online_probe_panels(tmp_path):
  import matplotlib.image

  path = tmp_path / 'metrics.jsonl'
  with open(path, 'w') as f:
    for step in range(1, 11):
      entry = {'step': step, 'loss': 3.0 / step, 'learning_rate': 1e-3, 'effective_rank': step}
      f.write(json.dumps(entry) + '\n')
      if step % 5 == 0:
        f.write(json.dumps({'step': step, 'probe/sonicpi/linear': 0.3 + step / 100}) + '\n')
  without = tmp_path / 'no_probe.jsonl'
  without.write_text(''.join(line for line in open(path) if 'probe/' not in line))
  wide = matplotlib.image.imread(metrics_writer.plot_loss_curves(str(path), str(tmp_path / 'a.png')))
  narrow = matplotlib.image.imread(
    metrics_writer.plot_loss_curves(str(without), str(tmp_path / 'b.png'))
  )
  assert wide.shape[1] > narrow.shape[1]  # a fourth panel for the probe
  # The rank panel (third of three) holds a drawn curve: its region is not blank.
  third = narrow[:, 2 * narrow.shape[1] // 3 :]
  assert third.std() > 0.01
