"""`recipe=eat` is EAT's pre-training step, update for update, against EAT's own code re-stated in
PyTorch (float64), on the same weights, the same log-mels and the same (injected) masks and decoder
noise.

The oracle below is written from EAT (github.com/cwx-worst-one/EAT at 06c1c34) and fairseq
(facebookresearch/fairseq at 3d262bb2); every function cites the lines it re-states. It runs the
student (local encoder, positions, clones, masking, CLS, context norm, post-LN AltBlocks), the
CNN decoder with noise-filled masked cells, the EMA teacher's FFN-output targets (instance norm,
top-K average, layer norm), both loss terms with fairseq's sample_size normalisation, gradient
clipping, fairseq's Adam with its decay and its cosine schedule, and the EMA step. Weights travel
with the importer's own mapping (`eat_layout.from_eat`; the test checks the round trip).

Compared after every one of 3 updates (2 warm-up updates, so lr(0) = 0 and lr(1) > 0; EMA decay
0.9 -> 0.99 over 5 updates, so a one-update lag in the decay shows): the teacher targets, each loss
term and the total, every parameter's gradient, the clipped gradient, the update, and the EMA
teacher. The clip threshold is set below the gradient norm so the clip acts.

Tolerance: the JAX step runs in float32. Each quantity's relative error against the float64
oracle (max |a - b| / max |b|) must stay within 20x the same oracle's own float32 error on the
same quantity (float32 rounding, measured in this test), with a floor of 1e-6. A real difference
(one update of EMA lag: ~1e-2 of the teacher's change; a decoder without its first residual;
pre-LN blocks) is orders of magnitude above that.
"""

import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aasp_jax import configuration
from aasp_jax.audio import decode, fbank_host, presets
from aasp_jax.export import eat_layout
from aasp_jax.models import posemb
from aasp_jax.train import objective as objective_lib
from aasp_jax.train import optimizer as optimizer_lib
from aasp_jax.train import state as state_lib
from aasp_jax.train import step as step_lib

torch = pytest.importorskip('torch')
F = torch.nn.functional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIPS = [os.path.join(REPO, 'data', 'sonicpi', 'audio', n) for n in ('loop_amen.flac', 'bd_haus.flac')]
TARGET, MEL, PATCH = 128, 128, 16
WIDTH, DEPTH, HEADS, CLONES = 64, 2, 4, 3
STEPS = 3
# The model and schedule: EAT's recipe at a tiny size; 2 warm-up updates out of 10, a fast EMA, and
# a clip threshold the gradient exceeds.
OVERRIDES = [
  'model.dtype=float32',
  f'model.width={WIDTH}',
  f'model.depth={DEPTH}',
  f'model.num_heads={HEADS}',
  f'model.mlp_dim={4 * WIDTH}',
  f'objective.top_k_layers={DEPTH}',
  f'objective.num_clones={CLONES}',
  'objective.eat_clips_per_worker=2',  # the oracle is one GPU holding both clips
  'global_batch=2',
  'total_steps=10',
  'mesh.data=1',
  'optimizer.lr=2e-3',
  'optimizer.reference_batch=2',
  'optimizer.warmup_fraction=0.2',
  'optimizer.clip_norm=0.5',
  'optimizer.ema_start=0.9',
  'optimizer.ema_end=0.99',
  'optimizer.ema_anneal_steps=5',
]
EAT_CONFIG = f'configs/pretrain.py:variant=tiny,target_length={TARGET},recipe=eat'


# ----------------------------------------------------------------------------------------------
# Weights: JAX tree <-> EAT's names (the importer's mapping is the authority)


