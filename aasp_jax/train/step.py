"""The AaSP train step: one jit over a global batch.

Per step: log-mel on device; the EMA teacher runs ONCE per clip and gives targets (top-k block
outputs, instance-normalised, averaged, layer-normalised); inverse block masks are drawn on device
for M clones per clip; the student's stem runs once per clip and each clone encodes only its visible
tokens; the cross-attention predictor predicts the teacher targets at the masked positions; the loss
is frame MSE + utterance MSE + the multi-mask contrastive InfoNCE over the whole global batch of
clones; AdamW updates the student and the teacher follows by EMA.

Objective switches (static fields of `AaSPObjective`, all defaulting to the above):
- kind='mae': the targets are the clip's own (per-patch normalised) log-mel patches, as Audio-MAE;
  no teacher runs (the EMA update still does, so checkpoints and evaluation are unchanged) and the
  utterance term is 0. frame_loss is then the reconstruction loss.
- loss_scale='eat', utterance_reduction='eat', target_layers='ffn': EAT's d2v_loss scaling, its
  CLS-term weight (rows per GPU) and its FFN-output targets (see aasp_jax/losses.py, models/vit.py).
- predictor=cnn with cnn_mask_fill='noise': EAT's decoder, whose masked cells get fresh
  N(0, 0.01) noise each step (drawn here from the step's key, `step_randomness`).
- stem_input='masked': the student's stem runs per clone row on the log-mel with the masked patches
  set to 0, so no visible token sees masked frames through the stem's receptive field.
- context_metric: also log frame_loss_shuffled, the loss when every row's predictor gets the
  visible tokens of another clip's clone (its own positions): how much the predictor needs content.

`recipe=eat` (configs/common.py) sets every switch to EAT's value; tests/test_eat_step.py holds
this step equal to EAT's own, re-stated in PyTorch, over several updates.

Clone rows are clip-major: rows b*M .. b*M + M - 1 are the clones of clip b.
"""

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from aasp_jax import losses, masking
from aasp_jax.models.vit import gather_tokens
from aasp_jax.train.objective import AaSPObjective, predictor_extras
from aasp_jax.train.optimizer import ema_decay
from aasp_jax.train import state as state_lib
from aasp_jax.train.state import TrainState


def teacher_forward(objective: AaSPObjective, teacher_params, x_btf) -> jax.Array:
  """Teacher targets [B, N, D] for whole clips (no masking, no gradient)."""
  out = objective.encoder.apply(
    {'params': teacher_params}, x_btf, return_layers=True, layer_source=objective.target_layers
  )
  targets = losses.teacher_targets(out['layers'], objective.top_k_layers)
  return jax.lax.stop_gradient(targets)


def masked_log_mel(objective: AaSPObjective, x_btf, mask_rn) -> jax.Array:
  """Each clone row's log-mel [R, T, F] with its masked patches set to 0 (the normalised mean)."""
  n_time, n_freq = objective.grid
  patch_t, patch_f = objective.patch
  rows = mask_rn.shape[0]
  clip_of_row = jnp.arange(rows) // objective.num_clones
  mask_rtf = jnp.repeat(
    jnp.repeat(mask_rn.reshape(rows, n_time, n_freq), patch_t, axis=1), patch_f, axis=2
  )
  return jnp.where(mask_rtf, jnp.zeros((), x_btf.dtype), x_btf[clip_of_row])


def student_tokens(objective: AaSPObjective, encoder_params, x_btf, masks) -> jax.Array:
  """Each clone row's visible tokens [R = B * M, V, D] (stem + positions), before the blocks.

  stem_input='full': the stem runs once per clip and each clone gathers its visible tokens.
  stem_input='masked': the stem runs once per clone row on `masked_log_mel`, so a visible token can
  carry nothing of the masked patches (AaPE's long kernel would otherwise reach into them).
  """
  o, enc = objective, {'params': encoder_params}
  if o.stem_input == 'masked':
    tokens_rnd, _ = o.encoder.apply(enc, masked_log_mel(o, x_btf, masks.mask), method='embed')
    return gather_tokens(tokens_rnd, masks.visible_idx)
  tokens_bnd, _ = o.encoder.apply(enc, x_btf, method='embed')  # the stem runs once per clip
  clip_of_row = jnp.arange(masks.visible_idx.shape[0]) // o.num_clones
  # Gather each clone's visible tokens from its clip without materialising B*M full copies.
  return tokens_bnd[clip_of_row[:, None], masks.visible_idx]


