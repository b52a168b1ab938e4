"""UrbanSound8K fine-tuning: 10-fold cross-validation, accuracy, 400 frames.

US8K clips are at most 4 s (398 frames at 10 ms); 400 frames (25 patches) holds every clip whole,
so nothing is cropped and the shortest possible input is used.
  for f in $(seq 1 10); do aasp-finetune --config=configs/finetune/us8k.py:test_fold=$f \
      --config.dataset.root=/data/UrbanSound8K --config.init_checkpoint=runs/pretrain \
      --config.workdir=runs/ft_us8k/fold$f; done
"""

from configs.finetune import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, test_fold=1)
  if not 1 <= args.test_fold <= 10:
    raise ValueError(f'UrbanSound8K has folds 1..10; got test_fold={args.test_fold}.')
  c = common.get_config('us8k', target_length=400)
  c.dataset.test_fold = args.test_fold
  c.epochs = 30.0  # ~7,900 training clips
  c.specaug.time_width = 80
  c.specaug.freq_width = 24
  return c
