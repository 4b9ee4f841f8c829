"""`medvl serve`: batched answers equal `Chatbot`'s greedy answers (in process, several families), and a live
server in a subprocess driven with the official `openai` client (text, data-URL images, streaming, errors, keys,
paths, and a bounded load test that loses no request)."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

MEDVL = str(Path(sys.executable).with_name("medvl"))
MAX_NEW = 12
QUESTIONS = ["What is shown?", "Is there a fracture?", "Which organ is this?", "What modality is it?"]


@pytest.fixture(scope="module")
def pngs():
    import easy_vqa

    return list(easy_vqa.get_train_image_paths().values())[:3]


def expected_answers(model_dir, prompts):
    """{(question, image or None): the answer Chatbot.chat gives alone}."""
    from medvl import Chatbot
    from medvl.inference import GenerationOptions

    bot = Chatbot(model_dir, options=GenerationOptions(max_new_tokens=MAX_NEW), device="cpu")
    out = {}
    for q, img in prompts:
        bot.reset()
        out[(q, img)] = bot.chat(q, [img] if img else [])
    return out


# ---------------------------------------------------------------------------------------------------------
# in process: the batcher against Chatbot


@pytest.mark.parametrize("family", ["qwen2.5-vl", "llava", "internvl", "causal-lm"])
def test_batched_answers_equal_chatbot_answers(tiny_dir, pngs, family):
    from medvl import Chatbot
    from medvl.server.batching import Batcher, Job
    from medvl.server.protocol import ImageRef, Limits, Message, ChatRequest

    vision = family != "causal-lm"
    prompts = [(q, (pngs[i % len(pngs)] if vision and i % 2 == 0 else None)) for i, q in enumerate(QUESTIONS * 2)]
    prompts = list(dict.fromkeys(prompts))
    want = expected_answers(tiny_dir(family), prompts)
    bot = Chatbot(tiny_dir(family), device="cpu")
    batcher = Batcher(bot, limits=Limits(), max_batch=16, window_s=0.5)
    got, done = {}, threading.Event()

    def job(q, img):
        images = [ImageRef(path=img)] if img else []
        req = ChatRequest([Message("user", q, images)], None, "m", MAX_NEW, None, None, None, False)

        def emit(ev):
            if ev.done:
                got[(q, img)] = ev.error or ev.text
                if len(got) == len(prompts):
                    done.set()

        return Job(req, emit)

    batcher.start()
    try:
        for q, img in prompts:
            batcher.submit(job(q, img))
        assert done.wait(120)
    finally:
        batcher.close()
    assert got == want
    assert batcher.batches < len(prompts)  # they really were answered together
    assert len(set(want.values())) > 1  # the check is not trivially true


def test_rows_end_on_their_own_limit_inside_one_batch(tiny_dir):
    from medvl import Chatbot
    from medvl.server.batching import Batcher, Job
    from medvl.server.protocol import ChatRequest, Limits, Message

    bot = Chatbot(tiny_dir("qwen2.5-vl"), device="cpu")
    batcher = Batcher(bot, limits=Limits(), window_s=0.5)
    events: dict[int, list] = {3: [], 9: []}
    finished = threading.Event()
    for n in events:
        req = ChatRequest([Message("user", "Describe the image.")], None, "m", n, None, None, None, True)
        batcher.submit(Job(req, lambda ev, n=n: (events[n].append(ev),
                                                 finished.set() if all(e and e[-1].done for e in events.values())
                                                 else None)))
    batcher.start()
    try:
        assert finished.wait(60)
    finally:
        batcher.close()
    assert batcher.batches == 1
    for n, evs in events.items():
        final = evs[-1]
        assert final.error is None and final.completion_tokens <= n
        assert "".join(e.delta for e in evs).strip() == final.text  # the stream adds up to the answer
        if final.finish_reason == "length":
            assert final.completion_tokens == n


def _collect(batcher, requests, timeout=60):
    """Submit every request before the worker starts; {index: final Event}."""
    from medvl.server.batching import Job

    got, done = {}, threading.Event()
    for i, req in enumerate(requests):
        def emit(ev, i=i):
            if ev.done:
                got[i] = ev
                if len(got) == len(requests):
                    done.set()
        batcher.submit(Job(req, emit))
    batcher.start()
    try:
        assert done.wait(timeout)
    finally:
        batcher.close()
    return got


def test_a_conversation_the_template_refuses_costs_no_one_else_their_answer(tiny_dir):
    """Mistral / Llama-2 / Gemma templates raise on roles that do not alternate: that request gets a 400, the
    worker lives on and answers the rest (it used to die, leaving every later request to time out)."""
    from medvl import Chatbot
    from medvl.server.batching import Batcher
    from medvl.server.protocol import ChatRequest, Limits, Message

    bot = Chatbot(tiny_dir("causal-lm"), device="cpu")
    tok = bot.tokenizer
    tok.chat_template = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversation roles must "
                         "alternate user/assistant') }}{% endif %}" + tok.chat_template)
    bad = ChatRequest([Message("assistant", "Hello."), Message("user", "Hi?")], None, "m", 4, None, None, None, False)
    good = ChatRequest([Message("user", "What is a pneumothorax?")], None, "m", 4, None, None, None, False)
    batcher = Batcher(bot, limits=Limits(), window_s=0.2)
    got = _collect(batcher, [bad, good])
    assert got[0].error is not None and got[0].error.status == 400 and "alternate" in got[0].error.message
    assert got[1].error is None and got[1].text
    assert not batcher.alive  # closed by _collect, not killed: the good request was answered after the bad one


def test_waiting_requests_with_one_decoding_go_out_together(tiny_dir):
    from medvl import Chatbot
    from medvl.server.batching import Batcher
    from medvl.server.protocol import ChatRequest, Limits, Message

    bot = Chatbot(tiny_dir("causal-lm"), device="cpu")
    reqs = [ChatRequest([Message("user", f"Question {i}?")], None, "m", 3, None if i == 0 else 0.7, None, 1, False)
            for i in range(7)]
    batcher = Batcher(bot, limits=Limits(), window_s=0.2)
    got = _collect(batcher, reqs)
    assert all(ev.error is None for ev in got.values())
    assert batcher.batches == 2  # one greedy call, one call for the six sampled ones (was one call each)


def test_a_slow_image_does_not_hold_up_other_requests_tokens(tiny_dir, pngs, monkeypatch):
    """Images are decoded before a job is queued, not on the one worker: while an image's decode is held (the
    decoder waits on an event), a text request sent after it is answered, token by token, in full."""
    import medvl.server.images as images
    from medvl import Chatbot
    from medvl.server.batching import Batcher, Job
    from medvl.server.protocol import ChatRequest, ImageRef, Limits, Message

    decoding, release = threading.Event(), threading.Event()
    real = images.decode_image

    def slow_decode(ref, limits):
        decoding.set()
        release.wait(120)
        return real(ref, limits)

    monkeypatch.setattr(images, "decode_image", slow_decode)
    batcher = Batcher(Chatbot(tiny_dir("qwen2.5-vl"), device="cpu"), limits=Limits(), window_s=0.01)
    events: dict[str, list] = {"image": [], "text": []}
    done = {name: threading.Event() for name in events}

    def job(name, images_):
        req = ChatRequest([Message("user", QUESTIONS[0], images_)], None, "m", MAX_NEW, None, None, None, True)
        return Job(req, lambda ev: (events[name].append(ev), done[name].set() if ev.done else None))

    batcher.start()
    try:
        batcher.submit(job("image", [ImageRef(data=Path(pngs[0]).read_bytes(), param="p")]))
        assert decoding.wait(30)  # the image request is in its decode, held there
        batcher.submit(job("text", []))
        assert done["text"].wait(60), "the text request waited for another request's image"
        assert not release.is_set() and events["image"] == []  # answered while the image was still decoding
        assert events["text"][-1].error is None and len([e for e in events["text"] if e.delta]) > 1
        release.set()
        assert done["image"].wait(60)
    finally:
        release.set()
        batcher.close()
    assert events["image"][-1].error is None and events["image"][-1].text
    assert batcher.batches == 2


def test_bad_images_get_their_400_without_reaching_the_worker(tiny_dir, tmp_path):
    from PIL import Image

    from medvl import Chatbot
    from medvl.server.batching import Batcher
    from medvl.server.protocol import ChatRequest, ImageRef, Limits, Message

    big = tmp_path / "big.png"
    Image.new("L", (100, 100)).save(big)
    batcher = Batcher(Chatbot(tiny_dir("qwen2.5-vl"), device="cpu"), limits=Limits(max_image_pixels=64 * 64),
                      window_s=0.01)
    reached: list = []
    batcher._answer = reached.extend  # the worker's entry for a group of jobs
    refs = [ImageRef(data=b"not an image", param="messages[0].content[1].image_url"),
            ImageRef(path=str(big), param="messages[0].content[2].image_url")]
    got = _collect(batcher, [ChatRequest([Message("user", "q", [ref])], None, "m", 4, None, None, None, False)
                             for ref in refs])
    assert [(ev.error.status, ev.error.code, ev.error.param) for ev in (got[0], got[1])] == [
        (400, "image_undecodable", refs[0].param), (400, "image_too_large", refs[1].param)]
    assert reached == [] and batcher.batches == 0


def test_an_image_still_decoding_at_the_deadline_is_504_and_never_queued(tiny_dir, pngs, monkeypatch):
    from starlette.testclient import TestClient

    import medvl.server.images as images
    from medvl import Chatbot
    from medvl.server.app import create_app
    from medvl.server.batching import Batcher
    from medvl.server.protocol import Limits

    release = threading.Event()
    real = images.decode_image
    monkeypatch.setattr(images, "decode_image", lambda ref, limits: (release.wait(120), real(ref, limits))[1])
    batcher = Batcher(Chatbot(tiny_dir("qwen2.5-vl"), device="cpu"), limits=Limits(timeout_s=0.5))
    reached: list = []
    batcher._answer = reached.extend
    batcher.start()
    try:
        with TestClient(create_app(batcher, model_name="m")) as http:
            got = http.post("/v1/chat/completions", json={"model": "m", "stream": True, "messages": [
                {"role": "user", "content": [{"type": "text", "text": "q"},
                                             {"type": "image_url", "image_url": {"url": data_url(pngs[0])}}]}]})
    finally:
        release.set()
        batcher.close()
    assert got.status_code == 504 and got.json()["error"]["code"] == "timeout"
    assert reached == []


# ---------------------------------------------------------------------------------------------------------
# a live server


def get_json(url: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as r:
        return json.loads(r.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory, pngs):
    root = tmp_path_factory.mktemp("scans")
    (root / "ct.png").write_bytes(Path(pngs[0]).read_bytes())
    port, key = free_port(), "sk-test-medvl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([MEDVL, "serve", str(tiny_dir("qwen2.5-vl")), "--port", str(port), "--api-key", key,
                             "--name", "tiny", "--image-root", str(root), "--max-tokens", "64",
                             "--max-body-mb", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for _ in range(120):
        try:
            if get_json(f"http://127.0.0.1:{port}/health")["status"] == "ok":
                break
        except OSError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        time.sleep(0.5)
    yield {"url": f"http://127.0.0.1:{port}/v1", "key": key, "root": root, "proc": proc,
           "model_dir": tiny_dir("qwen2.5-vl")}
    proc.terminate()
    out, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"], api_key=server["key"], max_retries=0, timeout=120)


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def ask(client, q, img=None, max_tokens=None, **kw):
    content = q if img is None else [{"type": "text", "text": q},
                                     {"type": "image_url", "image_url": {"url": data_url(img)}}]
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                          max_tokens=max_tokens or MAX_NEW, **kw)


def test_text_and_image_questions_get_chatbots_answers(server, client, pngs):
    want = expected_answers(server["model_dir"], [(QUESTIONS[0], None), (QUESTIONS[1], pngs[0])])
    text = ask(client, QUESTIONS[0])
    image = ask(client, QUESTIONS[1], pngs[0])
    assert text.choices[0].message.content == want[(QUESTIONS[0], None)]
    assert image.choices[0].message.content == want[(QUESTIONS[1], pngs[0])]
    assert image.usage.prompt_tokens > text.usage.prompt_tokens  # the image's visual tokens are in the prompt
    assert text.choices[0].finish_reason in ("stop", "length") and text.model == "tiny"


def test_streaming_adds_up_to_the_whole_answer(client, pngs):
    whole = ask(client, QUESTIONS[2], pngs[1]).choices[0].message.content
    pieces, reasons = [], []
    for ev in ask(client, QUESTIONS[2], pngs[1], stream=True, stream_options={"include_usage": True}):
        for ch in ev.choices:
            pieces.append(ch.delta.content or "")
            reasons.append(ch.finish_reason)
    assert "".join(pieces).strip() == whole and len([p for p in pieces if p]) > 1
    assert reasons[-1] in ("stop", "length")


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = get_json(server["url"].replace("/v1", "/health"))
    assert health["status"] == "ok" and health["family"] == "qwen2.5-vl"


def test_errors_come_in_openais_shape(server, client, pngs):
    import openai

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "hi"}])
    assert bad.value.status_code == 400 and bad.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    outside = Path(pngs[2]).resolve()
    for url, code in [(str(outside), "image_path_refused"),
                      (f"{server['root']}/../{outside.name}", "image_path_refused"),
                      ("https://example.org/x.png", "remote_url_refused")]:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": url}}]}])
        assert bad.value.body["code"] == code
    inside = client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": f"{server['root']}/ct.png"}}]}])
    assert inside.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "q"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no").decode()}}]}])
    assert bad.value.body["code"] == "image_undecodable"
    with pytest.raises(openai.BadRequestError) as bad:  # streamed too: a 400 status, not an error event
        client.chat.completions.create(model="tiny", max_tokens=4, stream=True, messages=[{"role": "user", "content": [
            {"type": "text", "text": "q"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no").decode()}}]}])
    assert bad.value.body["code"] == "image_undecodable"


def test_an_image_above_the_pixel_limit_is_400(client, tmp_path):
    import openai
    from PIL import Image

    Image.new("1", (4097, 4096)).save(tmp_path / "big.png")  # one pixel column above 4096 x 4096, ~30 kB
    with pytest.raises(openai.BadRequestError) as bad:
        ask(client, "q", tmp_path / "big.png", max_tokens=4)
    assert bad.value.body["code"] == "image_too_large" and "4097x4096" in bad.value.body["message"]


def test_a_body_over_the_limit_is_413(server, client):
    import openai

    big = "x" * (1024 * 1024 + 10)  # the server was started with --max-body-mb 1
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": big}])
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"


def test_a_key_is_required(server):
    import openai
    from openai import OpenAI

    for key in ("wrong", ""):
        anon = OpenAI(base_url=server["url"], api_key=key or "x", max_retries=0,
                      default_headers={"Authorization": ""} if not key else None)
        with pytest.raises(openai.AuthenticationError):
            anon.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


def test_load_200_requests_from_16_clients_lose_nothing(server, client, pngs):
    prompts = [(q, pngs[i % 3] if i % 2 else None) for i, q in enumerate(QUESTIONS * 2)]
    want = expected_answers(server["model_dir"], prompts)
    jobs = [prompts[i % len(prompts)] for i in range(200)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda p: ask(client, *p).choices[0].message.content, jobs))
    took = time.perf_counter() - t0
    assert len(answers) == 200
    wrong = [(p, a) for p, a in zip(jobs, answers) if a != want[p]]
    assert not wrong, wrong[:3]
    assert took < 60, took


# ---------------------------------------------------------------------------------------------------------
# refused before loading


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    return subprocess.run([MEDVL, "serve", *args], capture_output=True, text=True, env=env, timeout=120)


def test_a_public_address_needs_a_key(tiny_dir):
    out = run_cli(str(tiny_dir("qwen2.5-vl")), "--host", "0.0.0.0", "--port", str(free_port()))
    assert out.returncode == 2 and "--api-key" in out.stderr and "Traceback" not in out.stderr


def test_port_in_use_and_not_a_model(tiny_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        out = run_cli(str(tiny_dir("qwen2.5-vl")), "--port", str(s.getsockname()[1]))
    assert out.returncode == 2 and "--port" in out.stderr and "Traceback" not in out.stderr
    out = run_cli(str(tmp_path), "--port", str(free_port()))
    assert out.returncode == 2 and str(tmp_path) in out.stderr.replace("\n", "") and "Traceback" not in out.stderr


def test_requests_racing_a_shutdown_get_503_not_a_traceback():
    """After close(), the image pool is gone: a request still arriving gets the shutting-down 503 (it got a
    RuntimeError from the pool, a 500 with a traceback)."""
    from types import SimpleNamespace

    from medvl.server.batching import Batcher
    from medvl.server.protocol import ApiError

    batcher = Batcher(SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0)))
    batcher.start()
    batcher.close()
    exc = batcher.load_images(SimpleNamespace(messages=[])).exception(timeout=5)
    assert isinstance(exc, ApiError) and exc.status == 503
    batcher._closed = False  # the race: the check passed, then the pool shut down
    exc = batcher.load_images(SimpleNamespace(messages=[])).exception(timeout=5)
    assert isinstance(exc, ApiError) and exc.status == 503
