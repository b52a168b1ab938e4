"""ESC-50 fine-tuning: 5-fold cross-validation, accuracy, 512 frames (the 5 s clips whole).

One fold per run (train on the other four); the reported number is the mean over test_fold=1..5:
  for f in 1 2 3 4 5; do aasp-finetune --config=configs/finetune/esc50.py:test_fold=$f \
      --config.dataset.root=/data/ESC-50-master --config.init_checkpoint=runs/pretrain \
      --config.workdir=runs/ft_esc50/fold$f; done
"""

from configs.finetune import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, test_fold=1)
  if not 1 <= args.test_fold <= 5:
    raise ValueError(f'ESC-50 has folds 1..5; got test_fold={args.test_fold}.')
  c = common.get_config('esc50', target_length=512)
  c.dataset.test_fold = args.test_fold
  c.epochs = 60.0  # 1,600 training clips: ~2,000 steps at batch 48
  c.specaug.time_width = 96
  c.specaug.freq_width = 24
  return c
