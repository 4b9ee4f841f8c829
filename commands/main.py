"""The `medvl` command: one Typer app, an explicit list of subcommands.

Every command module here is cheap to import (typer + rich only); torch, transformers, accelerate, peft and
textual are imported inside command bodies, so `medvl --help` and TAB completion stay well under a quarter
second (tests/test_cli_startup.py proves no heavy module is loaded).
"""

from __future__ import annotations

import sys

import typer

from medvl import __version__
from medvl.commands.help_format import Command, Group

app = typer.Typer(
    name="medvl",
    cls=Group,
    help="Build medical vision-language models from the terminal: convert, prepare-data, train, eval, chat, export.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"medvl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                 help="Print the medvl version and exit."),
) -> None:
    """medvl: the HuatuoGPT-Vision recipe, end to end, for Qwen2/2.5/3-VL, LLaVA and InternVL."""


# ---------------------------------------------------------------------------------------------------------
# The explicit list of commands. A command is registered only once it works; test_cli_startup.py and
# test_completions.py walk this list, so help, start-up hygiene and completion cover every command.
from medvl.commands import chat as _chat  # noqa: E402
from medvl.commands import convert as _convert  # noqa: E402
from medvl.commands import demo as _demo  # noqa: E402
from medvl.commands import doctor as _doctor  # noqa: E402
from medvl.commands import prepare_data as _prepare  # noqa: E402
from medvl.commands import export as _export  # noqa: E402
from medvl.commands import evaluate as _evaluate  # noqa: E402
from medvl.commands import recipes as _recipes  # noqa: E402
from medvl.commands import score as _score  # noqa: E402
from medvl.commands import serve as _serve  # noqa: E402
from medvl.commands import tiny as _tiny  # noqa: E402
from medvl.commands import train as _train  # noqa: E402
from medvl.commands import plot as _plot  # noqa: E402
from medvl.commands import watch as _watch  # noqa: E402

COMMANDS = {  # in the order of the recipe; `medvl --help` lists them so
    "doctor": _doctor.doctor,
    "convert": _convert.convert,
    "prepare-data": _prepare.prepare_data,
    "inspect-data": _prepare.inspect_data,
    "train": _train.train,
    "watch": _watch.watch,
    "plot": _plot.plot,
    "eval": _evaluate.evaluate,
    "score": _score.score,
    "chat": _chat.chat,
    "export": _export.export,
    "serve": _serve.serve,
    "tiny": _tiny.tiny,
    "demo": _demo.demo,
}
GROUPS = {
    "recipes": _recipes.app,
}

for _name, _fn in COMMANDS.items():
    # Examples shown under each command's help: the function's own, else its module's EXAMPLES.
    _examples = getattr(_fn, "examples", None) or getattr(sys.modules[_fn.__module__], "EXAMPLES", None)
    app.command(_name, epilog=_examples, cls=Command)(_fn)
for _name, _group in GROUPS.items():
    app.add_typer(_group, name=_name)


def _quiet_known_noise() -> None:
    """DeepSpeed, imported by transformers whenever it is installed, warns "Setting accelerator to CPU" on every
    command of a machine without a GPU; that is expected here and `medvl doctor` reports the device properly."""
    import logging

    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())


# What to do after Ctrl-C, per command: each of these picks up where it stopped.
_AFTER_INTERRUPT = {
    "train": "continue from the newest checkpoint: {resume}",
    "prepare-data": "run the same command again: completed shards are kept and skipped",
    "eval": "run the same command again: answers already written are kept",
}


def interrupt_hint(argv: list[str]) -> str | None:
    """The line printed under "interrupted" for `argv` (sys.argv[1:])."""
    command = next((a for a in argv if not a.startswith("-")), None)
    hint = _AFTER_INTERRUPT.get(command or "")
    if hint is None:
        return None
    if command == "train":
        import shlex

        args, skip = [], False
        for a in argv:  # drop any --resume X / --resume=X / --dry-run, then ask for the newest checkpoint
            if skip:
                skip = False
            elif a == "--resume":
                skip = True
            elif not a.startswith("--resume=") and a != "--dry-run":
                args.append(a)
        from medvl.commands.ui import interrupt_context

        run_dir = interrupt_context.get("run_dir")
        if run_dir is not None and not _has_checkpoint(run_dir):
            every = interrupt_context.get("save_every")
            return (f"no checkpoint was saved yet (train.save_every={every}), so there is nothing to resume: start "
                    "over with: medvl " + " ".join(shlex.quote(a) for a in args) + " output.overwrite=true")
        return hint.format(resume="medvl " + " ".join(shlex.quote(a) for a in args) + " --resume auto")
    return hint


def _has_checkpoint(run_dir) -> bool:
    from pathlib import Path

    from medvl.checkpoint_files import list_checkpoints

    try:
        return bool(list_checkpoints(Path(run_dir)))
    except OSError:
        return True  # cannot tell: the usual hint


def main() -> None:
    """Console-script entry: user mistakes (MedvlError) print as a panel and exit 2, never a traceback; Ctrl-C
    prints "interrupted" (and how to continue) and exits 130."""
    import signal

    from medvl.errors import MedvlError

    _quiet_known_noise()
    # Typer turns KeyboardInterrupt into a silent exit 130; this flag is how main() knows that happened.
    hit = []

    def on_sigint(signum, frame):
        hit.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        app(standalone_mode=True)
    except MedvlError as exc:
        from medvl.commands.ui import print_error

        print_error(exc)
        sys.exit(2)
    except (KeyboardInterrupt, SystemExit) as exc:
        if isinstance(exc, SystemExit) and not hit:
            raise
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the message short
        print("interrupted", file=sys.stderr)
        hint = interrupt_hint(sys.argv[1:])
        if hint:
            print(hint, file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
