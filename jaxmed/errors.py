"""The one base class for errors a user can cause and fix (bad path, schema, mesh, NaN loss).

`python -m jaxmed.main` prints such an error as a single line and exits with status 1; any other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
  """An error whose message names the cause and the fix in one line."""


class ConfigError(UserError, ValueError):
  """A config value jaxmed cannot use; the message names the key and the values it accepts."""
