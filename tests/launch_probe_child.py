"""A stand-in for aasp_jax.main, started by tests/test_launch.py through local_multiprocess.py.

It accepts the distributed flags the launcher appends, joins the cluster with
jax.distributed.initialize, prints what each process sees of it, and runs one cross-process
computation: a global array built from every process's local rows and a jitted sum over a mesh of
all processes' devices (this is the collective the trainer needs, so the test shows whether CPU
multi-process works with the default collectives). `--fail_process=I` makes process I exit 3 before
joining, so the test can check that the launcher stops the others instead of hanging.
"""

import argparse
import sys


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument('--coordinator_address', required=True)
  parser.add_argument('--num_processes', type=int, required=True)
  parser.add_argument('--process_id', type=int, required=True)
  parser.add_argument('--fail_process', type=int, default=-1)
  # The launcher passes the trainer's own arguments through too; a probe ignores them.
  args, _ = parser.parse_known_args(argv)
  if args.process_id == args.fail_process:
    print('failing on purpose', flush=True)
    return 3

  import jax
  import jax.numpy as jnp
  import numpy as np

  # Without this a process whose peer died would wait for the default 300 s.
  jax.distributed.initialize(
    args.coordinator_address, args.num_processes, args.process_id, initialization_timeout=60
  )
  print(
    f'process_index={jax.process_index()} process_count={jax.process_count()} '
    f'devices={len(jax.devices())} local_devices={len(jax.local_devices())}',
    flush=True,
  )

  # Each process contributes one row per local device, filled with its index + 1, so the global
  # sum is known in closed form and only comes out right if data crossed processes.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  local = np.full((len(jax.local_devices()), 2), jax.process_index() + 1, np.float32)
  global_array = jax.make_array_from_process_local_data(sharding, local)
  total = jax.jit(jnp.sum)(global_array)
  print(f'global_sum={float(total)} collectives={jax.config.jax_cpu_collectives_implementation}')
  sys.stdout.flush()
  jax.distributed.shutdown()
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