def jax_to_eat(params: dict, max_time: int) -> dict:
  """Our encoder + CNN decoder parameters -> EAT's fairseq names (numpy float64)."""
  enc, dec = params['encoder'], params['predictor']
  a = lambda v: np.asarray(v, np.float64)  # noqa: E731
  me = 'modality_encoders.IMAGE.'
  stem = enc['stem'].get('conv_stem', enc['stem'])  # AaPE wraps the plain stem
  sd = {
    me + 'local_encoder.proj.weight': a(stem['proj']['kernel']).transpose(3, 2, 0, 1),
    me + 'local_encoder.proj.bias': a(stem['proj']['bias']),
    me + 'extra_tokens': a(enc['cls']),
    me + 'context_encoder.norm.weight': a(enc['input_norm']['scale']),
    me + 'context_encoder.norm.bias': a(enc['input_norm']['bias']),
    me + 'fixed_positional_encoder.positions': posemb.sincos_table(
      WIDTH, max_time, MEL // PATCH, 'sincos_mae'
    ).reshape(1, -1, WIDTH).astype(np.float64),
  }
  for i in range(DEPTH):
    b, pre = enc[f'blocks_{i}'], f'blocks.{i}.'
    for ours, theirs in (('norm1', 'norm1'), ('norm2', 'norm2')):
      sd[pre + theirs + '.weight'] = a(b[ours]['scale'])
      sd[pre + theirs + '.bias'] = a(b[ours]['bias'])
    at = b['attn']
    sd[pre + 'attn.qkv.weight'] = np.concatenate([a(at[k]['kernel']).T for k in ('query', 'key', 'value')])
    sd[pre + 'attn.qkv.bias'] = np.concatenate([a(at[k]['bias']) for k in ('query', 'key', 'value')])
    sd[pre + 'attn.proj.weight'] = a(at['out']['kernel']).T
    sd[pre + 'attn.proj.bias'] = a(at['out']['bias'])
    for fc in ('fc1', 'fc2'):
      sd[pre + f'mlp.{fc}.weight'] = a(b['mlp'][fc]['kernel']).T
      sd[pre + f'mlp.{fc}.bias'] = a(b['mlp'][fc]['bias'])
  i = 0
  while f'conv_{i}' in dec:
    sd[me + f'decoder.blocks.{i}.0.weight'] = a(dec[f'conv_{i}']['kernel']).transpose(3, 2, 0, 1)
    sd[me + f'decoder.blocks.{i}.0.bias'] = a(dec[f'conv_{i}']['bias'])
    i += 1
  sd[me + 'decoder.proj.weight'] = a(dec['out_proj']['kernel']).T
  sd[me + 'decoder.proj.bias'] = a(dec['out_proj']['bias'])
  return sd


def eat_to_jax(sd: dict) -> dict:
  """EAT's names -> our {'encoder', 'predictor'} trees: the encoder through the importer."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  encoder = eat_layout.from_eat(sd, num_heads=HEADS).params
  me = 'modality_encoders.IMAGE.decoder.'
  predictor, i = {}, 0
  while f'{me}blocks.{i}.0.weight' in sd:
    predictor[f'conv_{i}'] = {
      'kernel': sd[f'{me}blocks.{i}.0.weight'].transpose(2, 3, 1, 0),
      'bias': sd[f'{me}blocks.{i}.0.bias'],
    }
    i += 1
  predictor['out_proj'] = {'kernel': sd[me + 'proj.weight'].T, 'bias': sd[me + 'proj.bias']}
  return {'encoder': encoder, 'predictor': predictor}


# ----------------------------------------------------------------------------------------------
# EAT's step, re-stated (functional torch; `p` maps EAT's parameter names to tensors)

ME = 'modality_encoders.IMAGE.'


def layer_norm(x, p, name, eps):
  """nn.LayerNorm(eps) with EAT's `norm_eps` (EAT_pretraining.py:189-191)."""
  return F.layer_norm(x, x.shape[-1:], p[name + '.weight'], p[name + '.bias'], eps)


