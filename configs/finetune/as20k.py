"""AudioSet-20K (the balanced train set) fine-tuning: 527 labels, multi-label (sigmoid BCE), mAP on
the eval set, 1024 frames (10 s clips whole).

  aasp-finetune --config=configs/finetune/as20k.py --config.dataset.root=/data/audioset \
      --config.init_checkpoint=runs/pretrain --config.workdir=runs/ft_as20k
Inverse label-frequency sampling (AST / Audio-MAE's AudioSet recipe): as20k.py:balanced_sampler=sum
"""

from configs.finetune import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, balanced_sampler='none')
  if args.balanced_sampler not in common.SAMPLERS:
    raise ValueError(
      f'balanced_sampler={args.balanced_sampler!r}; choose one of {list(common.SAMPLERS)}.'
    )
  c = common.get_config('audioset', target_length=1024)
  c.balanced_sampler = args.balanced_sampler
  c.dataset.train_split = 'train'  # the balanced_train_segments
  c.dataset.test_split = 'test'  # the eval_segments
  c.epochs = 60.0  # ~20k clips: ~25k steps at batch 48
  c.token_mask_ratio = 0.2
  c.specaug.time_width = 192
  c.specaug.freq_width = 48
  c.eval_every = 5000
  return c
