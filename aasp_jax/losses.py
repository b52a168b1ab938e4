"""Pre-training targets, losses and collapse metrics for AaSP (data2vec 2.0 / EAT lineage).

Every function here is a pure `jax.numpy` function: it can be jitted, differentiated and run on
globally sharded arrays (the compiler inserts whatever gathers the contrastive loss needs, so no
collective appears here). Inputs may be bf16; every function casts to float32 first, so all
reductions and every returned value are float32.

Clone row layout (shared by the student, the predictor and every loss below): a batch of B clips
with M clones each is stored as R = B * M rows, clip-major, so the clones of clip b are rows
b * M .. b * M + M - 1 and row r belongs to clip r // M. `clip_ids(B, M)` builds the matching ids.
"""

import math

import jax
import jax.numpy as jnp

# data2vec's instance_norm_target_layer and final layer norm both use the torch default eps.
NORM_EPS = 1e-5
# Masks the self-similarity out of the softmax denominator. It is finite, so masked entries never
# produce inf - inf or 0 * inf, and exp(NEG_MASK - max) underflows to exactly 0 in float32 for any
# temperature the config allows (|logit| <= 1 / T).
NEG_MASK = -1e9
# Floor inside the variance metric's square root (data2vec's compute_var uses the same value), so the
# collapse guard stays differentiable when a channel is constant.
VAR_EPS = 1e-6
# Audio-MAE's norm_pix_loss: each target patch is standardised with this floor on its variance.
PATCH_NORM_EPS = 1e-6
# objective.loss_scale: 'mean' averages e^2 over channels; 'eat' is data2vec's d2v_loss as EAT uses
# it (sum over channels of e^2, times loss_scale = 1 / sqrt(D)).
LOSS_SCALES = ('mean', 'eat')
# objective.utterance_reduction over the clone rows: 'mean'; 'eat', EAT's weight, the mean times
# EAT's rows per GPU (see `utterance_loss`); 'sum', the sum over the global rows (EAT's weight only
# when one GPU holds the whole global batch; it grows with the global batch).
UTTERANCE_REDUCTIONS = ('mean', 'sum', 'eat')


def _num_clips(num_rows: int, num_clones: int) -> int:
  """Checks the static clone layout and returns the number of clips B."""
  if num_clones < 1:
    raise ValueError(f'num_clones must be >= 1, got {num_clones}.')
  if num_rows % num_clones:
    raise ValueError(f'{num_rows} clone rows are not a multiple of num_clones={num_clones}.')
  return num_rows // num_clones


def clip_ids(num_clips: int, num_clones: int) -> jax.Array:
  """Clip id of each clone row, [B * M] int32, in the clip-major layout described above.

  Raises ValueError for num_clones < 2: the contrastive loss has no positives with one clone.
  """
  if num_clones < 2:
    raise ValueError(f'The contrastive loss needs num_clones >= 2 (positives), got {num_clones}.')
  return jnp.repeat(jnp.arange(num_clips, dtype=jnp.int32), num_clones)


def teacher_targets(layers_lbnd: jax.Array, top_k: int) -> jax.Array:
  """Frame targets [B, N, D] float32 from the teacher's block outputs [L, B, N, D] (patch tokens).

  As data2vec 2.0 / EAT: take the last `top_k` blocks, instance-normalise each over the token axis
  (per example and channel, no affine), average them, then layer-normalise over channels (no
  affine). Both norms use the biased variance and eps = NORM_EPS = 1e-5.
  """
  num_layers = layers_lbnd.shape[0]
  if not 1 <= top_k <= num_layers:
    raise ValueError(f'top_k must be in [1, {num_layers}], got {top_k}.')
  x_kbnd = layers_lbnd[num_layers - top_k :].astype(jnp.float32)
  # Instance norm over tokens removes each layer's per-channel offset and scale, so layers with
  # larger activations (deeper blocks) do not dominate the average.
  mean = x_kbnd.mean(axis=2, keepdims=True)
  var = jnp.square(x_kbnd - mean).mean(axis=2, keepdims=True)
  x_kbnd = (x_kbnd - mean) * jax.lax.rsqrt(var + NORM_EPS)
  y_bnd = x_kbnd.mean(axis=0)
  mean = y_bnd.mean(axis=-1, keepdims=True)
  var = jnp.square(y_bnd - mean).mean(axis=-1, keepdims=True)
  return (y_bnd - mean) * jax.lax.rsqrt(var + NORM_EPS)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f'{name}={value!r} is not valid; choose one of {choices}.')


