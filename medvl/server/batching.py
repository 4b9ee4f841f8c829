"""Requests that arrive together answered by one `generate` call: the server's model side.

One worker thread owns the model (a `medvl.inference.Chatbot`'s: the same resolver, loader, prompt rendering
and end-of-turn tokens as `medvl chat`, so a served greedy answer is `Chatbot.chat`'s answer). It takes the first
waiting job, waits up to `window_s` for more (up to `max_batch`), groups them by decoding settings, renders each
conversation through the family's chat template and runs ONE left-padded `generate` per group: with left
padding and the attention mask a row's greedy answer is the answer its prompt gets alone (medvl.evaluate.generate
proves that on every family). Rows end on their own: their own end-of-turn, their own `max_tokens`, their own
cancellation (client gone, timeout); a finished row waits as padding until the batch's longest row ends.

Tokens go out as they are made: a streamer receives each step's new token of every row and hands the decoded
text delta to that job's callback (the web layer puts it on the request's asyncio queue without waiting), so a
slow client never slows the batch and a fast one sees its answer grow. A delta costs a few tokens' decode
whatever the answer's length (medvl.detokenize).

The worker only receives ready inputs: images are decoded before a job is queued, in a few image threads
(medvl.server.images), so a large image never stalls the tokens of the batch being generated, and a bad one is
answered with its 400 without reaching the worker.
"""

from __future__ import annotations

import contextlib

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from medvl.detokenize import IncrementalDetokenizer
from medvl.errors import MedvlError
from medvl.server.images import images_ready, load_request_images
from medvl.server.protocol import ApiError, ChatRequest, Limits

# Image decoding threads: PIL and pydicom release the GIL in their C decoders, so 4 large images decode side by
# side while the worker generates; more would only compete with generation for the CPU.
IMAGE_THREADS = 4


@dataclass
class Event:
    """What a job's callback receives: text deltas, then one final event (`done`) or an error."""

    delta: str = ""
    done: bool = False
    finish_reason: str | None = None  # stop | length
    text: str = ""  # the whole answer, on the final event
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: ApiError | None = None


@dataclass
class Job:
    request: ChatRequest
    emit: Callable[[Event], None]  # called from the worker thread; must not block
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


