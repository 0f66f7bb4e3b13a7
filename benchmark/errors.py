"""The one exception type users see: its message names the problem and the fix, and the CLI prints it."""


class BenchmarkError(Exception):
    """Bad input or a missing resource; the CLI prints the message on one line and exits with status 2."""


def one_line(text: object, limit: int = 300) -> str:
    """``text`` (an exception's message, say) as one line of at most ``limit`` characters."""
    line = " ".join(ln.strip() for ln in str(text).strip().splitlines() if ln.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class NonFiniteError(BenchmarkError):
    """NaN or inf where a run needs numbers, raised where it first appears (a defended residual, a score, a gradient)
    so the run stops there instead of carrying it into the record. Names what produced it (``what``), the suite and
    the examples (the engine adds the suite where the raising code does not know it), then ``hint``, the usual cause.
    """

    def __init__(self, what: str, examples: list[str] | tuple[str, ...] = (), hint: str = "",
                 suite: str | None = None) -> None:
        self.what, self.examples, self.hint, self.suite = what, list(examples), hint, suite
        where = [f"suite '{suite}'"] if suite else []
        if self.examples:
            more = len(self.examples) - 5
            shown = ", ".join(self.examples[:5]) + (f" and {more} more" if more > 0 else "")
            where.append(f"example{'s' if len(self.examples) > 1 else ''} {shown}")
        super().__init__(what + (f" ({'; '.join(where)})" if where else "") + "; the run stops here"
                         + (f": {hint}" if hint else ""))

    def in_suite(self, suite: str) -> "NonFiniteError":
        """The same error, naming ``suite`` unless it names one already."""
        return self if self.suite else NonFiniteError(self.what, self.examples, self.hint, suite)
