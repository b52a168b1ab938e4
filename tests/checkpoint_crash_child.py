"""Child process for test_checkpoint_crash: saves step 1 completely, then starts an async save of
step 2 and announces it; the test kills this process with SIGKILL while that save is being written.

The state is large (~200 MB) so that writing it takes long enough to be interrupted.
"""

import sys

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from aasp_jax import checkpointing


def main(workdir: str) -> None:
  cfg = ConfigDict({'checkpoint': {'keep': 3, 'async_save': True}, 'seed': 0})
  ckpts = checkpointing.RunCheckpoints(workdir, cfg.checkpoint)
  rng = jax.random.key(0)
  for step in (1, 2):
    state = {'w': jnp.full((50_000_000,), float(step)), 'step': jnp.int32(step)}
    ckpts.save(step, state, rng, {'global_batches': step}, cfg)
    if step == 1:
      ckpts.wait_until_finished()
      print('saved 1', flush=True)
  print('saving 2', flush=True)
  jax.block_until_ready(state)
  import time

  time.sleep(600)  # killed before this ends


if __name__ == '__main__':
  main(sys.argv[1])
