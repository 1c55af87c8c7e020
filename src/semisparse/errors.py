"""User-facing errors.

A `SemisparseError` carries one line that names the problem and the fix; the CLI prints it and exits
non-zero without a traceback. Anything else escaping is a bug.
"""


class SemisparseError(Exception):
    """Bad input or environment, explained in one line for the user."""