def token_error(err_nd: jax.Array, loss_scale: str = 'mean') -> jax.Array:
  """Per-token squared error [...] from errors [..., D] (float32), reduced over channels.

  'mean': mean over channels of e^2 (the AaSP default). 'eat': data2vec 2.0 / EAT's d2v_loss,
  sum over channels of e^2 scaled by 1 / sqrt(D).
  """
  _check_choice('loss_scale', loss_scale, LOSS_SCALES)
  sq = jnp.square(err_nd.astype(jnp.float32))
  if loss_scale == 'mean':
    return sq.mean(axis=-1)
  return sq.sum(axis=-1) / math.sqrt(err_nd.shape[-1])


def _gather_targets(targets_bnd, masked_idx_rk, num_rows, num_clones):
  """Targets at each clone row's masked positions, [B, M, K, D] float32 (gathered per clip)."""
  num_clips = _num_clips(num_rows, num_clones)
  idx_bmk = masked_idx_rk.reshape(num_clips, num_clones, masked_idx_rk.shape[-1])
  # Gather per clip rather than repeating the targets M times: the gathered tensor is the size of
  # the predictions, never [B * M, N, D].
  return jax.vmap(lambda t_nd, i_mk: t_nd[i_mk])(targets_bnd.astype(jnp.float32), idx_bmk)


def frame_loss(
  pred_rkd: jax.Array,
  targets_bnd: jax.Array,
  masked_idx_rk: jax.Array,
  num_clones: int,
  loss_scale: str = 'mean',
) -> jax.Array:
  """Squared error between predictions and teacher targets at each clone's masked positions.

  Args:
    pred_rkd: predictions [R = B * M, K, D] for the K masked positions of each clone row (clip-major
      layout: row r belongs to clip r // M).
    targets_bnd: teacher targets [B, N, D], one per clip.
    masked_idx_rk: int token indices [R, K] in [0, N); the predictions' order.
    num_clones: M, static.
    loss_scale: 'mean' or 'eat' (see `token_error`), static.

  Returns:
    A float32 scalar: the per-token error (`token_error`) averaged over clones and masked positions;
    for 'mean' that is the squared error averaged over clones, positions and channels.
  """
  _check_choice('loss_scale', loss_scale, LOSS_SCALES)
  num_rows, num_masked, dim = pred_rkd.shape
  tgt_bmkd = _gather_targets(targets_bnd, masked_idx_rk, num_rows, num_clones)
  pred_bmkd = pred_rkd.astype(jnp.float32).reshape(tgt_bmkd.shape[:2] + (num_masked, dim))
  if loss_scale == 'mean':
    return jnp.mean(jnp.square(pred_bmkd - tgt_bmkd))
  return jnp.mean(token_error(pred_bmkd - tgt_bmkd, loss_scale))