def alt_attention(p, pre, x):
  """AltAttention.forward, no alibi, no padding (models/modules.py:355-397). In float64 the
  softmax stays float64 (EAT casts it to float32 for its fp16 run, :391)."""
  b, n, c = x.shape
  qkv = F.linear(x, p[pre + 'qkv.weight'], p[pre + 'qkv.bias'])
  qkv = qkv.reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
  q, k, v = qkv[0], qkv[1], qkv[2]
  attn = (q * (c // HEADS) ** -0.5) @ k.transpose(-2, -1)
  x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
  return F.linear(x, p[pre + 'proj.weight'], p[pre + 'proj.bias'])


def alt_block(p, i, x, eps=1e-6):
  """AltBlock.forward with layer_norm_first=False and ffn_targets=True (end_of_block_targets:
  false): returns (block output, the MLP output before the residual add) (modules.py:307-324)."""
  pre = f'blocks.{i}.'
  x = x + alt_attention(p, pre + 'attn.', x)
  r = x = layer_norm(x, p, pre + 'norm1', eps)
  x = F.linear(F.gelu(F.linear(x, p[pre + 'mlp.fc1.weight'], p[pre + 'mlp.fc1.bias'])),
               p[pre + 'mlp.fc2.weight'], p[pre + 'mlp.fc2.bias'])  # timm Mlp, exact GELU
  t = x
  return layer_norm(r + x, p, pre + 'norm2', eps), t


def local_features(p, source):
  """PatchEmbed_new: Conv2d(1, D, 16, stride 16), flattened time-major (mae.py:368-385)."""
  x = F.conv2d(source[:, None], p[ME + 'local_encoder.proj.weight'],
               p[ME + 'local_encoder.proj.bias'], stride=PATCH)
  return x.flatten(2).transpose(1, 2)


def context_input(p, x):
  """The extra (CLS) token, then the context encoder's norm (prenet_depth 0)
  (base.py:309-326; modules.py:70-73 BlockEncoder with layer_norm_first False)."""
  x = torch.cat([p[ME + 'extra_tokens'].expand(x.size(0), -1, -1), x], dim=1)
  return layer_norm(x, p, ME + 'context_encoder.norm', 1e-6)


def make_maskinfo(mask):
  """base.py:421-449: ids_shuffle = argsort(mask) (stable here: any order of the visible tokens
  gives the same result, positions are added before the gather), ids_restore, ids_keep."""
  ids_shuffle = mask.to(torch.uint8).argsort(dim=1, stable=True)
  ids_restore = ids_shuffle.argsort(dim=1)
  len_keep = mask.shape[1] - int(mask[0].sum())
  return ids_shuffle[:, :len_keep], ids_restore


def decoder2d(p, x, ids_restore, noise, grid):
  """decoder_input (base.py:165-195: CLS dropped, masked cells = the noise, back to grid order,
  no positions) then Decoder2d.forward (modules.py:216-230) with its blocks (Conv2d grouped,
  SamePad2d (odd kernel: nothing), LayerNorm without affine at fairseq's eps 1e-5, GELU;
  modules.py:189-205) and DecoderBase.add_residual (modules.py:111-121: whenever the channels
  match)."""
  x = torch.cat([x[:, 1:], noise], dim=1)
  x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, x.size(-1)))
  b, t, c = x.shape
  x = x.transpose(1, 2).reshape(b, c, *grid)
  residual, i = x, 0
  while f'{ME}decoder.blocks.{i}.0.weight' in p:
    w = p[f'{ME}decoder.blocks.{i}.0.weight']
    x = F.conv2d(x, w, p[f'{ME}decoder.blocks.{i}.0.bias'], padding=w.shape[-1] // 2, groups=16)
    x = F.layer_norm(x.transpose(1, 3), (x.shape[1],), eps=1e-5).transpose(1, 3)
    x = F.gelu(x)
    if residual.size(1) == x.size(1):
      x = x + residual
    residual, i = x, i + 1
  x = x.reshape(b, -1, t).transpose(1, 2)
  return F.linear(x, p[ME + 'decoder.proj.weight'], p[ME + 'decoder.proj.bias'])


def make_targets(layer_results, top_k):
  """Data2VecMultiModel.make_targets with instance_norm_target_layer and layer_norm_targets
  (EAT_pretraining.py:785-828; config/pretraining_AS2M.yaml): instance norm over tokens per
  layer, the average of the top K, then a layer norm (torch's eps 1e-5, no affine)."""
  ys = [F.instance_norm(t.transpose(1, 2)).transpose(1, 2) for t in layer_results[-top_k:]]
  y = sum(ys) / len(ys)
  return F.layer_norm(y, y.shape[-1:])


def eat_losses(p, teacher, source, mask, noise, grid):
  """Data2VecMultiModel.forward (EAT_pretraining.py:418-746) for one GPU: returns (targets,
  regression sum, cls sum, sample_size). The student: local encoder, positions, clones, the
  visible tokens, CLS + context norm, the blocks, no final norm (base.py:212-337,
  EAT_pretraining.py:444-492); the decoder (:510-528); the teacher with its own local encoder and
  positions on the whole clip, FFN-output layer results of the patch tokens (:556-621); targets
  (:624); the frame term d2v_loss summed over masked tokens and channels, scale 1 / sqrt(D)
  (:628-642, 703-707, 760-776); the CLS term d2v_loss(student CLS, mean target) * sample_size
  (:651-661). fairseq's model criterion sums each term (criterions/model_criterion.py:55-86)."""
  positions = p[ME + 'fixed_positional_encoder.positions']
  n = (source.shape[1] // PATCH) * (source.shape[2] // PATCH)
  x = local_features(p, source) + positions[:, :n]
  x = x.repeat_interleave(CLONES, 0)
  ids_keep, ids_restore = make_maskinfo(mask)
  x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.size(-1)))
  x = context_input(p, x)
  for i in range(DEPTH):
    x, _ = alt_block(p, i, x)
  pred = decoder2d(p, x, ids_restore, noise, grid)
  with torch.no_grad():
    y = context_input(teacher, local_features(teacher, source) + positions[:, :n])
    layer_results = []
    for i in range(DEPTH):
      y, lr = alt_block(teacher, i, y)
      layer_results.append(lr[:, 1:])
    targets = make_targets(layer_results, DEPTH)
  masked_b = mask.bool()
  scale = 1 / math.sqrt(WIDTH)
  y_rep = targets.repeat_interleave(CLONES, 0)[masked_b]
  reg = ((pred[masked_b] - y_rep) ** 2 * scale).sum()
  sample_size = int(masked_b.sum())
  cls_target = targets.mean(dim=1).repeat_interleave(CLONES, 0)
  cls = ((x[:, 0] - cls_target) ** 2 * scale).sum() * sample_size
  return targets, reg, cls, sample_size


