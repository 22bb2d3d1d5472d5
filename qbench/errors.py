"""User-facing errors.

A `QbenchError` is a user mistake or an unusable input: the CLI prints its
message (one sentence that names the file and the fix) and exits with code 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""


class QbenchError(Exception):
    """Bad input: print the message, exit 2."""

    exit_code = 2
