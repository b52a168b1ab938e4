"""AdamW with warm-up + cosine (peak lr scaled linearly with the global batch), gradient clipping, and
the EMA teacher's decay schedule."""

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict


def learning_rate_schedule(opt: ConfigDict, global_batch: int, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to lr * global_batch / reference_batch, then cosine to end_lr_fraction."""
  peak = opt.lr * global_batch / opt.reference_batch
  warmup = int(opt.warmup_fraction * total_steps)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=peak * opt.end_lr_fraction,
  )


def weight_decay_mask(params):
  """Decay only matrices named 'kernel': biases, norms, tokens, gates and AaPE's Λ are left alone."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: (
      getattr(path[-1], 'key', None) == 'kernel'
      or getattr(path[-2] if len(path) > 1 else None, 'key', None) == 'kernel'
    ),
    params,
  )


def make_optimizer(opt: ConfigDict, global_batch: int, total_steps: int):
  """Returns (optax transformation, learning-rate schedule)."""
  schedule = learning_rate_schedule(opt, global_batch, total_steps)
  tx = optax.chain(
    optax.clip_by_global_norm(opt.clip_norm),
    optax.adamw(
      schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=weight_decay_mask
    ),
  )
  return tx, schedule


def ema_decay(opt: ConfigDict, step) -> jax.Array:
  """data2vec-style EMA decay: linear from ema_start to ema_end over ema_anneal_steps, then flat."""
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(opt.ema_anneal_steps, 1), 0.0, 1.0)
  return opt.ema_start + (opt.ema_end - opt.ema_start) * frac