def step_randomness(objective: AaSPObjective, rng: jax.Array, step, num_clips: int):
  """The step's random draws from the base key and the update count: (masks for the B * M clone
  rows, the predictor's mask noise or None). Public so that a test can hand the same draws to a
  reference implementation."""
  step_rng = jax.random.fold_in(rng, step)
  masks = masking.inverse_block_mask(
    step_rng, num_clips * objective.num_clones, objective.grid, objective.mask_ratio,
    objective.mask_block_size, objective.mask_centres,
  )
  noise = objective.draw_mask_noise(jax.random.fold_in(step_rng, 1), masks.masked_idx)
  return masks, noise


def student_loss(
  objective: AaSPObjective, params, x_btf, targets_bnd, masks, clones_per_target=None,
  mask_noise=None,
):
  """Total loss and its parts for the M masked clones of every clip.

  `targets_bnd` holds one target per clip (`clones_per_target` = M, the AaSP design) or, for the
  naive baseline, one per clone row (`clones_per_target` = 1). For kind='mae' they are the
  `losses.mae_targets` patches of each clip. `mask_noise`: EAT's decoder fill (`step_randomness`).
  """
  o, m = objective, objective.num_clones
  per_target = m if clones_per_target is None else clones_per_target
  batch = x_btf.shape[0]
  enc = {'params': params['encoder']}
  visible_rvd = student_tokens(o, params['encoder'], x_btf, masks)
  out = o.encoder.apply(enc, visible_rvd, method='encode_tokens')

  def predict_loss(predictor_params, context_rvd):
    pred_rkd = o.predictor.apply(
      {'params': predictor_params},
      context_rvd,
      masks.visible_idx,
      masks.masked_idx,
      o.grid,
      **predictor_extras(mask_noise),
    )
    if o.kind == 'mae':
      return pred_rkd, losses.mae_loss(pred_rkd, targets_bnd, masks.masked_idx, per_target)
    return pred_rkd, losses.frame_loss(
      pred_rkd, targets_bnd, masks.masked_idx, per_target, o.loss_scale
    )

  pred_rkd, frame = predict_loss(params['predictor'], out['tokens'])
  if o.kind == 'mae':
    utterance = jnp.zeros((), jnp.float32)  # no teacher: the utterance target is not defined
    total = frame
  else:
    utterance = losses.utterance_loss(
      out['cls'],
      targets_bnd,
      per_target,
      o.loss_scale,
      o.utterance_reduction,
      rows_per_worker=o.eat_clips_per_worker * o.num_clones,
    )
    total = frame + o.utterance_weight * utterance
  aux = {
    'frame_loss': frame,
    'utterance_loss': utterance,
    'prediction_std': losses.variance(pred_rkd),
    # RankMe of the clip embeddings (clones' CLS averaged per clip): the collapse signal.
    'effective_rank': losses.effective_rank(
      out['cls'].astype(jnp.float32).reshape(batch, m, -1).mean(axis=1)
    ),
  }
  if o.context_metric:
    # Row r gets the visible outputs of row r + M (a clone of the next clip, wrapping) but keeps its
    # own indices: the loss the predictor reaches from positions alone. Needs B >= 2 to differ.
    shuffled_rvd = jnp.roll(out['tokens'], -m, axis=0)
    _, shuffled = predict_loss(
      jax.lax.stop_gradient(params['predictor']), jax.lax.stop_gradient(shuffled_rvd)
    )
    aux['frame_loss_shuffled'] = jax.lax.stop_gradient(shuffled)
  if o.contrastive_weight > 0:
    z_rd = o.projection.apply({'params': params['projection']}, out['cls'])
    contrastive = losses.multi_positive_infonce(z_rd, losses.clip_ids(batch, m), o.temperature)
    total = total + o.contrastive_weight * contrastive
  else:
    contrastive = jnp.zeros((), jnp.float32)
  aux['contrastive_loss'] = contrastive
  return total, aux


