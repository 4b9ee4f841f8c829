"""The Textual chat app driven headless with Pilot: /image with path completion, a streamed answer, /undo,
/retry, /save read back by prepare-data, Esc mid-answer, compare mode, bad input as a message, typing while the
model loads. asyncio.run inside sync tests (environment.md section 9)."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest


@pytest.fixture(scope="module")
def png():
    import easy_vqa

    return list(easy_vqa.get_train_image_paths().values())[0]


def bots(tiny_dir, *families, max_new_tokens=8):
    from medvl.inference import Chatbot, GenerationOptions

    return [Chatbot(tiny_dir(f), options=GenerationOptions(max_new_tokens=max_new_tokens)) for f in families]


async def settle(pilot, app, seconds=20.0):
    """Until no answer is being generated (and the UI has drained what was streamed)."""
    for _ in range(int(seconds / 0.05)):
        await pilot.pause(0.05)
        if app.session is not None and not app.running:
            break
    await pilot.pause(0.1)


async def send(pilot, app, line):
    app.query_one("#prompt").value = line
    await pilot.press("enter")
    await settle(pilot, app)


def notes(app, error=False):
    return [str(n.render()) for n in app.query(".note.error" if error else ".note")]


def test_image_with_path_completion_then_a_streamed_answer(tiny_dir, png, tmp_path, monkeypatch):
    from medvl.tui.chat import ChatApp
    from medvl.tui.chat_widgets import Answer, Thumbnail, UserMessage

    monkeypatch.chdir(tmp_path)
    shutil.copy(png, tmp_path / "scan-0001.png")
    (bot,) = bots(tiny_dir, "qwen2.5-vl")
    (reference,) = bots(tiny_dir, "qwen2.5-vl")
    expected = reference.chat("What shape is it?", images=[tmp_path / "scan-0001.png"])

    async def main():
        app = ChatApp(None, bots=[bot])
        async with app.run_test(size=(100, 32)) as pilot:
            await pilot.press(*"/im")
            await pilot.pause(0.2)
            await pilot.press("tab")  # the command's name
            assert app.query_one("#prompt").value == "/image "
            await pilot.press(*"sc")
            await pilot.pause(0.2)
            await pilot.press("tab")  # the path
            assert app.query_one("#prompt").value == "/image scan-0001.png"
            await pilot.press("enter")
            await settle(pilot, app)
            assert len(app.query(Thumbnail)) == 1 and "attached scan-0001.png" in notes(app)[-1]
            await pilot.press(*"What shape is it?", "enter")
            await settle(pilot, app)
            (answer,) = app.query(Answer)
            assert answer.text == expected and "tokens" in answer.footer
            (message,) = app.query(UserMessage)
            assert len(message.query(Thumbnail)) == 1 and not app.query(".pending")
            status = str(app.query_one("#status").render())
            assert "qwen2.5-vl" in status and "tok/s" in status and "context" in status

    asyncio.run(main())


def type_ahead(app, text):
    """Keys as a terminal hands over a fast typist's burst (one read): all queued before the app handles the
    first. pilot.press waits for the app after every key, which hides races between keys."""
    from textual import events
    from textual.keys import _character_to_key

    for ch in text:
        app._driver.send_message(events.Key({"\t": "tab", "\r": "enter"}.get(ch) or _character_to_key(ch), ch))


def test_tab_then_enter_typed_fast_sends_the_completed_path(tiny_dir, png, tmp_path, monkeypatch):
    from medvl.tui.chat import ChatApp
    from medvl.tui.chat_widgets import Thumbnail

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ux-scans").mkdir()
    shutil.copy(png, tmp_path / "ux-scans" / "scan-0001.png")

    async def main():
        app = ChatApp(None, bots=bots(tiny_dir, "qwen2.5-vl"))
        async with app.run_test(size=(80, 24)) as pilot:
            prompt = app.query_one("#prompt")
            # no pause between the keys: Tab completes the folder, a second Tab the file, Enter sends that line,
            # and what follows Enter starts the next line instead of joining the one sent
            type_ahead(app, "/image ux-\t\t\rWhat")
            await settle(pilot, app)
            assert "attached scan-0001.png" in notes(app)[-1], notes(app, error=True)
            assert len(app.query(Thumbnail)) == 1 and prompt.value == "What"
            prompt.value = ""
            await pilot.press(*"/image ux-", "tab", "tab", "enter")  # the same with pilot's own key presses
            await settle(pilot, app)
            assert "attached scan-0001.png" in notes(app)[-1] and prompt.value == ""
            assert app.focused is prompt  # Tab with nothing to complete never moves the focus off the prompt
            await pilot.press("tab")
            assert app.focused is prompt

    asyncio.run(main())


@pytest.mark.parametrize("width", [80, 120])
def test_help_keeps_each_explanation_in_its_own_column(tiny_dir, width):
    from medvl.session import COMMANDS
    from medvl.tui.chat import ChatApp

    async def main():
        app = ChatApp(None, bots=bots(tiny_dir, "qwen2.5-vl"))
        async with app.run_test(size=(width, 24)) as pilot:
            await send(pilot, app, "/help")
            shown = app.query(".note").last()
            return [strip.text.rstrip() for strip in shown.render_lines(shown.region.reset_offset)]

    lines = [line for line in asyncio.run(main()) if line]
    starts = [line for line in lines if line.startswith("/")]
    assert [line.split()[0] for line in starts] == list(COMMANDS)
    column = starts[0].index("attach")  # where the explanations begin: the same on every line
    assert all(line[column - 2:column] == "  " and line[column] != " " for line in starts)
    folded = [line for line in lines if not line.startswith("/")]
    assert all(line[:column].strip() == "" and line[column] != " " for line in folded)  # hanging indent
    assert bool(folded) == (width == 80) and max(map(len, lines)) <= width


def test_undo_retry_and_save_then_prepare_data_reads_it(tiny_dir, png, tmp_path, monkeypatch):
    from medvl.data.prepare import prepare
    from medvl.tui.chat import ChatApp
    from medvl.tui.chat_widgets import Answer, UserMessage

    monkeypatch.chdir(tmp_path)
    shutil.copy(png, tmp_path / "x.png")

    async def main():
        app = ChatApp(None, bots=bots(tiny_dir, "qwen2-vl"))
        async with app.run_test(size=(100, 32)) as pilot:
            await send(pilot, app, "/image x.png")
            await send(pilot, app, "What shape is it?")
            first = app.query(Answer).last().text
            await send(pilot, app, "/retry")
            assert [a.text for a in app.query(Answer)] == [first]  # greedy: replaced by the same answer
            await send(pilot, app, "And the colour?")
            await send(pilot, app, "/undo")
            assert len(app.query(UserMessage)) == 1 and len(app.query(Answer)) == 1
            assert len(app.session.bot.turns) == 2
            await send(pilot, app, "/save chats/session.jsonl")
            assert "appended 1 record" in notes(app)[-1]
            assert f"--image-root {tmp_path} --out" in notes(app)[-1]  # the image lies outside chats/
            await send(pilot, app, "/export report.md")
        return first

    first = asyncio.run(main())
    saved = json.loads((tmp_path / "chats" / "session.jsonl").read_text())
    assert saved["images"] == [str(tmp_path / "x.png")]  # outside the file's folder: absolute, never '..'
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["messages"][1] == {"role": "assistant", "content": first, "train": True}
    # the root rule: an image outside the file's folder is read only when its folder is named, as /save said
    refused = prepare([tmp_path / "chats" / "session.jsonl"], tmp_path / "refused")
    assert [r["code"] for r in refused.rejections] == ["image-escapes-root"]
    result = prepare([tmp_path / "chats" / "session.jsonl"], tmp_path / "prepared", image_root=[str(tmp_path)])
    assert result.manifest["accepted"] == 1 and not result.rejections
    (row,) = [json.loads(line) for line in (tmp_path / "prepared" / "data-00000.jsonl").read_text().splitlines()]
    assert row["messages"] == saved["messages"] and row["images"] == saved["images"]
    report = (tmp_path / "report.md").read_text()
    assert str(tmp_path / "x.png") in report and first in report


def test_esc_stops_the_answer_and_the_session_goes_on(tiny_dir):
    from medvl.tui.chat import ChatApp
    from medvl.tui.chat_widgets import Answer

    (bot,) = bots(tiny_dir, "causal-lm", max_new_tokens=50_000)
    bot.eos = []  # never ends by itself: 50k tokens take minutes, far longer than the test (1,500 took 1.5 s)
    bot.context_limit = None

    async def main():
        app = ChatApp(None, bots=[bot])
        async with app.run_test(size=(100, 32)) as pilot:
            app.query_one("#prompt").value = "Tell me everything."
            await pilot.press("enter")
            for _ in range(200):
                await pilot.pause(0.02)
                if app.query(Answer) and app.query(Answer).last().text:
                    break
            assert app.running, notes(app)
            await pilot.press("escape")
            await settle(pilot, app)
            assert bot.last.stopped and bot.last.tokens < 50_000
            assert "stopped" in app.query(Answer).last().footer
            bot.options = type(bot.options)(max_new_tokens=4)
            await send(pilot, app, "Go on.")
            assert len(app.query(Answer)) == 2 and bot.last.tokens == 4

    asyncio.run(main())


def test_scrolled_up_the_view_stays_while_an_answer_streams(tiny_dir):
    from medvl.tui.chat import ChatApp
    from medvl.tui.chat_widgets import Answer

    (bot,) = bots(tiny_dir, "causal-lm", max_new_tokens=50_000)
    bot.eos = []  # never ends by itself (see the Esc test)
    bot.context_limit = None

    async def main():
        app = ChatApp(None, bots=[bot])
        async with app.run_test(size=(80, 24)) as pilot:
            await send(pilot, app, "/help")  # something above to scroll back to
            app.query_one("#prompt").value = "Tell me everything."
            await pilot.press("enter")
            view = app.conversation
            for _ in range(400):  # until the answer fills more than a screen
                await pilot.pause(0.05)
                if app.query(Answer) and view.max_scroll_y > 30:
                    break
            assert app.running and view.scroll_y == view.max_scroll_y  # following the answer as it grows
            await pilot.press("pageup", "pageup")
            held = view.scroll_y
            grown = view.max_scroll_y
            for _ in range(20):  # a second more of tokens
                await pilot.pause(0.05)
            try:
                assert view.max_scroll_y > grown and view.scroll_y == held  # the text grew, the reader stayed
            finally:
                await pilot.press("escape")  # a failed check must not leave 50k tokens generating
            await settle(pilot, app)
            assert view.scroll_y == held

    asyncio.run(main())


def test_compare_mode_answers_in_two_columns(tiny_dir, png, tmp_path, monkeypatch):
    from medvl.tui.chat import ChatApp

    monkeypatch.chdir(tmp_path)
    pair = bots(tiny_dir, "qwen2.5-vl", "llava")
    expected = [b.chat("What shape?", images=[png]) for b in bots(tiny_dir, "qwen2.5-vl", "llava")]

    async def main():
        app = ChatApp(None, bots=pair, images=[png])
        async with app.run_test(size=(120, 32)) as pilot:
            await settle(pilot, app)
            assert len(app.query(".column-title")) == 2
            await send(pilot, app, "What shape?")
            got = [a.text for a in app.answers()]
            assert got == expected
            app.save_screenshot(str(tmp_path / "compare.svg"))
            await send(pilot, app, "/retry")  # greedy: the same pair again, in place of the first
            assert len(app.query(".answers")) == 1 and [a.text for a in app.answers()] == expected
            await send(pilot, app, "/undo")
            assert not app.query(".answers") and not app.query("UserMessage")

    asyncio.run(main())
    assert (tmp_path / "compare.svg").stat().st_size > 1000


def test_compare_mode_columns_scroll_together(tiny_dir):
    from textual.events import MouseScrollDown, MouseScrollUp

    from medvl.tui.chat import ChatApp
    from medvl.tui.chat_widgets import Answer

    async def main():
        app = ChatApp(None, bots=bots(tiny_dir, "causal-lm", "causal-lm", max_new_tokens=40))
        async with app.run_test(size=(80, 24)) as pilot:
            for question in ("First?", "Second?", "Third?"):  # three turns: far more than 24 rows
                await send(pilot, app, question)
            middle = app.size.width // 2
            columns = [[a for a in app.query(Answer) if (a.region.x < middle) == (side == "A")] for side in "AB"]
            assert [len(c) for c in columns] == [3, 3]
            first_a, first_b = columns[0][0], columns[1][0]

            def rows():
                return first_a.region.y, first_b.region.y

            at_end = rows()
            assert at_end[0] < 0 and at_end[0] == at_end[1]  # scrolled to the latest turn, both firsts above
            for _ in range(5):  # the wheel over B's latest answer
                await pilot._post_mouse_events([MouseScrollUp], widget=columns[1][-1])
            scrolled = rows()
            assert scrolled[0] > at_end[0] and scrolled[0] == scrolled[1]  # A moved with B, turn beside turn
            for _ in range(2):  # and over A's: B follows
                await pilot._post_mouse_events([MouseScrollDown], widget=first_a)
            back = rows()
            assert at_end[0] <= back[0] < scrolled[0] and back[0] == back[1], (at_end, scrolled, back)
            await pilot.press("pageup")  # the keys work too, with the focus staying on the prompt
            paged = rows()
            assert paged[0] > back[0] and paged[0] == paged[1] and app.focused is app.query_one("#prompt")

    asyncio.run(main())


def test_bad_input_is_a_message_not_a_crash(tiny_dir, tmp_path, monkeypatch):
    from medvl.tui.chat import ChatApp
    from medvl.tui.chat_widgets import Answer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"garbage")

    async def main():
        app = ChatApp(None, bots=bots(tiny_dir, "qwen2.5-vl"))
        async with app.run_test(size=(100, 32)) as pilot:
            await send(pilot, app, "/image missing.png")
            await send(pilot, app, "/image bad.png")
            await send(pilot, app, "/image ../../etc/passwd")
            await send(pilot, app, "/window lung")
            await send(pilot, app, "/frobnicate")
            errors = notes(app, error=True)
            assert ["image-missing" in errors[0], "bad.png" in errors[1], "image-escapes-root" in errors[2],
                    "no DICOM image" in errors[3], "unknown command" in errors[4]] == [True] * 5
            await send(pilot, app, "still here?")
            assert len(app.query(Answer)) == 1 and app.is_running

    asyncio.run(main())


def test_text_only_model_in_the_app_and_typing_while_loading(tiny_dir, png, monkeypatch):
    import threading

    import medvl.inference
    from medvl.inference import GenerationOptions
    from medvl.resolve import resolve_model
    from medvl.tui.chat import ChatApp
    from medvl.tui.chat_widgets import Answer

    release = threading.Event()

    class SlowChatbot(medvl.inference.Chatbot):  # a tiny model loads in 0.1 s: hold it until the user typed
        def __init__(self, *args, **kwargs):
            release.wait(30)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(medvl.inference, "Chatbot", SlowChatbot)

    async def main():
        app = ChatApp([resolve_model(tiny_dir("causal-lm"))], options=GenerationOptions(max_new_tokens=4))
        async with app.run_test(size=(100, 32)) as pilot:
            assert "loading" in str(app.query_one("#status").render())  # the screen is up before the model
            app.query_one("#prompt").value = "hello?"
            await pilot.press("enter")  # before the model has loaded: queued
            assert app.session is None and "queued" in notes(app)[-1]
            release.set()
            await settle(pilot, app)
            await settle(pilot, app)
            assert len(app.query(Answer)) == 1 and app.query(Answer).last().text
            await send(pilot, app, f"/image {png}")
            assert "text-only model" in notes(app, error=True)[-1]

    asyncio.run(main())


def test_an_adapter_that_does_not_fit_is_a_message_in_the_app(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from medvl.families import get_family
    from medvl.models import load_model
    from medvl.resolve import resolve_model
    from medvl.tiny import build_tiny
    from medvl.tui.chat import ChatApp

    family = get_family("llava")
    lora = get_peft_model(load_model(tiny_dir("llava"), family),
                          LoraConfig(r=4, target_modules=family.lora_regex(), task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "adapter")
    build_tiny("llava", tmp_path / "bigger", size="small")

    async def main():
        app = ChatApp([resolve_model(tmp_path / "bigger", adapter=tmp_path / "adapter")])
        async with app.run_test(size=(100, 32)) as pilot:
            for _ in range(600):  # up to 30 s on a loaded machine: the note, then the status line
                await pilot.pause(0.05)
                if notes(app, error=True) and "failed to load" in str(app.query_one("#status").render()):
                    break
            assert "does not fit the base model" in notes(app, error=True)[-1]
            assert "failed to load" in str(app.query_one("#status").render()) and app.is_running

    asyncio.run(main())
