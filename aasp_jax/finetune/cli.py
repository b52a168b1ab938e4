"""`aasp-finetune`: fine-tunes a pre-trained encoder on a downstream task and reports its metric.

  aasp-finetune --config=configs/finetune/esc50.py:test_fold=1 \
      --config.dataset.root=/data/ESC-50-master --config.init_checkpoint=runs/pretrain \
      --config.workdir=runs/ft_esc50/fold1 --config.batch_size=32

Prints progress and the final metric ('accuracy' or 'mAP' on the test split / fold) and writes
into the workdir: checkpoints/<step> (the fine-tuned classifier: `aasp-predict WORKDIR AUDIO`,
`aasp-export WORKDIR OUT`), metrics.jsonl and tensorboard/, and finetune_summary.json (the
checkpoint, steps, training losses, every evaluation, skipped clips per reason and the resolved
config). The same command again resumes from the newest checkpoint (after a SIGTERM, which saves
one and exits 0); a finished run is evaluated again. The config is locked: a misspelt override key
fails while the flags are parsed, and bad values fail before any data is read or anything compiles
(exit status 2). The recipes are in configs/finetune/.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from aasp_jax import configuration
from aasp_jax.evaluate import cli_common

SUMMARY_FILE = 'finetune_summary.json'
PROG = 'aasp-finetune'


def _make_configs_importable(argv: Sequence[str]) -> None:
  """Recipes import `configs.finetune.common`: put the folder holding `configs/` on sys.path."""
  for arg in argv:
    if arg.startswith('--config='):
      path = os.path.abspath(arg.split('=', 1)[1].partition(':')[0])
      parts = path.split(os.sep)
      if 'configs' in parts:
        root = os.sep.join(parts[: len(parts) - 1 - parts[::-1].index('configs')]) or os.sep
        if root not in sys.path:
          sys.path.insert(0, root)


def parse_config(argv: Sequence[str]):
  """The locked, checked config of a command line (argv[0] is the program name).

  Raises:
    configuration.ConfigError: for a missing --config, an unknown flag or key, or a bad value.
  """
  _make_configs_importable(argv)
  config = cli_common.parse_config_flag(
    argv,
    None,
    'path/to/configs/finetune/<task>.py[:args]; override fields with --config.key=value.',
  )
  if config is None:
    raise configuration.ConfigError(
      '--config is required, e.g. --config=configs/finetune/esc50.py:test_fold=1.'
    )
  from aasp_jax.finetune import trainer

  trainer.check_config(config)
  return config


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `aasp-finetune`; returns the exit status (0 ok, 1 bad data, 2 bad config)."""
  return cli_common.run_program(PROG, argv, parse_config, _finetune)


def _finetune(config) -> int:
  from aasp_jax.finetune import trainer

  finetuner = trainer.Finetuner(config)
  print(
    f'{PROG}: {config.dataset.name}: {len(finetuner.splits.train.entries)} training and '
    f'{len(finetuner.splits.test.entries)} test clips, {len(finetuner.splits.class_names)} '
    f'classes; {finetuner.total_steps} steps of {config.batch_size} from '
    f'{finetuner.pretrained.source} ({config.which})',
    flush=True,
  )
  result = finetuner.run()
  if result.preempted:
    print(
      f'{PROG}: stopped by SIGTERM at step {result.steps}; checkpoint saved in '
      f'{config.workdir}; rerun the same command to resume.',
      flush=True,
    )
    return 0
  path = os.path.join(config.workdir, SUMMARY_FILE)
  trainer.write_summary(result, config, path, finetuner.pretrained.source)
  skipped = {split: sum(counts.values()) for split, counts in result.skipped.items()}
  loss = f'final train loss {result.train_loss[-1]:.4f}' if result.train_loss else 'no step trained'
  resumed = f', resumed from step {result.start_step}' if result.start_step else ''
  print(
    f'{PROG}: {result.metric_name} = {result.metric_value:.4f} on {result.evals[-1]["clips"]} '
    f'test clips after {result.steps} steps ({loss}{resumed}); skipped clips {skipped}; '
    f'classifier checkpoint step {result.checkpoint_step} in {config.workdir}; wrote {path}',
    flush=True,
  )
  return 0


def run() -> None:
  """Console-script entry point."""
  sys.exit(main())


if __name__ == '__main__':
  run()
