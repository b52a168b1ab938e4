"""Per-host batches become global jax.Arrays sharded over ('data', 'fsdp') on 8 fake CPU devices."""

import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from aasp_jax.data import pipeline  # noqa: E402


def test_global_arrays_match_the_host_batch_shard_by_shard():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2, 1), ('data', 'fsdp', 'tensor'), axis_types=(AxisType.Explicit,) * 3)
  sharding = NamedSharding(mesh, P(('data', 'fsdp')))
  rng = np.random.default_rng(0)
  batch = {
    'waveform': rng.standard_normal((8, 100)).astype(np.float32),
    'num_samples': np.arange(8, dtype=np.int32),
    'skipped': np.zeros(6, np.int64),
  }
  out = pipeline.to_global_arrays(batch, sharding)
  assert set(out) == {'waveform', 'num_samples'}  # host bookkeeping stays on the host
  np.testing.assert_array_equal(np.asarray(out['waveform']), batch['waveform'])
  assert out['waveform'].sharding.spec == P(('data', 'fsdp'), None)
  for shard in out['waveform'].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), batch['waveform'][shard.index])
    assert shard.data.shape == (1, 100)
