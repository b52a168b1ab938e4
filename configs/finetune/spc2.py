"""Speech Commands V2 (35 words) fine-tuning: train / valid / test lists, accuracy, 128 frames.

Utterances are 1 s (98 frames); 128 frames (8 patches) hold them whole.
  aasp-finetune --config=configs/finetune/spc2.py \
      --config.dataset.root=/data/speech_commands_v0.02 --config.init_checkpoint=runs/pretrain \
      --config.workdir=runs/ft_spc2
"""

from configs.finetune import common


def get_config(arg: str | None = None):
  common.parse_arg(arg)  # no arguments; rejects stray ones
  c = common.get_config('spc2', target_length=128)
  c.dataset.valid_split = 'valid'
  c.epochs = 10.0  # 85k training utterances
  c.batch_size = 128
  c.eval_batch_size = 128
  c.specaug.time_width = 24
  c.specaug.freq_width = 24
  c.eval_every = 2000
  return c
