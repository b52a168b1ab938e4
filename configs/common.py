"""Shared config pieces: the variant-string parser, the model/front-end sections, the mesh and the
logical-axis rules. Every shipped config builds on these so one file runs on a CPU, GPUs or a TPU pod.
"""

import ast

from ml_collections import ConfigDict, config_dict

from aasp_jax.models.build import VARIANTS


def parse_arg(arg: str | None, **defaults) -> ConfigDict:
  """Parses 'k1=v1,k2=v2' into a ConfigDict, typed by `defaults`; unknown keys fail with the list.

  A bare token without '=' (e.g. 'B/16') sets the first default key, so `pretrain.py:B` works.
  """
  out = ConfigDict(defaults)
  if not arg:
    return out
  first_key = next(iter(defaults))
  for item in arg.split(','):
    key, sep, value = item.partition('=')
    if not sep:
      key, value = first_key, item
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r} in {arg!r}; valid: {sorted(defaults)}.')
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'Config argument {key}={value!r} must be true or false.')
      out[key] = value.lower() in ('true', '1')
    elif isinstance(default, (int, float)):
      out[key] = type(default)(ast.literal_eval(value))
    else:
      out[key] = value
  return out


def parse_variant(variant: str) -> tuple[str, int]:
  """'B/16' -> ('B', 16); 'tiny' -> ('tiny', 16)."""
  name, _, patch = variant.partition('/')
  if name not in VARIANTS:
    raise ValueError(f'Unknown model variant {name!r}; choose one of {sorted(VARIANTS)}.')
  return name, int(patch) if patch else 16


def model_config(variant: str = 'B/16', stem: str = 'aape', predictor: str = 'cross_attention'):
  """The `model` section. Sizes are copied from the variant so each stays overridable."""
  name, patch = parse_variant(variant)
  sizes = VARIANTS[name]
  m = ConfigDict()
  m.variant = name
  m.width = sizes['width']
  m.depth = sizes['depth']
  m.num_heads = sizes['num_heads']
  m.mlp_dim = sizes['mlp_dim']
  m.patch_t = patch
  m.patch_f = patch
  m.stem = stem
  # AaPE (design section 3); every key is a field of aasp_jax.models.aape.AaPE.
  m.aape = ConfigDict(
    dict(
      num_modes=8,
      kernel_size=31,
      window='two_sided',
      phase='analytic',
      lambda_mode='adaptive',
      fusion='gate',
      delta=1.0,
      learn_delta=False,
      num_mod_bands=32,
      lambda_hidden=64,
      # The Lambda encoder's log-magnitude floor, relative to white noise of the group's power
      # (aasp_jax/models/aape.py SPECTRUM_FLOOR); runs saved before it existed used 0.
      spectrum_floor=1e-2,
    )
  )
  m.max_time_patches = 750  # 2 minutes at 100 frames/s and 16-frame patches
  # Parameter initialisation (aasp_jax/models/init.py): 'aasp' | 'eat' (BERT N(0, 0.02) linears,
  # CLS N(0, 1), torch-default decoder and patch bias, as EAT's pre-training draws them).
  m.init = 'aasp'
  # Encoder variants for imported weights (aasp_jax/models/vit.py); the defaults are AaSP's encoder.
  m.posemb = 'sincos'  # | 'sincos_mae' (Audio-MAE / EAT) | 'learned' (a table parameter)
  m.block_norm = 'pre'  # | 'post' (EAT / data2vec 2.0: norm after each residual add)
  m.norm_eps = 1e-6
  m.drop_path = 0.0
  m.dtype = 'bfloat16'
  m.param_dtype = 'float32'
  m.remat = False
  # One nn.scan over the blocks: XLA compiles one block instead of depth of them (TPU compile time
  # flat in depth). Checkpoints store stacked blocks; evaluation and export unstack them.
  m.scan_layers = name != 'tiny'
  m.attention_impl = 'xla'  # or 'cudnn' on NVIDIA GPUs
  tiny = name == 'tiny'
  m.predictor = ConfigDict(
    dict(
      kind=predictor,
      width=64 if tiny else 384,  # 0: the encoder's width (EAT's decoder)
      depth=1 if tiny else 2,
      num_heads=2 if tiny else 6,
      mlp_ratio=4.0,
      cnn_layers=6,
      cnn_kernel_size=3,
      cnn_groups=16,
      # EAT's decoder (models/modules.py:182-230): no input projection (the first convolution
      # reads the encoder output), LayerNorm without affine at eps 1e-5, masked cells filled
      # with fresh N(0, 0.01) noise each step. The defaults are AaSP's CNN-decoder ablation.
      cnn_input_proj=True,
      cnn_norm_affine=True,
      cnn_norm_eps=1e-6,
      cnn_mask_fill='token',  # | 'noise'
      cnn_mask_noise_std=0.01,
      # kind='mae': Audio-MAE's decoder (aasp_jax/models/mae_decoder.py). 'local' is its
      # decoder_mode=1, the one its AudioSet pre-training used (16 shifted-window blocks, width 512,
      # 16 heads); 'global' is decoder_mode=0 (Audio-MAE's ViT-B recipe then has 8 blocks).
      mae_attention='local',
      mae_width=64 if tiny else 512,
      mae_depth=2 if tiny else 16,
      mae_num_heads=2 if tiny else 16,
    )
  )
  return m


