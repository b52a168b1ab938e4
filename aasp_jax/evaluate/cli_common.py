"""What the config-driven evaluation commands (aasp-linear-eval, aasp-finetune) share: logging,
the locked config, and exit statuses (0 ok, 1 unusable data, 2 a config to change)."""

import logging
import sys
from collections.abc import Callable, Sequence

from absl import flags
from ml_collections import ConfigDict, config_flags

from aasp_jax import configuration


def run_program(
  prog: str,
  argv: Sequence[str] | None,
  parse_config: Callable[[list[str]], ConfigDict],
  body: Callable[[ConfigDict], int],
) -> int:
  """Parses the config from `argv` (sys.argv by default) and runs `body(config)`.

  Errors become one line on stderr, not a traceback: a ConfigError (from parsing or from `body`)
  exits 2, a ValueError / OSError from the data exits 1.
  """
  argv = list(sys.argv if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
  logging.getLogger('aasp_jax').setLevel(logging.INFO)
  logging.getLogger('absl').setLevel(logging.WARNING)  # orbax / grain thread chatter
  try:
    return body(parse_config(argv))
  except configuration.ConfigError as e:  # a ValueError too: caught first
    print(f'{prog}: config error: {e}', file=sys.stderr)
    return 2
  except (ValueError, OSError) as e:
    print(f'{prog}: error: {e}', file=sys.stderr)
    return 1


def parse_config_flag(
  argv: Sequence[str], default: str | None, help_text: str
) -> ConfigDict | None:
  """The locked config of `--config=FILE[:args] --config.key=value ...` in `argv` (argv[0] is the
  program), or None without --config and a default. Private flag values let a program run
  repeatedly in one process (tests) next to absl programs that define their own --config.

  Raises:
    configuration.ConfigError: an unknown flag or key, a bad value, or an extra argument.
  """
  flag_values = flags.FlagValues()
  try:
    # With a default config file, overrides are applied while the flag is defined, so a misspelt
    # key can fail here already.
    config_flag = config_flags.DEFINE_config_file(
      'config',
      default,
      help_text,
      flag_values=flag_values,
      lock_config=True,
      sys_argv=list(argv),  # the override flags are defined from these arguments, not sys.argv
    )
    rest = flag_values(list(argv))
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    raise configuration.ConfigError(str(e).strip('"')) from None
  if len(rest) > 1:
    raise configuration.ConfigError(f'Unexpected arguments: {rest[1:]}')
  return config_flag.value