def cosine_lr(n, peak, warmup, total):
  """fairseq's cosine scheduler, warmup_init_lr = min_lr = 0, t_mult 1, one period
  (optim/lr_scheduler/cosine_lr_scheduler.py:115-143); update k runs at lr(k - 1) since the trainer
  sets lr(num_updates) after each update (trainer.py:382, 1040, 1207-1209, 1275-1278)."""
  if n < warmup:
    return n * peak / warmup
  return 0.5 * peak * (1 + math.cos(math.pi * (n - warmup) / (total - warmup)))


def annealed_rate(start, end, step, total):
  """get_annealed_rate (models/base.py:486-491), end once step >= total (EAT_pretraining.py:366-376)."""
  if step >= total:
    return end
  return end - (end - start) * (1 - step / total)


class EatTrainer:
  """One GPU of EAT's training loop: forward, backward, fairseq's normalisation, clip, Adam, EMA."""

  def __init__(self, student: dict, teacher: dict, dtype, opt):
    t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
    self.p = {k: t(v).requires_grad_(not k.endswith('positions')) for k, v in student.items()}
    self.teacher = {k: t(v) for k, v in teacher.items() if '.decoder.' not in k}
    self.opt, self.num_updates = opt, 0
    self.m = {k: torch.zeros_like(v) for k, v in self.p.items()}
    self.v = {k: torch.zeros_like(v) for k, v in self.p.items()}

  def step(self, source, mask, noise, grid, global_batch, total_steps):
    """fairseq/trainer.py train_step for update k = num_updates + 1 (order: :843-849 backward,
    :941-946 multiply_grads(world / sample_size), :953 clip, :974-976 optimizer step, :1040
    set_num_updates -> the EMA step with decay d(k), EAT_pretraining.py:356-380)."""
    o = self.opt
    for v in self.p.values():
      v.grad = None
    targets, reg, cls, sample_size = eat_losses(self.p, self.teacher, source, mask, noise, grid)
    (reg + cls).backward()
    trainable = {k: v for k, v in self.p.items() if v.requires_grad}
    grads = {k: v.grad / sample_size for k, v in trainable.items()}
    # FP16Optimizer.clip_grad_norm (optim/fp16_optimizer.py:191-211, utils.py:367-397): scale by
    # max_norm / norm when norm exceeds it (no 1e-6 on the fp16 path EAT runs).
    norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    coef = o.clip_norm / norm if norm > o.clip_norm else 1.0
    clipped = {k: g * coef for k, g in grads.items()}
    # fairseq's Adam (optim/adam.py:212-234) in every parameter group with weight decay 0.05:
    # composite.py:139-148 never applies EAT's weight_decay_scale override.
    peak = o.lr * global_batch / o.reference_batch
    warmup = int(o.warmup_fraction * total_steps)
    lr = cosine_lr(self.num_updates, peak, warmup, total_steps)
    t = self.num_updates + 1
    updates = {}
    with torch.no_grad():
      for k, g in clipped.items():
        p = self.p[k]
        self.m[k].mul_(o.b1).add_(g, alpha=1 - o.b1)
        self.v[k].mul_(o.b2).addcmul_(g, g, value=1 - o.b2)
        denom = self.v[k].sqrt().add_(1e-8)
        step_size = lr * math.sqrt(1 - o.b2**t) / (1 - o.b1**t)
        old = p.clone()
        p.add_(p, alpha=-o.weight_decay * lr)
        p.addcdiv_(self.m[k], denom, value=-step_size)
        updates[k] = p - old
      self.num_updates = t
      # EMAModule.step (modules/ema_module.py:129-199): ema = d * ema + (1 - d) * param for the
      # teacher's trainable tensors (no decoder: ema_encoder_only false, decoder removed).
      d = annealed_rate(o.ema_start, o.ema_end, self.num_updates, o.ema_anneal_steps)
      for k in self.teacher:
        if not k.endswith('positions'):
          self.teacher[k] = d * self.teacher[k] + (1 - d) * self.p[k]
    return dict(targets=targets, frame=reg / sample_size, cls=cls / sample_size,
                loss=(reg + cls) / sample_size, grads=grads, clipped=clipped, updates=updates)


