"""`medvl chat --plain`: a line loop for bare SSH sessions and scripts (the seed's cli.py, done properly).

Each input line is a question or a slash command (/image PATH, /clear, /quit, ... as in the app; `clear` and
`quit` / `exit` also work bare, as in the seed). Answers go to stdout, streamed; everything else (notes, errors)
to stderr, so `echo "What modality is this?" | medvl chat MODEL --image ct.dcm` prints exactly one answer.
`--json` prints one JSON object per answer instead: {"answer", "tokens", "seconds"} (+ "model" when comparing);
a line that fails prints {"error", "where", "fix", "input"} in its place (and the error on stderr).
A failed line (a bad image, an overflowing context) is reported and the loop goes on; the exit status is then 2.
Ctrl-C during an answer stops that answer and keeps the conversation; at the prompt it leaves.
"""

from __future__ import annotations

import json
import sys

from medvl.errors import MedvlError

ALIASES = {"clear": "/clear", "quit": "/quit", "exit": "/quit", "q": "/quit"}


NO_QUESTION = "stdin holds no question: it ended before any line was read, so nothing was asked of {model}"
NO_QUESTION_FIX = ("pipe the questions in, one per line: echo 'What modality is this?' | medvl chat MODEL "
                   "--image x.png (or run it in a terminal for the app)")


def check_stdin(model) -> None:
    """A piped stdin that is already at its end (< /dev/null, an empty questions file) would load the model for
    nothing: refuse before loading. Only a stdin that is readable now is peeked at; a writer that has not written
    yet is waited for as usual (run_plain reports it if it never asks)."""
    import select

    stream = sys.stdin
    if stream is None or stream.isatty() or not hasattr(stream, "buffer") or not hasattr(stream.buffer, "peek"):
        return
    try:
        ready, _, _ = select.select([stream], [], [], 0)
        empty = bool(ready) and not stream.buffer.peek(1)
    except (OSError, ValueError):  # not a selectable file (Windows pipes, a closed stdin)
        return
    if empty:
        raise MedvlError(NO_QUESTION.format(model=model), where="stdin", fix=NO_QUESTION_FIX)


def run_plain(session, *, as_json: bool = False, stdin=None, stdout=None, stderr=None) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin.isatty()
    failed = False
    read_any = False  # a piped stdin without a single line asked nothing: exit 2, not a silent 0
    # as the app's columns: A / B, then the run's name ("final" would say nothing and could be the same twice)
    names = [f"{'AB'[i]} {bot.source.name}" for i, bot in enumerate(session.bots)]
    while True:
        if interactive:
            stderr.write("you> ")
            stderr.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line and not interactive:
            continue  # blank lines in a piped script are spacing, not questions
        read_any = True
        line = ALIASES.get(line.lower(), line)
        try:
            step = session.handle(line)
        except MedvlError as exc:
            failed = True
            _error(exc, line, as_json, stdout, stderr)
            continue
        if step.quit:
            break
        if step.message:
            stderr.write(step.message + "\n")
        for name, bot, stream in zip(names, session.bots, step.streams):
            try:
                failed |= _answer(stream, bot, name if len(names) > 1 else None, as_json, stdout, stderr)
            except MedvlError as exc:
                failed = True
                _error(exc, line, as_json, stdout, stderr)
            except KeyboardInterrupt:  # Ctrl-C mid-answer stops that answer (kept, as in the app), not the session
                stream.close()
                stdout.write("\n")
                stderr.write("(stopped)\n")
    if not read_any and not interactive:
        exc = MedvlError(NO_QUESTION.format(model=session.bot.source.path), where="stdin", fix=NO_QUESTION_FIX)
        stderr.write(f"error: {exc.render()}\n")
        return 2
    return 2 if failed else 0


def _error(exc: MedvlError, line: str, as_json: bool, stdout, stderr) -> None:
    """A line that failed: on stderr always; with --json also one object on stdout, so a script that reads one
    object per question keeps its questions and answers paired."""
    stderr.write(f"error: {exc.render()}\n")
    if as_json:
        stdout.write(json.dumps({"error": exc.what, "where": exc.where, "fix": exc.fix, "input": line},
                                ensure_ascii=False) + "\n")
        stdout.flush()


def _answer(stream, bot, label, as_json: bool, stdout, stderr) -> bool:
    if not as_json and label:
        stdout.write(f"[{label}] ")
    pieces = []
    for piece in stream:
        pieces.append(piece)
        if not as_json:
            stdout.write(piece)
            stdout.flush()
    reply = bot.last
    if as_json:
        row = {"answer": reply.text, "tokens": reply.tokens, "seconds": round(reply.seconds, 3)}
        if label:
            row["model"] = label
        stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        stdout.write("\n")
    stdout.flush()
    if reply.context_full:
        stderr.write(f"note: the answer reached the model's context limit ({bot.context_limit} tokens); "
                     "send `clear` to start a new conversation\n")
        return True
    return False