class Batcher:
    """Owns the model; `submit(job)` from any thread; `start()` / `close()` the worker."""

    def __init__(self, bot, *, limits: Limits | None = None, max_batch: int = 16, window_s: float = 0.01):
        self.bot = bot
        self.limits = limits or Limits()
        self.max_batch = max_batch
        self.window_s = window_s
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._pending: list[Job] = []
        self._thread = threading.Thread(target=self._run, name="medvl-serve-batcher", daemon=True)
        self._images = ThreadPoolExecutor(IMAGE_THREADS, thread_name_prefix="medvl-serve-images")
        self._closed = False
        self.batches = 0  # generate calls made
        self.rows = 0  # requests answered
        tok = bot.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        self._images.shutdown(wait=False, cancel_futures=True)
        self._queue.put(None)
        self._thread.join(timeout=30)

    def load_images(self, request: ChatRequest) -> Future:
        """Decode the request's images in the image threads (`medvl.server.images`); the future raises the
        ApiError of a bad one. The HTTP handler awaits it before `submit`, so a bad image is a plain 400."""
        with contextlib.suppress(RuntimeError):  # the pool shut down between the check and the submit
            if not self._closed:
                return self._images.submit(load_request_images, request, self.limits)
        stopping: Future = Future()  # a 503 like submit's, not a 500 traceback from a shut-down pool
        stopping.set_exception(ApiError(503, "the server is shutting down", type="server_error"))
        return stopping

    def submit(self, job: Job) -> None:
        """Queue a job; never blocks. Images not decoded yet are decoded in the image threads first: the worker
        only ever receives ready inputs, so a large image never stalls the batch that is generating."""
        if self._closed:
            job.emit(Event(done=True, error=ApiError(503, "the server is shutting down", type="server_error")))
            return
        if images_ready(job.request):
            self._queue.put(job)
        else:
            self.load_images(job.request).add_done_callback(lambda f: self._loaded(job, f))

    def _loaded(self, job: Job, future: Future) -> None:
        exc = None if future.cancelled() else future.exception()
        if future.cancelled() or self._closed:
            job.emit(Event(done=True, error=ApiError(503, "the server is shutting down", type="server_error")))
        elif isinstance(exc, ApiError):
            job.emit(Event(done=True, error=exc))  # a bad image: answered here, the worker never sees it
        elif exc is not None:
            job.emit(Event(done=True, error=ApiError(500, f"reading the image failed: {type(exc).__name__}: "
                                                     f"{exc}", type="server_error")))
        elif not job.cancelled.is_set():
            self._queue.put(job)

    # -- the worker

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                # One decoding per generate call; the others wait for the next round, first in first out.
                key = self._decoding_key(batch[0])
                group = [j for j in batch if self._decoding_key(j) == key]
                self._pending = [j for j in batch if self._decoding_key(j) != key] + self._pending
                group = [j for j in group if not j.cancelled.is_set()]
                if group:
                    self._answer(group)
            except Exception as exc:  # never let one request end the worker: every later one would time out
                err = ApiError(500, f"the server failed on this request: {type(exc).__name__}: {exc}",
                               type="server_error")
                for job in batch:
                    job.emit(Event(done=True, error=err))

    def _next_batch(self) -> list[Job] | None:
        """Waiting jobs first (all of them that share the first one's decoding), then what arrives within
        `window_s`, up to `max_batch`. None: the server is closing."""
        if self._pending:
            first = self._pending[0]
            key = self._decoding_key(first)
            batch = [j for j in self._pending if self._decoding_key(j) == key][: self.max_batch]
            self._pending = [j for j in self._pending if j not in batch]
        else:
            first = self._queue.get()
            if first is None:
                return None
            batch = [first]
        deadline = time.perf_counter() + self.window_s
        while len(batch) < self.max_batch:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(nxt)
        return batch

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _options(self, request: ChatRequest):
        from medvl.inference import GenerationOptions

        return GenerationOptions(max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                                 top_p=request.top_p, seed=request.seed)

    def _decoding_key(self, job: Job) -> tuple:
        kw = self._options(job.request).kwargs()
        kw.pop("max_new_tokens", None)
        return tuple(sorted((k, repr(v)) for k, v in kw.items())) + (job.request.seed,)

    def _answer(self, jobs: list[Job]) -> None:
        ready, prompts = [], []
        for job in jobs:
            try:
                prompts.append(self._prompt(job.request))
                ready.append(job)
            except ApiError as exc:
                job.emit(Event(done=True, error=exc))
            except (MedvlError, ValueError) as exc:  # ValueError: the chat template refused the conversation
                job.emit(Event(done=True, error=ApiError(400, str(exc).replace("\n", "; "))))
            except Exception as exc:  # one bad request never costs the others their answers
                job.emit(Event(done=True, error=ApiError(500, f"{type(exc).__name__}: {exc}", type="server_error")))
        if not ready:
            return
        try:
            self._generate(ready, prompts)
        except Exception as exc:  # a bug or an out-of-memory: every job of the batch hears it, the server lives on
            err = ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")
            for job in ready:
                job.emit(Event(done=True, error=err))

    def _prompt(self, request: ChatRequest) -> tuple[str, list]:
        from medvl.inference import Turn, render_prompt

        # The images were decoded before the job was queued (submit); render_prompt only reads them.
        turns = [Turn(msg.role, msg.text, [ref.image for ref in msg.images]) for msg in request.messages]
        return render_prompt(self.bot.processor, self.bot.family, turns, request.system or self.bot.system)

    def _generate(self, jobs: list[Job], prompts: list[tuple[str, list]]) -> None:
        import torch

        from medvl.inference import encode_left_padded

        bot = self.bot
        batch = encode_left_padded(bot.processor, bot.tokenizer, bot.family, [p[0] for p in prompts],
                                   [im for p in prompts for im in p[1]])
        mask = batch["attention_mask"]
        prompt_tokens = [int(n) for n in mask.sum(dim=1)]
        limits = []
        for job, n in zip(jobs, prompt_tokens):
            room = (bot.context_limit - n) if bot.context_limit else job.request.max_new_tokens
            if room < 1:
                job.emit(Event(done=True, error=ApiError(
                    400, f"the conversation is {n} tokens; the model's context is {bot.context_limit}",
                    param="messages", code="context_length_exceeded")))
                job.cancelled.set()
            limits.append(max(1, min(job.request.max_new_tokens, room)))
        live = [not j.cancelled.is_set() for j in jobs]
        if not any(live):
            return
        gen = self._options(jobs[0].request).kwargs()
        gen["max_new_tokens"] = max(lim for lim, ok in zip(limits, live) if ok)
        gen["min_new_tokens"] = min(gen.get("min_new_tokens", 1), min(limits))
        rows = [_Row(job, lim, bot, n) for job, lim, n in zip(jobs, limits, prompt_tokens)]
        for row, ok in zip(rows, live):
            row.finished = not ok

        class Streamer:  # transformers' BaseStreamer: put(prompt ids) once, then each step's new token per row
            first = True

            def put(self, value):
                if self.first:
                    self.first = False
                    return
                for row, token in zip(rows, value.reshape(-1).tolist()):
                    row.add(token)

            def end(self):
                pass

        def stopping(input_ids, scores, **_):
            done = [row.finished or row.job.cancelled.is_set() for row in rows]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        if gen.get("do_sample") and jobs[0].request.seed is not None:
            torch.manual_seed(jobs[0].request.seed)
        with torch.inference_mode():
            bot.model.generate(**batch.to(bot.device), **gen, eos_token_id=bot.eos,
                               pad_token_id=bot.tokenizer.pad_token_id, streamer=Streamer(),
                               stopping_criteria=[stopping])
        self.batches += 1
        for row in rows:
            if not row.closed and not row.job.cancelled.is_set():  # cancelled: the web layer answered already
                row.close()
        self.rows += sum(row.answered for row in rows)