# ----------------------------------------------------------------------------------------------
# The comparison


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def tree_to_eat(tree, max_time):
  """A {'encoder', 'predictor'} JAX tree (params, grads, updates) in EAT's names, positions dropped."""
  sd = jax_to_eat(tree, max_time)
  return {k: v for k, v in sd.items() if not k.endswith('positions')}


def log_mels():
  preset = presets.get_preset('eat_audiomae', target_length=TARGET)
  return np.stack([fbank_host.features(decode.load_audio(c, preset), preset) for c in CLIPS])


def perturbed(params, seed):
  """Every parameter moved off its initial value (LayerNorm 1 / 0, zero biases)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    treedef, [v + 0.05 * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys)]
  )


def setup(config=EAT_CONFIG, overrides=()):
  cfg = configuration.load_config(config, OVERRIDES + list(overrides))
  objective = objective_lib.AaSPObjective.from_config(cfg)
  tx, schedule = optimizer_lib.make_optimizer(cfg.optimizer, cfg.global_batch, cfg.total_steps)
  state = jax.jit(lambda r: nn.meta.unbox(state_lib.create_state(objective, tx, r)))(
    jax.random.key(0)
  )
  params = perturbed(state.params, 1)
  if 'gate' in params['encoder']['stem']:  # AaPE: its branch off (gate 0), the rest perturbed
    params['encoder']['stem']['gate'] = jnp.zeros_like(params['encoder']['stem']['gate'])
  state = state.replace(params=params, teacher=params['encoder'], opt_state=tx.init(params))
  return cfg, objective, tx, schedule, state


def run_and_compare(cfg, objective, tx, schedule, state, steps=STEPS, first_update_only=False):
  """Runs `steps` JAX updates and the oracle's in float64 and float32; returns per update and
  quantity (JAX's error, the float32 oracle's error) against the float64 oracle.
  `first_update_only`: one update's targets, losses and gradients, without compiling the step."""
  o = objective
  x = log_mels()
  batch = {'log_mel': jnp.asarray(x)}
  rng = jax.random.key(7)
  train_step = jax.jit(functools.partial(
    step_lib.train_step, objective=o, tx=tx, schedule=schedule, opt_cfg=cfg.optimizer
  ))

  @jax.jit
  def pieces(state):
    masks, noise = step_lib.step_randomness(o, rng, state.step, x.shape[0])
    targets = step_lib.teacher_forward(o, state.teacher, batch['log_mel'])
    (loss, aux), grads = jax.value_and_grad(
      functools.partial(step_lib.student_loss, o, mask_noise=noise), has_aux=True
    )(state.params, batch['log_mel'], targets, masks)
    clipped, _ = optax.clip_by_global_norm(cfg.optimizer.clip_norm).update(grads, None)
    return masks, noise, targets, loss, aux, grads, clipped

  max_time = cfg.model.max_time_patches
  start = jax_to_eat(state.params, max_time)
  teacher = jax_to_eat({'encoder': state.teacher, 'predictor': state.params['predictor']}, max_time)
  oracles = {dt: EatTrainer(start, teacher, dt, cfg.optimizer) for dt in (torch.float64, torch.float32)}
  source = {dt: torch.tensor(x, dtype=dt) for dt in oracles}
  errors = []
  for _ in range(1 if first_update_only else steps):
    masks, noise, targets, loss, aux, grads, clipped = pieces(state)
    # (lr(0) = 0: the first update leaves the parameters and so the teacher as they were.)
    new_state = state.replace(step=state.step + 1)
    if not first_update_only:
      new_state, metrics = train_step(state, batch, rng)
      # The pieces are what the step computed.
      np.testing.assert_allclose(float(metrics['loss']), float(loss), rtol=1e-6)
    mask_t = torch.tensor(np.asarray(masks.mask))
    ours = {
      'targets': np.asarray(targets),
      'frame': float(aux['frame_loss']),
      'cls': float(aux['utterance_loss']),
      'loss': float(loss),
      'grads': tree_to_eat(grads, max_time),
      'clipped': tree_to_eat(clipped, max_time),
      'updates': tree_to_eat(
        jax.tree.map(lambda a, b: a - b, new_state.params, state.params), max_time
      ),
    }
    outs = {}
    for dt, oracle in oracles.items():
      noise_t = torch.tensor(np.asarray(noise), dtype=dt)
      outs[dt] = oracle.step(source[dt], mask_t, noise_t, o.grid, cfg.global_batch, cfg.total_steps)
    new_teacher = tree_to_eat(
      {'encoder': new_state.teacher, 'predictor': new_state.params['predictor']}, max_time
    )
    row = {}
    for key in ('targets', 'frame', 'cls', 'loss'):
      want, f32 = (outs[dt][key] for dt in (torch.float64, torch.float32))
      want, f32 = np.asarray(torch.as_tensor(want).detach()), np.asarray(torch.as_tensor(f32).detach())
      row[key] = (rel_err(ours[key], want), rel_err(f32, want))
    for key in ('grads', 'clipped', 'updates'):
      for name, want in outs[torch.float64][key].items():
        f32 = outs[torch.float32][key][name]
        row[f'{key}:{name}'] = (
          rel_err(ours[key][name], want.detach().numpy()),
          rel_err(f32.detach().numpy(), want.detach().numpy()),
        )
    for name, want in oracles[torch.float64].teacher.items():
      if not name.endswith('positions'):
        row[f'teacher:{name}'] = (
          rel_err(new_teacher[name], want.numpy()),
          rel_err(oracles[torch.float32].teacher[name].numpy(), want.numpy()),
        )
    errors.append(row)
    state = new_state
  return errors


