"""The OpenAI chat-completions wire format: requests checked into medvl's own terms, answers and errors back out.

Pure Python (no torch, no web framework), so every rule here is tested without a model or a socket.

A request's `messages` become medvl conversation turns (`medvl.inference.Turn`): `system` messages set the system
prompt, `user` messages carry text and images, `assistant` messages are earlier answers. Content is a string or a
list of blocks: `{"type": "text", "text": ...}` and `{"type": "image_url", "image_url": {"url": ...}}` where the
URL is

- `data:<mime>;base64,<bytes>`: the image itself (PNG, JPEG, TIFF, BMP, WebP, DICOM as `application/dicom`);
- `file:///abs/path` or a plain path: a file on the server, allowed only inside the server's image roots (the
  root rule of `medvl.data.paths`, as for a dataset);
- `http(s)://...`: refused: medvl never reaches the network, so the client sends the bytes instead.

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status a client library
maps to its exception classes (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 413, 504).
"""

from __future__ import annotations

import base64
import binascii
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant")
# Data URL MIME types and the suffix the image loader recognises them by (DICOM is sniffed by content anyway).
MIME_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/tiff": ".tif",
               "image/bmp": ".bmp", "image/webp": ".webp", "application/dicom": ".dcm", "image/dicom": ".dcm"}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Defaults fit a 7B model on one GPU; `medvl serve` exposes each."""

    max_body_bytes: int = 32 * 1024 * 1024  # a few base64 images of a CT series (base64 adds a third)
    max_images: int = 8
    max_image_pixels: int = 4096 * 4096  # refuse before decoding a decompression bomb in full
    max_new_tokens: int = 2048
    default_max_new_tokens: int = 512  # the chatbot's budget (medvl.inference.CHAT_MAX_NEW_TOKENS)
    timeout_s: float = 300.0


class ApiError(Exception):
    """An error the client gets in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class ImageRef:
    """An image of a request: a checked local path, or bytes from a data URL; `image` once decoded (a loaded
    medvl.conversation.ChatImage, by medvl.server.images before the request is queued)."""

    path: str | None = None
    data: bytes | None = None
    suffix: str = ".png"
    param: str = ""
    image: object = field(default=None, repr=False)


@dataclass
class Message:
    role: str
    text: str
    images: list[ImageRef] = field(default_factory=list)


@dataclass
class ChatRequest:
    messages: list[Message]  # user / assistant turns, in order (system text is taken out)
    system: str | None
    model: str
    max_new_tokens: int
    temperature: float | None
    top_p: float | None
    seed: int | None
    stream: bool
    include_usage: bool = False

    @property
    def images(self) -> list[ImageRef]:
        return [im for m in self.messages for im in m.images]


# ---------------------------------------------------------------------------------------------------------
# parsing


