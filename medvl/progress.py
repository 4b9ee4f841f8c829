"""How long-running library functions report progress without knowing about any UI.

The library calls a `ProgressSink`; the CLI hands in one that draws a rich progress bar (or prints plain lines
when stdout is not a terminal), tests hand in `NullProgress` or a recording sink of their own (tests/conftest.py).
"""

from __future__ import annotations

from typing import Protocol


class ProgressSink(Protocol):
    def start(self, task: str, total: int | None = None) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def note(self, message: str) -> None: ...
    def finish(self) -> None: ...


class NullProgress:
    def start(self, task: str, total: int | None = None) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def finish(self) -> None:
        pass