def failures(errors, skip=()):
  """Quantities whose JAX error exceeds 20x the float32 oracle's own error (floor 1e-6)."""
  return [
    (k, i + 1, ours, f32)
    for i, row in enumerate(errors)
    for k, (ours, f32) in row.items()
    if ours > max(20 * f32, 1e-6) and not k.startswith(skip)
  ]


@pytest.fixture(scope='module')
def eat_setup():
  return setup()


@pytest.fixture(scope='module')
def eat_run(eat_setup):
  cfg, objective, tx, schedule, state = eat_setup
  return cfg, objective, state, run_and_compare(cfg, objective, tx, schedule, state)


def test_weights_travel_with_the_importers_mapping(eat_setup):
  cfg, _, _, _, state = eat_setup
  sd = jax_to_eat(state.params, cfg.model.max_time_patches)
  back = eat_to_jax(sd)  # the encoder through eat_layout.from_eat
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b)),
    back,
    {'encoder': state.params['encoder'], 'predictor': state.params['predictor']},
  )
  imported = eat_layout.from_eat(sd, num_heads=HEADS)
  for key, value in imported.model_overrides.items():
    if key in ('stem', 'posemb', 'block_norm', 'norm_eps', 'width', 'depth', 'num_heads', 'mlp_dim'):
      assert cfg.model[key] == value, key  # recipe=eat is the encoder EAT checkpoints hold


