"""What the config-driven evaluation commands (aasp-linear-eval, aasp-finetune) share: logging,
the locked config, and exit statuses (0 ok, 1 unusable data, 2 a config to change)."""

import logging
import sys
from collections.abc import Callable, Sequence

from ml_collections import ConfigDict

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
