"""Widgets of the chat app: messages with image thumbnails, the streamed answer, the prompt with path completion.

Thumbnails use textual-image, which picks the best protocol the terminal supports (Kitty graphics, Sixel, else
Unicode half-blocks, which also work in tmux over SSH). It must be imported before the app starts: it asks the
terminal for its cell size once, which is impossible while Textual owns the screen.
"""

from __future__ import annotations

import os
from pathlib import Path

from textual.containers import Horizontal, Vertical
from textual.suggester import Suggester
from textual.widgets import Input, Static
from textual_image.renderable import Image as _Detected
from textual_image.renderable.unicode import Image as _ShadeOnly
from textual_image.widget import HalfcellImage
from textual_image.widget import Image as _AutoImage

# Kitty / Sixel where the terminal has them; otherwise coloured half-blocks. textual-image's last resort, shade
# characters without colour, is for terminals without colour, but inside Textual colours always exist (Textual
# maps them to what the terminal can show): there, and headless (tests, screenshots), half-blocks.
TerminalImage = HalfcellImage if _Detected is _ShadeOnly else _AutoImage

PATH_COMMANDS = ("/image ", "/save ", "/export ")


class Thumbnail(Vertical):
    """One image as the model sees it (after DICOM windowing), with its file name under it."""

    def __init__(self, image, **kwargs) -> None:
        super().__init__(classes="thumbnail", **kwargs)
        self.chat_image = image

    def compose(self):
        pil = self.chat_image.load()
        win = self.chat_image.window
        caption = self.chat_image.path.name + (f" [{win[0]:g}/{win[1]:g}]" if win else "")
        yield TerminalImage(pil, classes="thumb-image")
        yield Static(caption, classes="thumb-caption", markup=False)


class UserMessage(Vertical):
    def __init__(self, text: str, images=(), **kwargs) -> None:
        super().__init__(classes="user-message", **kwargs)
        self.text, self.images = text, list(images)

    def compose(self):
        if self.images:
            with Horizontal(classes="thumbnails"):
                for image in self.images:
                    yield Thumbnail(image)
        yield Static(self.text, classes="user-text", markup=False)


class Answer(Static):
    """The model's answer, growing as tokens arrive; a dim footer with the figures once it ends."""

    def __init__(self, **kwargs) -> None:
        super().__init__("", classes="answer", markup=False, **kwargs)
        self.text = ""
        self.footer = ""
        self.incoming: list[str] = []  # appended by the generating thread, drained by the UI (list ops are atomic)

    def on_mount(self) -> None:
        self.update("…")

    def drain(self) -> bool:
        if not self.incoming:
            return False
        n = len(self.incoming)
        self.text += "".join(self.incoming[:n])
        del self.incoming[:n]
        self.update(self.text)
        return True

    def finish(self, reply) -> None:
        from rich.text import Text

        self.text = reply.text
        parts = [f"{reply.tokens} tokens", f"{reply.tokens_per_s:.0f} tok/s", f"first token {reply.first_token_s:.2f} s"]
        if reply.reused_tokens:
            parts.append(f"{reply.reused_tokens} of {reply.prompt_tokens} prompt tokens from cache")
        if reply.stopped:
            parts.insert(0, "stopped")
        if reply.context_full:
            parts.insert(0, "context full: /clear to start over")
        self.footer = " · ".join(parts)
        body = Text(reply.text or "(no answer)")
        body.append("\n" + self.footer, style="dim italic")
        self.update(body)

    def fail(self, message: str) -> None:
        from rich.text import Text

        self.update(Text(self.text + ("\n" if self.text else "") + message, style="red"))


class Note(Static):
    """A command's result or an error, inside the conversation."""

    def __init__(self, text: str, *, error: bool = False, **kwargs) -> None:
        super().__init__(text, classes="note error" if error else "note", markup=False, **kwargs)


class CommandHelp(Static):
    """/help: each command in a column of its own, its explanation wrapped in a second column beside it (a long
    line folded back to the left edge at 80 columns and hid where the next command began)."""

    def __init__(self, rows, **kwargs) -> None:
        from rich.table import Table

        table = Table(box=None, show_header=False, padding=(0, 2, 0, 0), expand=False)
        table.add_column(no_wrap=True, style="bold")
        table.add_column(overflow="fold")
        for usage, what in rows:
            table.add_row(usage, what)
        super().__init__(table, classes="note help", **kwargs)


class PathSuggester(Suggester):
    """A slash command's name; after /image, /save or /export the longest unambiguous completion of the path."""

    def __init__(self, root: Path, commands=()) -> None:
        super().__init__(use_cache=False, case_sensitive=True)
        self.root, self.commands = root, sorted(commands)

    async def get_suggestion(self, value: str) -> str | None:
        return self.suggest(value)

    def suggest(self, value: str) -> str | None:
        if value.startswith("/") and " " not in value and len(value) > 1:
            names = [c for c in self.commands if c.startswith(value)]
            common = os.path.commonprefix(names) if names else ""
            return common + (" " if len(names) == 1 else "") if len(common) > len(value) or len(names) == 1 else None
        command = next((c for c in PATH_COMMANDS if value.startswith(c)), None)
        if command is None:
            return None
        completed = complete_path(value[len(command):], self.root)
        return command + completed if completed else None


def complete_path(typed: str, root: Path) -> str | None:
    """`typed` extended by the common prefix of the entries it can still become ('/' after a folder)."""
    expanded = os.path.expanduser(typed)
    folder, _, stem = expanded.rpartition("/")
    base = Path(folder or ".") if os.path.isabs(expanded) else root / (folder or ".")
    if folder == "" and expanded.startswith("/"):
        base = Path("/")
    try:
        names = sorted(n for n in os.listdir(base) if n.startswith(stem) and (stem.startswith(".") or n[0] != "."))
    except OSError:
        return None
    if not names:
        return None
    common = os.path.commonprefix(names)
    if len(names) == 1 and (base / names[0]).is_dir():
        common += "/"
    if common == stem:
        return None
    return typed[: len(typed) - len(stem)] + common


class PromptInput(Input):
    """The input box; Tab takes the path completion shown after the cursor.

    Tab and Enter are handled here, in the input's own queue of key events, in the order they were typed. As
    bindings they ran out of order: a priority binding runs the moment the key reaches the app, while the letters
    typed before it still wait in this queue (a fast Tab completed the text of a few keys earlier and the Enter
    after it sent the uncompleted line); a plain binding runs once the key has bubbled up to the app, by which
    time letters typed after Enter could already be in the value it sends. The submitted line leaves the box at
    once, so type-ahead after Enter starts the next line.
    """

    async def _on_key(self, event) -> None:
        if event.key not in ("tab", "enter"):
            await super()._on_key(event)
            return
        event.stop()  # also keeps Tab from moving the focus off the prompt (the screen's focus-next)
        event.prevent_default()
        if event.key == "tab":
            self.accept_completion()
        else:
            line, self.value = self.value, ""
            self.post_message(self.Submitted(self, line))

    def accept_completion(self) -> None:
        # computed from the value as it is now: the suggestion worker may not have run for the last keys yet
        suggestion = self.suggester.suggest(self.value) if isinstance(self.suggester, PathSuggester) else None
        suggestion = suggestion or (self._suggestion if self._suggestion.startswith(self.value) else None)
        if suggestion and len(suggestion) > len(self.value) and suggestion.startswith(self.value):
            self.value = suggestion
            self.cursor_position = len(self.value)
