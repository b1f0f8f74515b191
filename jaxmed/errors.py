"""The one base class for errors a user can cause and fix (bad path, schema, mesh, NaN loss).

`python -m jaxmed.main` prints such an error as a single line and exits with status 1 (or the
error's `exit_status`); any other exception is a bug and keeps its traceback.
"""

import contextlib
import sys
from typing import Iterator


class UserError(Exception):
  """An error whose message names the cause and the fix in one line."""


class ConfigError(UserError, ValueError):
  """A config value jaxmed cannot use; the message names the key and the values it accepts."""


@contextlib.contextmanager
def exit_with_one_line() -> Iterator[None]:
  """For command-line entry points: a UserError becomes `jaxmed: error: ...` and exit status 1."""
  try:
    yield
  except UserError as e:
    from absl import logging
    logging.flush()  # Log lines first, so the error is the last line a user sees.
    print(f'jaxmed: error: {e}', file=sys.stderr)
    sys.exit(getattr(e, 'exit_status', 1))
