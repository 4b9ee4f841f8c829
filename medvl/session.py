"""What a chat front end does with a line of input: the slash commands, shared by the Textual app and the plain
line mode, over one Chatbot or two (side-by-side compare: every question goes to both).

    session = ChatSession([bot])               # or [bot_a, bot_b]
    step = session.handle("/image ct.dcm")     # -> Step(message="attached ct.dcm ...")
    step = session.handle("What is this?")     # -> Step(streams=[iterator of text pieces per bot], images=[...])

Nothing here prints; a Step says what to show. Errors are MedvlError (the caller shows them; the session lives).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from medvl.conversation import ChatImage, export_markdown, parse_window, save_record
from medvl.errors import MedvlError

COMMANDS = {  # name: (argument, what it does); /help lays them out in two columns
    "/image": ("PATH", "attach an image to your next question (TAB completes the path; several allowed)"),
    "/clear": ("", "start a new conversation (also frees the model's context)"),
    "/undo": ("", "remove the last question and its answer"),
    "/retry": ("", "answer the last question again"),
    "/system": ("TEXT", "set the system prompt (empty: the model's default)"),
    "/window": ("W", "DICOM window: lung, mediastinum, bone, brain, abdomen, CENTER/WIDTH, or file"),
    "/save": ("FILE", "append the conversation as one training record (prepare-data reads it)"),
    "/export": ("FILE", "write the conversation with its image paths as Markdown"),
    "/help": ("", "this list"),
    "/quit": ("", "leave"),
}


def help_rows() -> list[tuple[str, str]]:
    """(usage, what it does) per command: the app shows them as a two-column table."""
    return [(f"{name} {arg}".rstrip(), what) for name, (arg, what) in COMMANDS.items()]


def help_text(width: int = 80) -> str:
    """The commands as plain text: usage in a column of its own, explanations wrapped under each other."""
    import textwrap

    rows = help_rows()
    indent = " " * (max(len(usage) for usage, _ in rows) + 2)
    return "\n".join(textwrap.fill(what, width, initial_indent=indent, subsequent_indent=indent)
                     .replace(indent, f"{usage:<{len(indent)}}", 1) for usage, what in rows)


@dataclass
class Step:
    message: str = ""  # a note to show (command results)
    streams: list[Iterator[str]] = field(default_factory=list)  # one per bot: the answer as it is generated
    question: str = ""
    images: list[ChatImage] = field(default_factory=list)
    clear: bool = False  # the UI should clear its conversation view
    undo: bool = False  # the UI should remove its last exchange
    retry: bool = False  # the UI should replace the last answer
    quit: bool = False
    help: bool = False  # message is the command list: the app lays it out as a table (help_rows)


class ChatSession:
    def __init__(self, bots: list, images=()):
        self.bots = list(bots)
        self.pending: list[ChatImage] = [self._checked(p) for p in images]

    @property
    def bot(self):
        return self.bots[0]

    def _checked(self, path) -> ChatImage:
        image = self.bot.image(path)
        for other in self.bots[1:]:
            other.image(path)  # a text-only model in compare mode refuses it too
        return image

    def handle(self, line: str) -> Step:
        line = line.strip()
        if not line:
            raise MedvlError("empty message", fix="type a question, or /help for the commands")
        if not line.startswith("/") or line.startswith("//"):
            return self.ask(line[1:] if line.startswith("//") else line)
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        name = name.lower()
        if name not in COMMANDS:
            import difflib

            close = difflib.get_close_matches(name, COMMANDS, n=1)
            raise MedvlError(f"unknown command {name}", fix=(f"did you mean {close[0]}? " if close else "")
                             + "/help lists the commands; start a question with // to send a literal /")
        return getattr(self, "_" + name[1:])(arg)

    def ask(self, text: str) -> Step:
        images, self.pending = self.pending, []
        try:
            streams = [bot.stream(text, images) for bot in self.bots]
        except MedvlError:
            self.pending = images  # kept for the next try
            for bot in self.bots:  # a bot that accepted the turn before another refused it drops it again
                if bot.turns and bot.turns[-1].role == "user":
                    bot.turns.pop()
            raise
        return Step(streams=streams, question=text, images=images)

    # -- commands

    def _image(self, arg: str) -> Step:
        if not arg:
            raise MedvlError("no image path given", fix="/image PATH")
        image = self._checked(arg)
        self.pending.append(image)
        w, h = image.load().size
        return Step(f"attached {image.path.name} ({w}x{h}{', DICOM' if image.dicom else ''}); "
                    f"it goes with your next question", images=[image])

    def _clear(self, arg: str) -> Step:
        for bot in self.bots:
            bot.reset()
        self.pending = []
        return Step("new conversation", clear=True)

    def _undo(self, arg: str) -> Step:
        done = [bot.undo() for bot in self.bots]
        if not any(done):
            raise MedvlError("nothing to undo")
        return Step("removed the last question and answer", undo=True)

    def _retry(self, arg: str) -> Step:
        streams = [bot.retry() for bot in self.bots]
        last = next(t for t in reversed(self.bot.turns) if t.role == "user")
        return Step(streams=streams, question=last.text, images=list(last.images), retry=True)

    def _system(self, arg: str) -> Step:
        for bot in self.bots:
            bot.system = arg or None  # the cached prefix stops matching: the next turn prefills again
        return Step(f"system prompt: {arg}" if arg else "system prompt: the model's default")

    def _window(self, arg: str) -> Step:
        window = parse_window(arg)
        self.pending = [ChatImage(im.path, window, True) if im.dicom else im for im in self.pending]
        n = sum(im.dicom for im in self.pending)
        n += max(bot.set_window(window) for bot in self.bots)
        if not n:
            raise MedvlError("no DICOM image in this conversation to window",
                             fix="/window applies to DICOM images; attach one with /image FILE.dcm")
        shown = f"{window[0]:g}/{window[1]:g}" if window else "the file's own"
        return Step(f"window {shown} on {n} DICOM image(s); the model sees the new pixels from the next question",
                    images=[im for im in self.all_images() if im.dicom])

    def all_images(self) -> list[ChatImage]:
        return [im for t in self.bot.turns for im in t.images] + self.pending

    def _save(self, arg: str) -> Step:
        if not arg:
            raise MedvlError("no file given", fix="/save FILE.jsonl")
        for bot in self.bots:
            out = save_record(bot.turns, arg, system=bot.system, model=str(bot.source.path))
        # prepare-data reads images inside the file's folder; others need their folder named (the root rule)
        folder = out.absolute().parent
        outside = sorted({str(im.path.parent) for t in self.bot.turns for im in t.images
                          if folder not in im.path.absolute().parents})
        roots = "".join(f" --image-root {d}" for d in outside)
        return Step(f"appended {len(self.bots)} record(s) to {out}; train on it after "
                    f"`medvl prepare-data {out}{roots} --out DIR`")

    def _export(self, arg: str) -> Step:
        if not arg:
            raise MedvlError("no file given", fix="/export FILE.md")
        out = Path(arg)
        if len(self.bots) == 1:
            export_markdown(self.bot.turns, out, system=self.bot.system, model=str(self.bot.source.path))
        else:
            from medvl.conversation import to_markdown

            text = "\n\n".join(to_markdown(b.turns, system=b.system, model=str(b.source.path)) for b in self.bots)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
        return Step(f"wrote {out}")

    def _help(self, arg: str) -> Step:
        return Step(help_text(), help=True)

    def _quit(self, arg: str) -> Step:
        return Step(quit=True)