def test_eat_recipe_is_eats_step(eat_run):
  cfg, _, _, errors = eat_run
  bad = failures(errors)
  assert not bad, bad[:10]
  # Every branch was active: the clip acted, the EMA moved the teacher, lr(1) > 0.
  worst = {k: max(row[k][0] for row in errors) for k in errors[0]}
  assert len([k for k in worst if k.startswith('grads:')]) == len(
    [k for k in errors[0] if k.startswith('clipped:')]
  )
  assert worst['loss'] < 1e-5 and worst['targets'] < 1e-4


def test_aasp_with_its_additions_off_is_eats_step():
  """AaSP stands on the proven step: its config with AaPE as the stem (gate 0: the branch off) and
  every other addition switched to EAT's value computes EAT's first update: targets, both loss
  terms and every gradient EAT has. (AaPE's own parameters get gradients too, so the global clip
  norm, and from the second update on the gate, differ: those are AaSP's addition, not a defect.)
  The other additions are one switch each on the same step, each with its own reference test:
  the cross-attention predictor (tests/test_predictors.py), the multi-mask InfoNCE against numpy
  (tests/test_losses.py, tests/test_train_step_multidevice.py) and AaPE (tests/test_aape.py)."""
  cfg, objective, tx, schedule, state = setup(overrides=['model.stem=aape'])
  assert cfg.model.stem == 'aape' and float(jnp.abs(state.params['encoder']['stem']['gate']).max()) == 0
  errors = run_and_compare(cfg, objective, tx, schedule, state, first_update_only=True)
  bad = failures(errors, skip=('clipped:', 'updates:'))
  assert not bad, bad[:10]
  assert any(k.startswith('grads:') for k in errors[0])


@pytest.mark.parametrize('groups,kernel', [(16, 3), (4, 2)])
def test_grouped_conv_is_lax_conv(groups, kernel):
  """The decoder's einsum convolution equals nn.Conv(feature_group_count=groups, 'SAME')."""
  from aasp_jax.models.cnn_decoder import GroupedConv

  x = jax.random.normal(jax.random.key(0), (2, 6, 5, 32))
  ours = GroupedConv(48, (kernel, kernel), groups)
  params = ours.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  ref = nn.Conv(48, (kernel, kernel), padding='SAME', feature_group_count=groups)
  np.testing.assert_allclose(
    ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5
  )


def test_eat_init_draws_what_eat_draws():
  """model.init=eat (models/init.py): BERT N(0, 0.02) linears with zero biases, CLS N(0, 1), the
  decoder's convolutions and output projection and the patch bias U(+-1/sqrt(fan_in)) (torch's
  default), LayerNorms 1 / 0. (AaSP's init, xavier kernels and CLS N(0, 0.02), fails each.)"""
  cfg = configuration.load_config(EAT_CONFIG, OVERRIDES + ['model.width=128', 'model.mlp_dim=512'])
  params = nn.meta.unbox(
    jax.jit(objective_lib.AaSPObjective.from_config(cfg).init_params)(jax.random.key(3))
  )
  enc, dec = params['encoder'], params['predictor']
  fc1 = np.asarray(enc['blocks_0']['mlp']['fc1']['kernel'])
  assert abs(fc1.std() - 0.02) < 0.001 and abs(fc1.mean()) < 0.001
  assert not np.any(enc['blocks_0']['attn']['query']['bias'])
  cls = np.asarray(enc['cls'])
  assert 0.8 < cls.std() < 1.2  # 128 draws of N(0, 1)
  np.testing.assert_array_equal(enc['input_norm']['scale'], 1.0)
  bound = 1 / math.sqrt(PATCH * PATCH)
  stem_bias = np.asarray(enc['stem']['proj']['bias'])
  assert np.abs(stem_bias).max() <= bound and stem_bias.std() > 0.4 * bound
  for kernel, fan_in in (
    (dec['conv_0']['kernel'], 3 * 3 * 128 // 16),
    (dec['out_proj']['kernel'], 128),
    (dec['conv_0']['bias'], 3 * 3 * 128 // 16),
  ):
    k, b = np.asarray(kernel), 1 / math.sqrt(fan_in)
    assert np.abs(k).max() <= b and abs(k.std() - b / math.sqrt(3)) < 0.15 * b