class _Row:
    """One request's answer inside a batch: its tokens, its limit, its stream of text deltas."""

    def __init__(self, job: Job, limit: int, bot, prompt_tokens: int):
        self.job, self.limit, self.bot, self.prompt_tokens = job, limit, bot, prompt_tokens
        self.tokens: list[int] = []
        self.text = IncrementalDetokenizer(bot.tokenizer, skip_special_tokens=True)
        self.finished = False
        self.ended_on_eos = False
        self.closed = False
        self.answered = False

    def add(self, token: int) -> None:
        if self.finished:
            return
        if token in self.bot.eos:
            self.finished = self.ended_on_eos = True
            self.close()  # answered now, not when the batch's longest row ends
            return
        self.tokens.append(token)
        delta = self.text.add(token)  # a few tokens decoded, whatever the answer's length; never half a character
        if delta and not self.job.cancelled.is_set():
            self.job.emit(Event(delta=delta))
        if len(self.tokens) >= self.limit:
            self.finished = True
            self.close()

    def close(self) -> None:
        if self.closed or self.job.cancelled.is_set():
            self.closed = True
            return
        rest = self.text.finish()  # bytes that never completed a character: shown as the decoder shows them
        if rest:
            self.job.emit(Event(delta=rest))
        text = self.bot.tokenizer.decode(self.tokens, skip_special_tokens=True)  # once per answer
        reason = "stop" if self.ended_on_eos else "length"
        completion = len(self.tokens) + (1 if self.ended_on_eos else 0)
        self.job.emit(Event(done=True, finish_reason=reason, text=text.strip(), prompt_tokens=self.prompt_tokens,
                            completion_tokens=completion))
        self.closed = self.answered = True
