"""`aasp-linear-eval`: linear evaluation of a frozen pre-trained encoder (configs/linear_eval.py).

  aasp-linear-eval --config.checkpoint=runs/quickstart --config.task=data/sonicpi/task.csv
  aasp-linear-eval --config.checkpoint=runs/quickstart \
      --config.train=data/sonicpi/probe_train.csv --config.test=data/sonicpi/probe_test.csv
  aasp-linear-eval --config=configs/linear_eval.py:classifier=adamw --config.checkpoint=... \
      --config.seeds='(0, 1, 2, 3, 4)' --config.output=runs/eval/adamw.json

Prints the accuracy per seed, their mean and std, and writes the full result as JSON
(config.output, default <checkpoint workdir>/linear_eval_<which>_<step>.json) together with the
resolved config. The config is locked: a misspelt key fails while the flags are parsed and a bad
value before anything is read or compiled (exit status 2); unusable data exits with status 1.
"""

import json
import os
import sys
from collections.abc import Sequence


from aasp_jax.evaluate import cli_common

PROG = 'aasp-linear-eval'
DEFAULT_CONFIG = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  'configs',
  'linear_eval.py',
)


def parse_config(argv: Sequence[str]):
  """The locked, checked config of a command line (argv[0] is the program name).

  Raises:
    configuration.ConfigError: for an unknown flag or key, or a bad value.
  """
  config = cli_common.parse_config_flag(
    argv,
    DEFAULT_CONFIG,
    'path/to/configs/linear_eval.py[:classifier=adamw]; override with --config.key=value.',
  )
  from aasp_jax.evaluate import linear_eval

  linear_eval.check_config(config)
  return config


def output_path(config, result: dict) -> str:
  if config.output:
    return config.output
  workdir = os.path.dirname(os.path.dirname(result['checkpoint']))
  task = f'_{result["task"]}' if 'task' in result else ''
  return os.path.join(workdir, f'linear_eval_{result["which"]}_{result["step"]}{task}.json')


def summary(result: dict) -> str:
  if 'task' in result:
    head = result['protocol']['headline_feature']
    lines = [
      f'{PROG}: task {result["task"]} ({result["num_classes"]} classes, {result["clips"]} clips, '
      f'{result["groups"]} sources; {sum(result["skipped"].values())} skipped), '
      f'{result["protocol"]["repeats"]} x {result["protocol"]["folds"]}-fold group k-fold'
    ]
    for feature, per in result['scores'].items():
      mark = ' (headline)' if feature == head else ''
      lines.append(
        f'{PROG}: {feature:<8} ' + '  '.join(
          f'{c} {s["accuracy"]:.4f} ± {s["se"]:.4f}' for c, s in per.items()
        ) + mark
      )
    return '\n'.join(lines)
  if result['classifier'] == 'lbfgs':
    r = result['per_seed'][0]
    return (
      f'{PROG}: lbfgs on {result["splits"]} ({result["num_classes"]} classes, '
      f'{result["train_clips"]} train / {result["test_clips"]} test clips, {result["skipped"]} '
      f'skipped)\n{PROG}: accuracy {r["accuracy"]:.4f} (l2 {r["l2"]:g}; one deterministic fit on '
      'one split, so no uncertainty: use --config.task for the repeated group k-fold protocol)'
    )
  per_seed = ', '.join(
    f'seed {r["seed"]}: {r["accuracy"]:.4f} (l2 {r["l2"]:g})' for r in result['per_seed']
  )
  return (
    f'{PROG}: {result["classifier"]} on {result["splits"]} ({result["num_classes"]} classes, '
    f'{result["train_clips"]} train / {result["test_clips"]} test clips, {result["skipped"]} '
    f'skipped; embeddings cache {result["cache"]["train"]}/{result["cache"]["test"]})\n'
    f'{PROG}: accuracy {result["accuracy_mean"]:.4f} ± {result["accuracy_std"]:.4f} over '
    f'{len(result["seeds"])} seed(s) [{per_seed}]'
  )


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `aasp-linear-eval`; returns the exit status (0 ok, 1 bad data, 2 bad config)."""
  return cli_common.run_program(PROG, argv, parse_config, _linear_eval)


def _linear_eval(config) -> int:
  from aasp_jax.evaluate import linear_eval

  result = linear_eval.linear_eval(config)
  path = output_path(config, result)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump({'result': result, 'config': config.to_dict()}, f, indent=2, default=list)
  print(summary(result), flush=True)
  print(f'{PROG}: wrote {path}', flush=True)
  return 0


def run() -> None:
  """Console-script entry point."""
  sys.exit(main())


if __name__ == '__main__':
  run()