def utterance_loss(
  cls_rd: jax.Array,
  targets_bnd: jax.Array,
  num_clones: int,
  loss_scale: str = 'mean',
  reduction: str = 'mean',
  rows_per_worker: int = 1,
) -> jax.Array:
  """EAT's utterance-level loss between each clone's CLS output [R = B * M, D] and its clip's target
  averaged over tokens [B, D]. Float32 scalar.

  Each row's error is `token_error(cls - mean target, loss_scale)`; `reduction` 'mean' averages the
  rows (the default: with 'mean' scale, the MSE over clones and channels) and 'sum' adds the global
  rows. 'eat' is EAT's weight: its CLS term is d2v_loss * sample_size
  (models/EAT_pretraining.py:659-661), and fairseq divides the loss summed over W GPUs by
  sample_size summed over them (fairseq/trainer.py multiply_grads after DDP's gradient mean), so
  with equal masks per GPU the term is (1 / W) * the global row sum = `rows_per_worker` * the row
  mean. Expressed that way (EAT's AS-2M run: 12 clips x 16 clones = 192 rows per GPU) it does not
  depend on how many devices run the step.
  """
  _check_choice('loss_scale', loss_scale, LOSS_SCALES)
  _check_choice('utterance_reduction', reduction, UTTERANCE_REDUCTIONS)
  num_rows, dim = cls_rd.shape
  num_clips = _num_clips(num_rows, num_clones)
  cls_bmd = cls_rd.astype(jnp.float32).reshape(num_clips, num_clones, dim)
  mean_bd = targets_bnd.astype(jnp.float32).mean(axis=1)
  err_bmd = cls_bmd - mean_bd[:, None, :]
  if loss_scale == 'mean' and reduction == 'mean':
    return jnp.mean(jnp.square(err_bmd))
  row_bm = token_error(err_bmd, loss_scale)
  if reduction == 'sum':
    return row_bm.sum()
  if reduction == 'eat':
    return row_bm.mean() * rows_per_worker
  return row_bm.mean()


def patchify(x_btf: jax.Array, patch_t: int, patch_f: int) -> jax.Array:
  """Log-mel [B, T, F] -> patches [B, N, patch_t * patch_f] float32, in the encoder's token order.

  Token n = t * (F // patch_f) + f (time-major, as the conv stem's [B, T', F', D] grid flattens);
  the pixels of a patch are laid out row-major over (frame, mel bin).
  """
  batch, num_t, num_f = x_btf.shape
  if num_t % patch_t or num_f % patch_f:
    raise ValueError(
      f'input [T={num_t}, F={num_f}] does not tile into [{patch_t}, {patch_f}] patches.'
    )
  n_t, n_f = num_t // patch_t, num_f // patch_f
  x = x_btf.astype(jnp.float32).reshape(batch, n_t, patch_t, n_f, patch_f)
  return x.transpose(0, 1, 3, 2, 4).reshape(batch, n_t * n_f, patch_t * patch_f)


def mae_targets(
  x_btf: jax.Array, patch_t: int, patch_f: int, norm_patches: bool = True
) -> jax.Array:
  """Audio-MAE reconstruction targets [B, N, patch_t * patch_f] float32: the patchified log-mel.

  With `norm_patches` (Audio-MAE's norm_pix_loss) each patch is standardised by its own mean and
  variance, (x - mean) / sqrt(var + 1e-6), with the unbiased variance as torch's `var` computes it.
  """
  patches_bnp = patchify(x_btf, patch_t, patch_f)
  if not norm_patches:
    return patches_bnp
  mean = patches_bnp.mean(axis=-1, keepdims=True)
  var = jnp.square(patches_bnp - mean).sum(axis=-1, keepdims=True) / (patches_bnp.shape[-1] - 1)
  return (patches_bnp - mean) * jax.lax.rsqrt(var + PATCH_NORM_EPS)


def mae_loss(
  pred_rkp: jax.Array, targets_bnp: jax.Array, masked_idx_rk: jax.Array, num_clones: int
) -> jax.Array:
  """Audio-MAE's loss: per masked patch the mean over pixels of the squared error, averaged over the
  masked patches of every clone row. Float32 scalar.

  Args:
    pred_rkp: reconstructions [R = B * M, K, P] of each clone row's K masked patches (clip-major).
    targets_bnp: `mae_targets` [B, N, P], one per clip.
    masked_idx_rk: int token indices [R, K]; the predictions' order.
    num_clones: M, static.
  """
  num_rows, num_masked, num_pixels = pred_rkp.shape
  tgt_bmkp = _gather_targets(targets_bnp, masked_idx_rk, num_rows, num_clones)
  pred_bmkp = pred_rkp.astype(jnp.float32).reshape(tgt_bmkp.shape[:2] + (num_masked, num_pixels))
  # Every row has the same K masked patches, so the masked-patch mean is a plain mean.
  return jnp.mean(jnp.square(pred_bmkp - tgt_bmkp).mean(axis=-1))