def parse_chat_request(body: object, *, limits: Limits, served_model: str, image_roots: list[str],
                       vision: bool) -> ChatRequest:
    """A decoded JSON body -> ChatRequest, or ApiError(400) naming the offending field (`param`)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required (GET /v1/models lists it)", "model")
    if model != served_model:
        raise ApiError(404, f"this server serves '{served_model}', not '{model}'", type="invalid_request_error",
                       param="model", code="model_not_found")
    n = body.get("n", 1)
    if n != 1:
        raise bad_request("only n=1 is supported", "n")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty list", "messages")
    system, messages = None, []
    for i, msg in enumerate(raw):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request("each message must be an object with 'role' and 'content'", param)
        role = msg.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise bad_request(f"role must be one of {', '.join(ROLES)}, got {role!r}", f"{param}.role")
        text, images = _content(msg.get("content"), f"{param}.content", role, image_roots)
        if role == "system":
            if images:
                raise bad_request("a system message cannot hold images", f"{param}.content")
            system = text if system is None else f"{system}\n{text}"
            continue
        if images and not vision:
            raise bad_request(f"'{served_model}' is a text-only model: it cannot see images", f"{param}.content",
                              "images_not_supported")
        if messages and messages[-1].role == role == "user":  # consecutive user messages: one turn
            messages[-1].text = f"{messages[-1].text}\n{text}".strip()
            messages[-1].images += images
        else:
            messages.append(Message(role, text, images))
    if not messages or messages[-1].role != "user":
        raise bad_request("the last message must come from the user", "messages")
    for i, m in enumerate(messages):
        if m.role == "user" and not m.text.strip():
            raise bad_request("a user message needs text (an image alone needs a question too)", "messages")
    n_images = sum(len(m.images) for m in messages)
    if n_images > limits.max_images:
        raise bad_request(f"{n_images} images in one request; this server allows {limits.max_images}",
                          "messages", "too_many_images")
    max_new = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_new is None:  # the default budget, within this server's --max-tokens (a request that asks nothing
        max_new = min(limits.default_max_new_tokens, limits.max_new_tokens)  # must not be refused for asking 512)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise bad_request("max_tokens must be a positive integer", "max_tokens")
    if max_new > limits.max_new_tokens:
        raise bad_request(f"max_tokens {max_new} is above this server's limit of {limits.max_new_tokens}",
                          "max_tokens")
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p is not None and top_p == 0:
        raise bad_request("top_p must be above 0", "top_p")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise bad_request("seed must be an integer", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    return ChatRequest(messages, system, model, max_new, temperature, top_p, seed, stream,
                       bool(isinstance(options, dict) and options.get("include_usage")))


def _number(body: dict, key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad_request(f"{key} must be a number between {low:g} and {high:g}", key)
    return float(value)


def _content(content: object, param: str, role: str, roots: list[str]) -> tuple[str, list[ImageRef]]:
    if isinstance(content, str):
        return content.replace("<image>", ""), []  # a literal placeholder would bind no image
    if content is None and role == "assistant":
        return "", []
    if not isinstance(content, list):
        raise bad_request("content must be a string or a list of content blocks", param)
    texts, images = [], []
    for j, block in enumerate(content):
        where = f"{param}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"].replace("<image>", ""))
        elif kind == "image_url":
            if role != "user":
                raise bad_request("only user messages can hold images", where)
            url = block.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise bad_request("image_url needs a 'url'", f"{where}.image_url")
            images.append(image_ref(url, f"{where}.image_url", roots))
        else:
            raise bad_request(f"unsupported content block {kind!r}: use 'text' or 'image_url'", where)
    return "\n".join(t for t in texts if t), images


def image_ref(url: str, param: str, roots: list[str]) -> ImageRef:
    """A checked image reference; nothing is decoded here (medvl.server.images does, before the request is
    queued)."""
    low = url[:16].lower()
    if low.startswith(("http://", "https://")):
        raise bad_request("remote image URLs are not fetched: medvl never reaches the network; send the image "
                          "as a data URL (data:image/png;base64,...)", param, "remote_url_refused")
    if low.startswith("data:"):
        head, sep, payload = url.partition(",")
        mime = head[5:].split(";")[0].strip().lower()
        if not sep or ";base64" not in head.lower():
            raise bad_request("a data URL must be base64: data:image/png;base64,...", param)
        if mime and mime not in MIME_SUFFIX:
            raise bad_request(f"unsupported image type {mime!r}; send one of {', '.join(sorted(MIME_SUFFIX))}",
                              param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request("the data URL's base64 payload does not decode", param) from None
        if not data:
            raise bad_request("the data URL holds no bytes", param)
        return ImageRef(data=data, suffix=MIME_SUFFIX.get(mime, ".png"), param=param)
    path = url[7:] if low.startswith("file://") else url
    if not os.path.isabs(path):
        raise bad_request("a local image must be an absolute path (or a data URL)", param)
    from medvl.data.paths import path_problem

    problem = path_problem(path, base=None, roots=roots)
    if problem:
        raise bad_request(f"image path refused: {problem.split('; ')[0]}; the server reads files only under "
                          f"its --image-root folders", param, "image_path_refused")
    if not Path(path).is_file():
        raise bad_request(f"no image file at {path}", param, "image_not_found")
    return ImageRef(path=os.path.normpath(path), param=param)


# ---------------------------------------------------------------------------------------------------------
# answers


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, created: int, *, delta: dict | None = None, finish_reason: str | None = None,
          usage_: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": None}]
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "medvl"}]}
