"""The fine-tuning model and its step: encoder + linear CLS head, AdamW with layer-wise lr decay,
and the pure train / eval steps.

train_step: log-mel -> mixup -> SpecAugment -> random token dropping -> encoder with stochastic
depth -> head -> softmax cross-entropy (single-label) or sigmoid BCE (multi-label) -> AdamW with
layer-wise lr decay and a warm-up + cosine schedule. `trainer.Finetuner` jits both steps with
explicit shardings (parameters replicated, the batch split along 'data').
"""

import dataclasses
from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from aasp_jax.audio import fbank_device
from aasp_jax.evaluate import augment
from aasp_jax.train import optimizer as optimizer_lib

# Model.


class ClsHead(nn.Module):
  """A linear classifier on the CLS token, initialised near zero (MAE / Audio-MAE: std 2e-5)."""

  num_classes: int

  @nn.compact
  def __call__(self, cls_bd):
    dense = nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(2e-5))
    return dense(cls_bd.astype(jnp.float32))


class Classifier(nn.Module):
  """Encoder + CLS head; parameters {'encoder': ..., 'head': ...}."""

  encoder: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, x_btf, visible_idx=None, deterministic: bool = True):
    out = self.encoder(x_btf, visible_idx=visible_idx, deterministic=deterministic)
    return ClsHead(self.num_classes, name='head')(out['cls'])


# Optimizer: AdamW with layer-wise lr decay.


def layer_id(path: Sequence[str], depth: int) -> int:
  """The lr-decay layer of a parameter: stem, a learned position table, CLS token and the
  post-LN encoders' input norm 0, block i i + 1, the final norm and the head depth + 1."""
  top, name = path[0], path[1] if len(path) > 1 else ''
  if top == 'head':
    return depth + 1
  if top == 'encoder':
    if name in ('stem', 'cls', 'posemb', 'input_norm'):
      return 0
    if name.startswith('blocks_') and name[len('blocks_') :].isdigit():
      return int(name[len('blocks_') :]) + 1
    if name == 'norm':
      return depth + 1
  raise ValueError(f'No lr-decay layer for parameter {"/".join(path)!r}.')


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def layer_scales(params, depth: int, decay: float):
  """The lr multiplier of every parameter: decay ** (depth + 1 - layer_id)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: float(decay ** (depth + 1 - layer_id(_names(path), depth))), params
  )


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update leaf by a constant (the per-layer lr multipliers)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(opt: ConfigDict, params, depth: int, total_steps: int):
  """AdamW whose lr (and so weight decay, as in PyTorch's per-group AdamW) is scaled per layer.
  Returns (transformation, schedule)."""
  warmup = int(opt.warmup_fraction * total_steps)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, opt.lr, warmup, max(total_steps, warmup + 1), end_value=0.0
  )
  clip = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []
  tx = optax.chain(
    *clip,
    optax.scale_by_adam(b1=opt.b1, b2=opt.b2),
    optax.add_decayed_weights(opt.weight_decay, mask=optimizer_lib.weight_decay_mask),
    optax.scale_by_learning_rate(schedule),
    scale_by_tree(layer_scales(params, depth, opt.layer_decay)),
  )
  return tx, schedule


# Step.


@flax.struct.dataclass
class FinetuneState:
  step: jax.Array
  params: dict  # {'encoder', 'head'}
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """The train step's static augmentation settings (hashable)."""

  mixup: float
  time_masks: int
  time_width: int
  freq_masks: int
  freq_width: int
  mask_value: float
  token_mask_ratio: float

  @classmethod
  def from_config(cls, config: ConfigDict) -> 'Augmentation':
    s = config.specaug
    return cls(
      float(config.mixup),
      s.time_masks,
      s.time_width,
      s.freq_masks,
      s.freq_width,
      float(s.mask_value),
      float(config.token_mask_ratio),
    )


def classification_loss(logits_bc, targets_bc, multilabel: bool) -> jax.Array:
  """Mean sigmoid BCE over classes and clips (multi-label) or soft-target softmax CE."""
  logits_bc = logits_bc.astype(jnp.float32)
  if multilabel:
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits_bc, targets_bc))
  return jnp.mean(optax.softmax_cross_entropy(logits_bc, targets_bc))


def augmented_inputs(rng, batch, preset, aug: Augmentation, grid: tuple[int, int]):
  """(features, targets, visible token indices or None) of a training batch."""
  r_mix, r_spec, r_tok = jax.random.split(rng, 3)
  x_btf = fbank_device.features(batch['waveform'], preset, batch['num_samples'])
  y_bc = batch['labels'].astype(jnp.float32)
  if aug.mixup > 0:
    mixed = augment.mixup(r_mix, x_btf, y_bc, aug.mixup)
    x_btf, y_bc = mixed.features, mixed.labels
  if aug.time_masks or aug.freq_masks:
    x_btf = augment.spec_augment(
      r_spec,
      x_btf,
      time_masks=aug.time_masks,
      time_width=aug.time_width,
      freq_masks=aug.freq_masks,
      freq_width=aug.freq_width,
      mask_value=aug.mask_value,
    ).features
  visible = None
  if aug.token_mask_ratio > 0:
    visible = augment.random_keep_indices(
      r_tok, x_btf.shape[0], grid[0] * grid[1], aug.token_mask_ratio
    )
  return x_btf, y_bc, visible


def train_step(state, batch, rng, *, model, preset, tx, schedule, aug, grid, multilabel):
  """(state, batch, base rng) -> (new state, metrics); pure, jitted by `Finetuner`."""
  step_rng = jax.random.fold_in(rng, state.step)
  r_aug, r_drop = jax.random.split(step_rng)
  with nn.logical_axis_rules(()):
    x_btf, y_bc, visible = augmented_inputs(r_aug, batch, preset, aug, grid)

    def loss_fn(params):
      logits = model.apply(
        {'params': params}, x_btf, visible, deterministic=False, rngs={'dropout': r_drop}
      )
      return classification_loss(logits, y_bc, multilabel)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  out = {
    'loss': loss,
    'grad_norm': optax.tree.norm(grads),
    'learning_rate': schedule(state.step),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out


def eval_step(params, batch, *, model, preset, multilabel):
  """Scores [B, C] (sigmoid or softmax) of a batch of waveforms, deterministic."""
  with nn.logical_axis_rules(()):
    x_btf = fbank_device.features(batch['waveform'], preset, batch['num_samples'])
    logits = model.apply({'params': params}, x_btf).astype(jnp.float32)
  return jax.nn.sigmoid(logits) if multilabel else jax.nn.softmax(logits)
