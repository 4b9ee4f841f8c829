"""The HTTP side of `medvl serve`: an OpenAI-compatible ASGI app (Starlette) over one `Batcher`.

    POST /v1/chat/completions   text and image_url content; "stream": true gives server-sent events
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", ...}; no key needed (for load balancers and scripts)

The model is loaded once, before the app starts answering, and never per request. A request is checked
(`protocol.parse_chat_request`) and its images decoded (`Batcher.load_images`) before it reaches the model, both
off the event loop that streams every answer: a bad one costs no generation and gets its 4xx. Every request has a
deadline (`Limits.timeout_s`): past it the client gets 504 and its row leaves the batch at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time

from medvl.server.batching import Batcher, Event, Job
from medvl.server.protocol import (ApiError, Limits, chunk, completion, completion_id, models_list,
                                   parse_chat_request, usage)


def create_app(batcher: Batcher, *, model_name: str, api_key: str | None = None, image_roots: list[str] = (),
               limits: Limits | None = None, on_ready=None):
    """The ASGI app; `on_ready()` runs once the server listens (a port in use fails before it)."""
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    limits = limits or batcher.limits
    roots = [str(r) for r in image_roots]
    created = int(time.time())
    vision = batcher.bot.family.is_vision

    def error(exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    async def read_body(request: Request) -> bytearray:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"request body of {int(declared):,} bytes is above this server's limit of "
                           f"{limits.max_body_bytes:,}", code="request_too_large")
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > limits.max_body_bytes:
                raise ApiError(413, f"request body above this server's limit of {limits.max_body_bytes:,} bytes",
                               code="request_too_large")
        return data

    def check(data: bytearray):
        """JSON, the rules, base64 payloads decoded: in a thread, as a 32 MB body takes a while to go through."""
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        return parse_chat_request(body, limits=limits, served_model=model_name, image_roots=roots, vision=vision)

    async def health(request: Request):
        ok = batcher.alive
        return JSONResponse({"status": "ok" if ok else "generation worker stopped", "model": model_name,
                             "family": batcher.bot.family.name, "device": str(batcher.bot.device),
                             "batches": batcher.batches, "answered": batcher.rows}, status_code=200 if ok else 503)

    async def models(request: Request):
        try:
            check_key(request)
        except ApiError as exc:
            return error(exc)
        return JSONResponse(models_list(model_name, created))

    async def chat_completions(request: Request):
        try:
            check_key(request)
            data = await read_body(request)
            started = time.perf_counter()  # the deadline (--timeout) counts checking and image decoding too
            req = await asyncio.to_thread(check, data)
            if req.images:  # decoded in the batcher's image threads; a bad image is this request's 400
                left = started + limits.timeout_s - time.perf_counter()
                try:
                    await asyncio.wait_for(asyncio.wrap_future(batcher.load_images(req)), max(0.001, left))
                except asyncio.TimeoutError:
                    raise _timed_out() from None
        except ApiError as exc:
            return error(exc)
        except ClientDisconnect:
            return JSONResponse({}, status_code=499)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = Job(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), submitted=started)
        batcher.submit(job)
        cid = completion_id()
        if not req.stream:
            return await _whole_answer(job, events, cid, model_name, limits, error)
        return StreamingResponse(_sse(job, events, cid, model_name, limits, req.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if on_ready is not None:
            on_ready()
        yield

    return Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                             Route("/v1/chat/completions", chat_completions, methods=["POST"])], lifespan=lifespan)


async def _next(job: Job, events: asyncio.Queue, deadline: float) -> Event:
    left = deadline - time.perf_counter()
    try:
        return await asyncio.wait_for(events.get(), timeout=max(0.001, left))
    except asyncio.TimeoutError:
        job.cancelled.set()  # the row leaves its batch at the next token
        raise _timed_out() from None


def _timed_out() -> ApiError:
    return ApiError(504, "the answer took longer than this server's request timeout", type="timeout", code="timeout")


async def _whole_answer(job, events, cid, model, limits, error):
    from starlette.responses import JSONResponse

    deadline = job.submitted + limits.timeout_s
    try:
        while True:
            ev = await _next(job, events, deadline)
            if ev.error is not None:
                return error(ev.error)
            if ev.done:
                return JSONResponse(completion(cid, model, ev.text, ev.finish_reason, ev.prompt_tokens,
                                               ev.completion_tokens))
    except ApiError as exc:
        return error(exc)
    except asyncio.CancelledError:  # the client went away: free its row
        job.cancelled.set()
        raise


async def _sse(job, events, cid, model, limits, include_usage):
    created = int(time.time())
    deadline = job.submitted + limits.timeout_s

    def data(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        first = True
        while True:
            try:
                ev = await _next(job, events, deadline)
            except ApiError as exc:
                yield data(exc.body())
                break
            if ev.error is not None:
                yield data(ev.error.body())
                break
            if first:  # OpenAI's stream opens with the role
                yield data(chunk(cid, model, created, delta={"role": "assistant", "content": ""}))
                first = False
            if ev.delta:
                yield data(chunk(cid, model, created, delta={"content": ev.delta}))
            if ev.done:
                yield data(chunk(cid, model, created, delta={}, finish_reason=ev.finish_reason))
                if include_usage:
                    yield data(chunk(cid, model, created, usage_=usage(ev.prompt_tokens, ev.completion_tokens)))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a no-op after a finished answer; frees the row when the client left mid-stream
