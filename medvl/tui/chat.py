"""`medvl chat` on a terminal: a Textual app over medvl.session.ChatSession (one model, or two side by side).

In compare mode both models share one scrolling conversation: each question (and its images) spans the width and
the two answers stand side by side in one row under it, so scrolling moves both answers together and turn N of A
always sits beside turn N of B (two independently scrolling columns drifted apart as their answers' lengths
differed).

The screen is up before the model has loaded (loading runs in a worker thread; what you type meanwhile is
queued and sent once it is ready). Each answer streams in a worker thread too, so the UI never blocks: Esc or
Ctrl-C stops the answer and keeps the conversation. The status line shows model, family, device, dtype, the last
answer's tokens/s and how much of the model's context the conversation uses.
"""

from __future__ import annotations

import time
from pathlib import Path

from medvl.tui.chat_widgets import (  # noqa: I001
    Answer, CommandHelp, Note, PathSuggester, PromptInput, Thumbnail, UserMessage,
)
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Static

from medvl.errors import MedvlError
from medvl.session import COMMANDS, help_rows

HELLO = ("Ask about your images. /image PATH attaches one (TAB completes), /help lists the commands, "
         "PgUp/PgDn scroll, Esc stops an answer, Ctrl-Q quits.")


class ChatApp(App):
    CSS_PATH = "medvl.tcss"
    TITLE = "medvl chat"
    BINDINGS = [
        Binding("escape", "stop", "stop answer", priority=True),
        Binding("ctrl+c", "stop", "stop answer", priority=True, show=False),
        Binding("ctrl+q", "quit", "quit", priority=True),
        # the prompt keeps the focus, so the conversation scrolls by these (and the mouse wheel)
        Binding("pageup", "page(-1)", "scroll up", show=False),
        Binding("pagedown", "page(1)", "scroll down", show=False),
    ]

    def __init__(self, sources, *, options=None, images=(), system: str | None = None, dtype: str | None = None,
                 device=None, bots=None) -> None:
        """`sources`: resolved models (medvl.resolve), loaded in a worker; or `bots`: already-loaded Chatbots."""
        super().__init__()
        self.sources = list(sources) if sources else [b.source for b in bots]
        self.options, self.system, self.dtype, self.device = options, system, dtype, device
        self.initial_images = list(images)
        self.session = None
        self._bots = bots
        self.queued: list[str] = []
        self.running = 0
        self.t_load = time.perf_counter()
        self.loading = ""

    # -- layout

    def compose(self) -> ComposeResult:
        if len(self.sources) > 1:
            with Horizontal(id="titles"):
                for i, src in enumerate(self.sources):
                    yield Static(f"{'AB'[i]} · {src.name} · {src.family.name}",
                                 classes="column-title second" if i else "column-title", markup=False)
        yield VerticalScroll(id="conversation")
        yield PromptInput(placeholder="Ask a question, or /help", id="prompt",
                          suggester=PathSuggester(Path.cwd(), COMMANDS))
        yield Static("", id="status", markup=False)

    def on_mount(self) -> None:
        self.query_one("#prompt").focus()
        self.set_interval(1 / 20, self.flush)
        self.note(HELLO)
        self.loading = ", ".join(s.describe() for s in self.sources)
        self.set_status(f"loading {self.loading} … (you can type; questions are sent once it is loaded)")
        if self._bots is not None:
            self.loaded(self._bots)
        else:
            self.load_models()

    @work(thread=True, exclusive=True, group="load")
    def load_models(self) -> None:
        from medvl.inference import Chatbot

        try:
            bots = [Chatbot(source=s, dtype=self.dtype, device=self.device, options=self.options,
                            system=self.system) for s in self.sources]
        except Exception as exc:  # MedvlError (adapter does not fit) or a broken checkpoint: say it, stay up
            self.call_from_thread(self.note, _message(exc), error=True)
            self.call_from_thread(self.load_failed)
            return
        self.call_from_thread(self.loaded, bots)

    def load_failed(self) -> None:
        self.loading = ""
        self.set_status("the model failed to load: see above; Ctrl-Q quits")

    def loaded(self, bots) -> None:
        from medvl.session import ChatSession

        self.loading = ""
        try:
            self.session = ChatSession(bots, self.initial_images)
        except MedvlError as exc:
            self.session = ChatSession(bots)
            self.note(_message(exc), error=True)
        if self.session.pending:
            self.show(Vertical(*[Thumbnail(im) for im in self.session.pending], classes="pending"))
            self.note(f"{len(self.session.pending)} image(s) attached; they go with your first question")
        self.set_status(self.status_text(f"loaded in {time.perf_counter() - self.t_load:.1f} s"))
        queued, self.queued = self.queued, []
        for line in queued:
            self.submit(line)

    # -- helpers

    @property
    def conversation(self) -> VerticalScroll:
        return self.query_one("#conversation", VerticalScroll)

    def show(self, widget) -> None:
        self.conversation.mount(widget)
        self.conversation.scroll_end(animate=False)

    def answers(self) -> list[Answer]:
        """The last turn's answers, one per model (A, B)."""
        rows = self.conversation.query(".answers")
        return list(rows.last().query(Answer)) if rows else []

    def note(self, text: str, *, error: bool = False) -> None:
        self.show(Note(text, error=error))

    def set_status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    def status_text(self, extra: str = "") -> str:
        bots = self.session.bots if self.session else []
        parts = []
        for i, bot in enumerate(bots):
            speed = f"{bot.last.tokens_per_s:.0f} tok/s" if bot.last else "- tok/s"
            limit = f"/{bot.context_limit}" if bot.context_limit else ""
            who = f"{bot.source.name} · {bot.family.name} ·" if len(bots) == 1 else "AB"[i]
            parts.append(f"{who} {speed} · context {bot.context_used}{limit}")
        if bots:  # device and dtype once: compare mode loads both models the same way
            parts.insert(1 if len(bots) == 1 else 0, f"{bots[0].device} · {bots[0].dtype}")
        return " · ".join(parts) + (f" · {extra}" if extra else "")

    # -- input

    def on_input_submitted(self, event: PromptInput.Submitted) -> None:
        line = event.value  # the prompt has emptied itself (PromptInput: type-ahead goes to the next line)
        if self.session is None:
            if line.strip():
                self.queued.append(line)
                self.note(f"queued until the model is loaded: {line}")
            return
        if self.running:
            self.note("the model is still answering: Esc stops it", error=True)
            if not event.input.value:  # given back to edit or send again, unless the next line is being typed
                event.input.value = line
            return
        self.submit(line)

    def submit(self, line: str) -> None:
        try:
            step = self.session.handle(line)
        except MedvlError as exc:
            self.note(_message(exc), error=True)
            return
        if step.quit:
            self.action_stop()
            self.exit()
            return
        conversation = self.conversation
        if step.clear:
            conversation.remove_children()
        if step.undo:
            for cls in (".answers", "UserMessage"):
                found = conversation.query(cls)
                if found:
                    found.last().remove()
        if step.help:
            self.show(CommandHelp(help_rows()))
        elif step.message:
            self.note(step.message)
        if step.images and not step.streams:  # /image or /window: show what the model will see
            kind = "pending" if line.strip().startswith("/image") else "rewindowed"
            self.show(Vertical(*[Thumbnail(im) for im in step.images], classes=kind))
        if not step.streams:
            self.set_status(self.status_text())
            return
        if step.retry:
            found = conversation.query(".answers")
            if found:
                found.last().remove()
        else:
            conversation.query(".pending").remove()
            conversation.mount(UserMessage(step.question, step.images))
        answers = [Answer() for _ in step.streams]
        # one row: in compare mode the answers stand side by side and scroll as one
        self.show(Horizontal(*[Vertical(a, classes="cell second" if i else "cell") for i, a in enumerate(answers)],
                             classes="answers"))
        self.running = len(step.streams)
        for bot, stream, answer in zip(self.session.bots, step.streams, answers):
            self.stream_answer(bot, stream, answer)
        self.set_status(self.status_text("answering … Esc stops"))

    @work(thread=True)
    def stream_answer(self, bot, stream, answer: Answer) -> None:
        # Pieces go to a list the UI drains 20 times a second (flush): waiting for the UI on every token
        # (call_from_thread blocks) cost the tiny model two thirds of its speed.
        try:
            for piece in stream:
                answer.incoming.append(piece)
            self.call_from_thread(self.flush)
            self.call_from_thread(answer.finish, bot.last)
        except Exception as exc:  # context overflow mid-answer, a CUDA error: shown, the session lives
            self.call_from_thread(answer.fail, _message(exc))
        finally:
            self.call_from_thread(self._answer_done)

    def flush(self) -> None:
        if self.loading:  # a 7B model takes a while: show that it is still going
            self.set_status(f"loading {self.loading} … {time.perf_counter() - self.t_load:.0f} s (you can type; "
                            "questions are sent once it is loaded)")
        if not self.running:
            return
        following = self.following()
        moved = False
        for answer in self.answers():
            moved |= answer.drain()
        if moved and following:
            self.conversation.scroll_end(animate=False)

    def following(self) -> bool:
        """The view is at the end of the conversation: new text keeps it there. Scrolled up (PgUp, the wheel) to
        read an earlier turn, it stays put while an answer streams in."""
        return self.conversation.scroll_y >= self.conversation.max_scroll_y - 1

    def _answer_done(self) -> None:
        self.running -= 1
        if not self.running:
            self.set_status(self.status_text())
            if self.following():
                self.conversation.scroll_end(animate=False)

    def action_page(self, direction: int) -> None:
        if direction < 0:
            self.conversation.scroll_page_up(animate=False)
        else:
            self.conversation.scroll_page_down(animate=False)

    def action_stop(self) -> None:
        if self.running and self.session:
            for bot in self.session.bots:
                bot.stop()

    async def action_quit(self) -> None:
        self.action_stop()  # an answer in progress ends at its next token instead of holding up the exit
        self.exit()


def _message(exc: Exception) -> str:
    return exc.render() if isinstance(exc, MedvlError) else f"{type(exc).__name__}: {exc}"
