"""Errors a user can fix. `jaxgen.main` prints their one-line message and exits non-zero."""


class UserError(Exception):
  """Bad input (config, data, checkpoint, numerics) with a message naming the fix."""