def frontend_config(preset: str = 'eat_audiomae', target_length: int = 1024) -> ConfigDict:
  """The `frontend` section: a named preset (aasp_jax.audio.presets) plus the clip length in frames.

  norm_mean / norm_std override the preset's statistics (e.g. from `aasp-data stats`) when set.
  """
  f = ConfigDict()
  f.preset = preset
  f.target_length = target_length
  f.norm_mean = config_dict.placeholder(float)
  f.norm_std = config_dict.placeholder(float)
  return f


def mesh_config() -> ConfigDict:
  """Mesh axis sizes; -1 fills with the remaining devices."""
  return ConfigDict(dict(data=-1, fsdp=1, tensor=1))


def logical_axis_rules() -> tuple[tuple[str, object], ...]:
  """Maps the model's logical axis names to mesh axes (MaxText-style, first match wins)."""
  return (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('tokens', None),
    ('classes', None),
    ('layers', None),  # the stacked-blocks axis of scanned encoders: every device holds all layers
  )


def objective_config(depth: int) -> ConfigDict:
  """Masking, teacher targets, loss weights and the contrastive head (design section 4)."""
  o = ConfigDict()
  o.num_clones = 16  # M masked copies of every clip; the teacher runs once per clip
  o.mask_ratio = 0.8
  o.mask_block_size = 5
  # Block centres per clone: 'coverage' (the fewest expected to cover the visible share: 6 on
  # 64 x 8) | 'eat' (EAT's int(N * (1 - ratio + 0.07) / 25): 5 on 64 x 8); aasp_jax/masking.py.
  o.mask_centres = 'coverage'
  o.top_k_layers = depth  # teacher targets average the top k block outputs (all of ViT-B's 12)
  o.utterance_weight = 1.0
  o.contrastive_weight = 1.0
  o.temperature = 0.1
  o.projection_hidden = 512
  o.projection_dim = 128
  o.min_target_std = 0.01  # collapse guard: stop when a std falls below this
  o.min_prediction_std = 0.01
  # Objective switches; every default is the AaSP recipe (see `apply_recipe` for EAT and MAE).
  o.kind = 'aasp'  # 'aasp': EMA-teacher targets | 'mae': reconstruct the masked log-mel patches
  o.mae_norm_patches = True  # kind=mae: normalise each target patch (Audio-MAE's norm_pix_loss)
  o.loss_scale = 'mean'  # 'mean': mean_D e^2 | 'eat': sum_D e^2 / sqrt(D) per token (d2v_loss)
  # Over the B*M clone rows: 'mean' | 'eat' (EAT's weight: the mean times eat_clips_per_worker *
  # num_clones, EAT's rows per GPU; it does not depend on the device count) | 'sum' (global rows).
  o.utterance_reduction = 'mean'
  o.eat_clips_per_worker = 12  # EAT's AS-2M run: batch_size 12 per GPU (4 GPUs)
  o.target_layers = 'residual'  # teacher layers: 'residual' block outputs | 'ffn' (EAT)
  o.stem_input = 'full'  # student stem on the whole clip | 'masked': per clone, masked patches = 0
  o.context_metric = False  # also log frame_loss_shuffled (other clips' context; one more pass)
  return o


RECIPES = ('aasp', 'eat', 'mae')


