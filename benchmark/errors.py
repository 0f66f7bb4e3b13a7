"""The one exception type users see: its message names the problem and the fix, and the CLI prints it."""


class BenchmarkError(Exception):
    """Bad input or a missing resource; the CLI prints the message on one line and exits with status 2."""


def one_line(text: object, limit: int = 300) -> str:
    """``text`` (an exception's message, say) as one line of at most ``limit`` characters."""
    line = " ".join(ln.strip() for ln in str(text).strip().splitlines() if ln.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."
