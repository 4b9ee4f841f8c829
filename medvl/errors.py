"""The one exception type for user mistakes.

A `MedvlError` says what is wrong, where (file, line, dotted key, sample id) and how to fix it. The CLI prints it
as a short panel and exits with status 2, never with a traceback. Anything else that escapes is a bug in medvl.
"""

from __future__ import annotations


class MedvlError(Exception):
    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.what]
        if self.where:
            lines.append(f"where: {self.where}")
        if self.fix:
            lines.append(f"fix: {self.fix}")
        return "\n".join(lines)