def multi_positive_infonce(z_rd: jax.Array, clip_ids_r: jax.Array, temperature: float) -> jax.Array:
  """Multi-positive InfoNCE (SupCon "out" form) over R L2-normalised clone embeddings [R, D].

  For anchor i, s_ia = z_i . z_a / T for every a != i (self is left out of the denominator), the
  positives P(i) are the other rows with the same clip id, and
  loss_i = -mean_{p in P(i)} [s_ip - logsumexp_{a != i} s_ia]. Returns the mean over anchors.

  The embeddings are used as given (the projection head normalises them). An anchor whose clip
  has a single row has no positive: it is left out of the mean (and the loss is 0 if no anchor has
  a positive), since ids are traced values here. Build ids with `clip_ids`, which rejects M < 2.
  On globally sharded inputs under jit, the [R, R] similarity makes the compiler gather all
  negatives; no collective is written here.
  """
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f'temperature must be > 0, got {temperature}.')
  z_rd = z_rd.astype(jnp.float32)
  # Full-precision matmul: the default on TPU would drop the float32 inputs to bf16 passes.
  sim_rr = jnp.matmul(z_rd, z_rd.T, precision=jax.lax.Precision.HIGHEST) / temperature
  self_rr = jnp.eye(z_rd.shape[0], dtype=bool)
  logits_rr = jnp.where(self_rr, NEG_MASK, sim_rr)
  log_prob_rr = logits_rr - jax.nn.logsumexp(logits_rr, axis=1, keepdims=True)
  pos_rr = (clip_ids_r[:, None] == clip_ids_r[None, :]) & ~self_rr
  num_pos_r = pos_rr.sum(axis=1).astype(jnp.float32)
  # where (not multiply) keeps the masked diagonal's large log-prob out of the sum entirely.
  pos_log_prob_r = jnp.where(pos_rr, log_prob_rr, 0.0).sum(axis=1)
  has_pos_r = num_pos_r > 0
  loss_r = -pos_log_prob_r / jnp.maximum(num_pos_r, 1.0)
  return jnp.sum(jnp.where(has_pos_r, loss_r, 0.0)) / jnp.maximum(has_pos_r.sum(), 1)


def effective_rank(embeddings_nd: jax.Array) -> jax.Array:
  """RankMe (Garrido et al., 2023) of [N, D] embeddings: exp of the entropy of the normalised
  singular values of the centred matrix. Lies in [1, min(N, D)]; float32 scalar.

  Centring (over the N examples) keeps a shared offset from counting as a dimension. Zero singular
  values contribute 0 (0 log 0 = 0), with a guarded log so gradients stay finite.
  """
  x_nd = embeddings_nd.astype(jnp.float32)
  x_nd = x_nd - x_nd.mean(axis=0, keepdims=True)
  sigma = jnp.linalg.svd(x_nd, compute_uv=False)
  p = sigma / jnp.maximum(sigma.sum(), jnp.finfo(jnp.float32).tiny)
  positive = p > 0
  safe_p = jnp.where(positive, p, 1.0)
  entropy = -jnp.sum(jnp.where(positive, safe_p * jnp.log(safe_p), 0.0))
  return jnp.exp(entropy)


def variance(x: jax.Array) -> jax.Array:
  """Collapse metric: the per-channel standard deviation over every leading axis (examples, tokens),
  averaged over the last (channel) axis. Float32 scalar.

  It is a std, sqrt(var + VAR_EPS), as data2vec's compute_var logs for targets and predictions: a
  collapsed representation reads ~1e-3 rather than 0, and the value is in the units of x.
  """
  x_td = x.astype(jnp.float32).reshape(-1, x.shape[-1])
  return jnp.sqrt(x_td.var(axis=0) + VAR_EPS).mean()