def train_step(
  state: TrainState,
  batch: dict,
  rng: jax.Array,
  *,
  objective: AaSPObjective,
  tx,
  schedule,
  opt_cfg,
  teacher_per_clone: bool = False,
):
  """(state, global batch, base rng) -> (new state, metrics). Pure; jitted by `compile_step`.

  `teacher_per_clone=True` is the naive design that benchmarks compare against: the teacher re-runs
  on every clone's (repeated) clip and every clone row gets its own targets.

  With objective.kind='mae' the targets are the clip's log-mel patches and no teacher runs.
  """
  o = objective
  x_btf = o.features(batch)
  if o.kind == 'mae':
    if teacher_per_clone:
      raise ValueError('teacher_per_clone is an AaSP baseline; objective.kind=mae has no teacher.')
    targets_bnd = losses.mae_targets(x_btf, *o.patch, o.mae_norm_patches)
  elif teacher_per_clone:
    targets_bnd = teacher_forward(o, state.teacher, jnp.repeat(x_btf, o.num_clones, axis=0))
  else:
    targets_bnd = teacher_forward(o, state.teacher, x_btf)
  masks, mask_noise = step_randomness(o, rng, state.step, x_btf.shape[0])
  grad_fn = jax.value_and_grad(
    functools.partial(
      student_loss, o, clones_per_target=1 if teacher_per_clone else None, mask_noise=mask_noise
    ),
    has_aux=True,
  )
  (loss, aux), grads = grad_fn(state.params, x_btf, targets_bnd, masks)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # The EMA after update k anneals on k, the new parameters' update count (EAT's set_num_updates).
  tau = ema_decay(opt_cfg, state.step + 1)
  teacher = jax.tree.map(
    lambda t, s: (tau * t + (1.0 - tau) * s).astype(t.dtype), state.teacher, params['encoder']
  )
  metrics = {
    'loss': loss,
    **aux,
    'target_std': losses.variance(targets_bnd),
    'grad_norm': optax.tree.norm(grads),
    'param_norm': optax.tree.norm(params),
    'update_norm': optax.tree.norm(updates),
    'learning_rate': schedule(state.step),
    'ema_decay': tau,
  }
  new_state = state.replace(
    step=state.step + 1, params=params, teacher=teacher, opt_state=opt_state
  )
  return new_state, jax.tree.map(lambda v: v.astype(jnp.float32), metrics)


def trace_step(
  objective,
  tx,
  schedule,
  opt_cfg,
  mesh,
  rules,
  state_shardings,
  batch_abstract,
  step_fn=None,
):
  """Jits the step with explicit shardings and donation and traces it on abstract arguments.

  The returned `jax.stages.Traced` holds the step's jaxpr (what `flops.jaxpr_flops` counts);
  `compile_traced` lowers and compiles it. `step_fn` (default `train_step`) lets benchmarks
  compile a variant with the same signature, shardings and donation."""
  step_fn = train_step if step_fn is None else step_fn
  from jax.sharding import NamedSharding, PartitionSpec as P

  from aasp_jax import sharding as sharding_lib

  global_batch = next(iter(batch_abstract.values())).shape[0]
  sharding_lib.check_batch(global_batch, mesh)  # a clear error here, not deep inside XLA
  replicated = NamedSharding(mesh, P())
  batch_shardings = {
    k: NamedSharding(mesh, P(sharding_lib.BATCH_AXES, *([None] * (len(v.shape) - 1))))
    for k, v in batch_abstract.items()
  }
  step = jax.jit(
    functools.partial(step_fn, objective=objective, tx=tx, schedule=schedule, opt_cfg=opt_cfg),
    in_shardings=(state_shardings, batch_shardings, replicated),
    out_shardings=(state_shardings, replicated),
    donate_argnums=(0,),
  )
  abstract_state = jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    nn.meta.unbox(state_lib.abstract_state(objective, tx)),
    state_shardings,
  )
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # An abstract key: a concrete one would be placed on a local device, which a TPU topology
    # compiled from a CPU host does not have.
    rng_abstract = jax.eval_shape(jax.random.key, 0)
    return step.trace(abstract_state, batch_abstract, rng_abstract)


def compile_traced(traced, mesh, rules):
  """Compiles a `trace_step` result; returns (compiled step, XLA memory analysis)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = traced.lower().compile()
  memory = compiled.memory_analysis()
  if memory is not None:
    mib = 1 << 20
    logging.info(
      'train step compiled: arguments %.1f MiB, outputs %.1f MiB, temporaries %.1f MiB per device',
      memory.argument_size_in_bytes / mib,
      memory.output_size_in_bytes / mib,
      memory.temp_size_in_bytes / mib,
    )
  return compiled, memory


def compile_step(
  objective,
  tx,
  schedule,
  opt_cfg,
  mesh,
  rules,
  state_shardings,
  batch_abstract,
  step_fn=None,
):
  """`trace_step` then `compile_traced`: (compiled step, XLA memory analysis)."""
  traced = trace_step(
    objective, tx, schedule, opt_cfg, mesh, rules, state_shardings, batch_abstract, step_fn
  )
  return compile_traced(traced, mesh, rules)
