"""AdamW with warm-up + cosine (peak lr scaled linearly with the global batch), gradient clipping, and
the EMA teacher's decay schedule.

Two switches make it the optimizer EAT's pre-training ran (fairseq 3d262bb2, EAT 06c1c34):
  optimizer.adam='fairseq': fairseq's Adam (fairseq/optim/adam.py:212-234): the moments as Adam's,
    but eps is added to sqrt(v) before the bias correction, p -= lr * sqrt(1 - b2^t) / (1 - b1^t)
    * m / (sqrt(v) + eps), i.e. AdamW with eps / sqrt(1 - b2^t) in place of eps (4.5x larger at
    t = 1 with b2 = 0.95); decoupled weight decay p -= lr * wd * p as AdamW's. 'optax': optax.adamw.
  optimizer.decay_params='all': weight decay on every parameter. EAT asks for no decay on 1-D
    tensors and biases (models/EAT_pretraining.py:272-274), but fairseq's composite optimizer only
    applies `weight_decay_scale` when the group's optimizer config has a key 'optimizer_config',
    which an Adam config never has (fairseq/optim/composite.py:139-148), so every trainable tensor
    of EAT's run was decayed at 0.05. 'kernels' (AaSP): only Dense / Conv kernels.
Gradient clipping is the same in both: EAT ran in fp16, whose FP16Optimizer.clip_grad_norm scales
by max_norm / norm when norm > max_norm, without the 1e-6 of the fp32 path
(fairseq/optim/fp16_optimizer.py:191-211), which is optax.clip_by_global_norm.
The schedules agree as they are: fairseq's cosine scheduler sets lr(num_updates) after each update,
so update k uses lr(k - 1) (0 at k = 1), as optax's schedule(step) with step = k - 1.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from aasp_jax import later_fields

ADAMS = ('optax', 'fairseq')
DECAY_PARAMS = ('kernels', 'all')


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
  """Decay only matrices named 'kernel': biases, norms, tokens, gates and AaPE's Λ are left alone.

  (optimizer.decay_params='kernels', AaSP's default; 'all' decays every parameter, as EAT's run.)"""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: (
      getattr(path[-1], 'key', None) == 'kernel'
      or getattr(path[-2] if len(path) > 1 else None, 'key', None) == 'kernel'
    ),
    params,
  )


class FairseqAdamState(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_fairseq_adam(b1: float, b2: float, eps: float = 1e-8) -> optax.GradientTransformation:
  """fairseq's Adam direction m / (sqrt(v) + eps) * sqrt(1 - b2^t) / (1 - b1^t) (adam.py:212-234).

  Moments in float32 as fairseq keeps them (fp32 master parameters); the learning rate and the
  sign are applied by the chain (`optax.scale_by_learning_rate`).
  """

  def init_fn(params):
    zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)  # noqa: E731
    return FairseqAdamState(
      jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params)
    )

  def update_fn(updates, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, updates)
    t = count.astype(jnp.float32)
    step_size = jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    out = jax.tree.map(
      lambda m, v, g: (step_size * m / (jnp.sqrt(v) + eps)).astype(g.dtype), mu, nu, updates
    )
    return out, FairseqAdamState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f'optimizer.{key}={value!r} is not valid; choose one of {choices}.')


def make_optimizer(opt: ConfigDict, global_batch: int, total_steps: int):
  """Returns (optax transformation, learning-rate schedule)."""
  schedule = learning_rate_schedule(opt, global_batch, total_steps)
  # Keys added with EAT's optimizer: a config saved without them means AaSP's.
  adam = later_fields.get(opt, 'optimizer.adam')
  decay_params = later_fields.get(opt, 'optimizer.decay_params')
  _check_choice('adam', adam, ADAMS)
  _check_choice('decay_params', decay_params, DECAY_PARAMS)
  mask = weight_decay_mask if decay_params == 'kernels' else None
  if adam == 'optax':
    direction = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=mask)
  else:
    direction = optax.chain(
      scale_by_fairseq_adam(opt.b1, opt.b2),
      optax.add_decayed_weights(opt.weight_decay, mask=mask),
      optax.scale_by_learning_rate(schedule),
    )
  tx = optax.chain(optax.clip_by_global_norm(opt.clip_norm), direction)
  return tx, schedule


def ema_decay(opt: ConfigDict, step) -> jax.Array:
  """data2vec-style EMA decay: linear from ema_start to ema_end over ema_anneal_steps, then flat.

  `step` is the number of optimizer updates made, the new parameters' count: the EMA that follows
  update k uses ema_decay(k), as EAT's set_num_updates(k) anneals on k
  (models/EAT_pretraining.py:356-380, models/base.py:486-491)."""
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(opt.ema_anneal_steps, 1), 0.0, 1.0)
  return opt.ema_start + (opt.ema_end - opt.ema_start) * frac
