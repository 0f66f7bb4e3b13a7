"""The one exception type users see: its message names the problem and the fix, and the CLI prints it."""


class BenchmarkError(Exception):
    """Bad input or a missing resource; the CLI prints the message on one line and exits with status 2."""
