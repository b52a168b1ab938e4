"""NSynth instrument-family fine-tuning (11 classes): train / valid / test splits, accuracy,
400 frames.

NSynth notes are 4 s long (the note is held for 3 s, then released): 400 frames (25 patches)
covers the whole note with its release.
  aasp-finetune --config=configs/finetune/nsynth.py --config.dataset.root=/data/nsynth \
      --config.init_checkpoint=runs/pretrain --config.workdir=runs/ft_nsynth
"""

from configs.finetune import common


def get_config(arg: str | None = None):
  common.parse_arg(arg)  # no arguments; rejects stray ones
  c = common.get_config('nsynth', target_length=400)
  c.dataset.valid_split = 'valid'
  c.epochs = 5.0  # 289k training notes
  c.specaug.time_width = 80
  c.specaug.freq_width = 24
  c.eval_every = 2000
  return c
