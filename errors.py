"""The one error type every module raises for a mistake the user can fix.

A UserError (bad option, missing file, damaged checkpoint, ...) is reported by cli.run_main as one
line on stderr with exit code 2, never as a traceback. This module imports nothing, so every other
module can import it.
"""


class UserError(Exception):
    """A mistake the user can fix: reported in one line, exit code 2."""