def apply_recipe(config: ConfigDict, recipe: str) -> ConfigDict:
  """Sets the fields that turn the AaSP config into another recipe's; returns `config`.

  'aasp' changes nothing. 'eat' is EAT's pre-training as its code runs it (EAT 06c1c34, fairseq
  3d262bb2; tests/test_eat_step.py holds the step equal to it): conv stem, post-LN blocks with an
  input LayerNorm and no final norm, MAE's frequency-first sin-cos positions (float32), EAT's CNN
  decoder as wide as the encoder, no contrastive term, d2v loss scaling, the CLS term weighted by
  EAT's rows per GPU, FFN-output targets, fairseq's Adam with weight decay on every parameter,
  EAT's warm-up share (53,333 of 400,000 updates) and EAT's initialisation. 'mae' is Audio-MAE's
  masked-patch reconstruction (no teacher) with Audio-MAE's decoder, without the contrastive term.

  It overwrites model.stem and model.predictor.kind, which are also `stem=` / `predictor=` variant
  arguments: pretrain.py applies the recipe after them, so the recipe wins; later command-line
  overrides (--config.model.stem=aape) still win over the recipe.
  """
  if recipe not in RECIPES:
    raise ValueError(f'Unknown recipe {recipe!r}; choose one of {RECIPES}.')
  o = config.objective
  if recipe == 'eat':
    m, p = config.model, config.model.predictor
    m.stem = 'conv'
    m.block_norm = 'post'
    m.posemb = 'sincos_mae'
    m.init = 'eat'
    p.kind = 'cnn'
    p.width = 0  # as wide as the encoder (decoder_dim 768 for ViT-B)
    p.cnn_input_proj = False
    p.cnn_norm_affine = False
    p.cnn_norm_eps = 1e-5
    p.cnn_mask_fill = 'noise'
    o.contrastive_weight = 0.0
    o.loss_scale = 'eat'
    o.utterance_reduction = 'eat'
    o.target_layers = 'ffn'
    o.mask_centres = 'eat'
    config.optimizer.adam = 'fairseq'
    config.optimizer.decay_params = 'all'
    config.optimizer.warmup_fraction = 53_333 / 400_000
  elif recipe == 'mae':
    config.model.predictor.kind = 'mae'  # Audio-MAE's own decoder
    o.kind = 'mae'
    o.contrastive_weight = 0.0
  return config


def optimizer_config() -> ConfigDict:
  """AdamW with warm-up + cosine; `lr` is the peak at `reference_batch` clips, scaled linearly."""
  return ConfigDict(
    dict(
      lr=5e-4,
      reference_batch=48,
      b1=0.9,
      b2=0.95,
      weight_decay=0.05,
      warmup_fraction=0.1,
      end_lr_fraction=0.0,
      clip_norm=4.0,
      adam='optax',  # | 'fairseq' (EAT's: eps before the bias correction; train/optimizer.py)
      decay_params='kernels',  # | 'all' (what EAT's run decayed; train/optimizer.py)
      ema_start=0.9998,
      ema_end=0.99999,
      ema_anneal_steps=100_000,
    )
  )


def data_config(train: str | None = None) -> ConfigDict:
  """The `data` section: where clips come from and how the grain pipeline reads them.

  `train` is a folder of audio, a CSV/JSONL manifest or a packed-shard pattern (see `aasp-data`); it
  is required, and a missing path fails before compilation.
  """
  d = ConfigDict()
  d.train = config_dict.placeholder(str) if train is None else train
  d.num_workers = 0  # grain worker processes per host (decode + crop run there); 8+ on TPU hosts
  d.read_threads = 4
  d.features = 'waveform'  # 'waveform': log-mel on device | 'log_mel': on the host
  d.crop = 'random'
  d.strict = False  # True: the first unreadable clip stops training (by default it is counted)
  # Shorter clips (after resampling) are skipped as 'too_short' and counted; the default is one
  # 16-frame patch. Shorter ones that are kept are zero-padded like any other short clip.
  d.min_samples = 2960
  return d


def checkpoint_config() -> ConfigDict:
  """Orbax checkpoints in <workdir>/checkpoints: async, every N steps, keep the last K."""
  return ConfigDict(dict(every_steps=1000, keep=3, async_save=True))


def logging_config() -> ConfigDict:
  """Progress line and metrics every N steps (process 0); an optional profiler trace."""
  return ConfigDict(
    dict(
      log_every_steps=50,
      profile_start_step=-1,  # >= 0: trace steps [start, start + profile_num_steps)
      profile_num_steps=5,
    )
  )


def probe_config() -> ConfigDict:
  """Online probe (off when every_steps == 0) with the shared protocol (evaluate/protocol.py).

  `tasks` is a comma-separated list of task manifests (CSV/JSONL with `label` and `group`).
  """
  p = ConfigDict()
  p.every_steps = 0
  p.tasks = config_dict.placeholder(str)
  p.batch_size = 16
  return p
