"""The one error type users see: it names where the problem is and what to do."""

from __future__ import annotations


class LmlabError(Exception):
    """A user-facing error about bad input, raised before any compute is spent.

    The CLI prints it without a traceback, so its message must name the file,
    line and field when they are known, and say how to fix the problem.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None, hint: str | None = None):
        self.file, self.line, self.field, self.hint = file, line, field, hint
        self.message = message
        where = ""
        if file:
            where = f"{file}:{line}" if line is not None else str(file)
        if field:
            where = f"{where}: {field}" if where else field
        text = f"{where}: {message}" if where else message
        if hint:
            text += f" ({hint})"
        super().__init__(text)
