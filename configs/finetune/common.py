"""The shared fine-tuning recipe (EAT-style) that every task file starts from.

Common settings follow EAT's fine-tuning (design section 6): AdamW with peak lr 5e-5, warm-up then
cosine decay, layer-wise lr decay 0.65, mixup, SpecAugment, stochastic depth and a linear head on
the CLS token. The encoder architecture and its front end are read from the pre-training
checkpoint (`init_checkpoint`); a recipe only sets the input length (`target_length`, frames) and
the training schedule. Task files set the dataset, the length and the augmentation widths.

Each task file is run as (its module docstring gives the exact command):
  aasp-finetune --config=configs/finetune/esc50.py:test_fold=1 \
      --config.dataset.root=/data/ESC-50-master --config.init_checkpoint=runs/pretrain \
      --config.workdir=runs/ft_esc50_fold1
"""

import ast

from ml_collections import ConfigDict, config_dict

SAMPLERS = ('none', 'sum', 'rarest')


def parse_arg(arg: str | None, **defaults) -> ConfigDict:
  """'k1=v1,k2=v2' -> a ConfigDict typed by `defaults`; unknown keys fail with the valid ones."""
  out = ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(','):
    key, sep, value = item.partition('=')
    key, value = key.strip(), value.strip()
    if not sep or key not in defaults:
      valid = f'keys {sorted(defaults)}' if defaults else 'none: this recipe takes no arguments'
      raise ValueError(f'Unknown config argument {item!r} in {arg!r}; valid: {valid}.')
    default = defaults[key]
    if isinstance(default, str):
      out[key] = value
      continue
    try:
      out[key] = type(default)(ast.literal_eval(value))
    except (ValueError, SyntaxError):
      raise ValueError(
        f'Config argument {key}={value!r} must be a {type(default).__name__}.'
      ) from None
  return out


def get_config(dataset: str, target_length: int) -> ConfigDict:
  """The recipe's fields and defaults; task files override what differs."""
  c = ConfigDict()
  # Where the encoder comes from: a pre-training workdir, its checkpoints/ folder or a
  # checkpoints/<step> folder (step: the newest complete one unless `init_step` is set).
  c.init_checkpoint = config_dict.placeholder(str)
  c.init_step = config_dict.placeholder(int)
  c.which = 'teacher'  # the EMA teacher, as EAT fine-tunes

  c.dataset = ConfigDict()
  c.dataset.name = dataset  # a name of aasp_jax.evaluate.datasets.DATASETS
  c.dataset.root = config_dict.placeholder(str)
  c.dataset.test_fold = 0  # ESC-50 / US8K: the held-out fold (the others train)
  c.dataset.train_split = 'train'
  c.dataset.valid_split = ''  # '' = evaluate on the test split during training too
  c.dataset.test_split = 'test'

  # Input frames (10 ms each); a multiple of the patch (16). The encoder's positions are fixed
  # 2-D sin-cos and AaPE pools its modulation spectrum into fixed bands, so any length up to
  # model.max_time_patches * 16 works with any pre-training length.
  c.target_length = target_length

  c.batch_size = 48  # global: split over the devices
  c.eval_batch_size = 48
  c.epochs = 30.0  # passes over the training set; `steps` > 0 overrides it
  c.steps = 0

  c.optimizer = ConfigDict()
  c.optimizer.lr = 5e-5  # peak; not scaled with the batch
  c.optimizer.layer_decay = 0.65  # lr of layer l = lr * layer_decay ** (depth + 1 - l)
  c.optimizer.weight_decay = 0.05  # matrices ('kernel') only
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.warmup_fraction = 0.1  # of the steps; linear from 0, then cosine to 0
  c.optimizer.clip_norm = 0.0  # 0 = no gradient clipping

  c.mixup = 0.8  # Beta(alpha, alpha); 0 = off
  c.specaug = ConfigDict(
    dict(time_masks=1, time_width=96, freq_masks=1, freq_width=24, mask_value=0.0)
  )
  c.token_mask_ratio = 0.0  # fraction of patch tokens dropped per training example
  c.drop_path = 0.1  # stochastic depth of the last block (linear in depth from 0)
  c.balanced_sampler = 'none'  # 'sum' | 'rarest': inverse label frequency weights (AudioSet)

  c.seed = 0
  c.eval_every = 0  # steps between evaluations during training (0 = only at the end)
  c.log_every = 50
  c.num_devices = 0  # data-parallel over the first N local devices (0 = all)
  c.num_workers = 0  # grain worker processes that decode audio (raise on big machines)
  # Checkpoints, metrics and the JSON summary go here; the same workdir again resumes the run.
  c.workdir = config_dict.placeholder(str)
  # Checkpoints (the fine-tuned classifier, its optimizer state and the data position) are written
  # at every evaluation, every `every_steps` steps (0 = only then), on SIGTERM and at the end.
  c.checkpoint = ConfigDict(dict(every_steps=0, keep=2, async_save=True))
  return c
