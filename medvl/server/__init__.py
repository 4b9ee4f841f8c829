"""`medvl serve`: a trained model behind an OpenAI-compatible HTTP API (protocol, batching, app).

    from medvl.server import ServeSettings, serve
    serve(ServeSettings(model="runs/sft", port=8000), on_ready=print)   # blocks until Ctrl-C / SIGTERM

Safe by default: it binds 127.0.0.1. Any other address is reachable from the network, so it needs an API key
(`api_key`) or the explicit `insecure_no_key`. Images are read from data URLs, or from files under the
`image_roots` only (the root rule of medvl.data.paths); remote URLs are refused (medvl never reaches the network).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medvl.errors import MedvlError
from medvl.server.protocol import Limits

LOOPBACK_NAMES = ("localhost",)


@dataclass
class ServeSettings:
    model: str | Path
    adapter: str | Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    insecure_no_key: bool = False
    served_name: str | None = None  # the `model` clients send; default: the model's folder name
    image_roots: list[Path] = field(default_factory=list)
    dtype: str = "auto"
    device: str | None = None
    system: str | None = None
    max_batch: int = 16
    limits: Limits = field(default_factory=Limits)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_settings(s: ServeSettings) -> None:
    """Refuse an unsafe or impossible setup before the model loads."""
    if not is_loopback(s.host) and not s.api_key and not s.insecure_no_key:
        raise MedvlError(f"binding {s.host} makes the model reachable from the network, and no API key is set",
                         fix="add --api-key KEY (clients send 'Authorization: Bearer KEY'), or "
                             "--insecure-no-key if the network is yours alone; or keep the default 127.0.0.1")
    if not 0 < s.port < 65536:
        raise MedvlError(f"port {s.port} is not a TCP port", fix="use 1-65535, e.g. --port 8000")
    if s.max_batch < 1:
        raise MedvlError(f"--max-batch must be at least 1, got {s.max_batch}")
    if not s.limits.max_body_bytes > 0:
        raise MedvlError(f"--max-body-mb must be above 0, got {s.limits.max_body_bytes / 2**20:g}",
                         fix="e.g. --max-body-mb 32 (a few base64 images)")
    if s.limits.max_image_pixels < 1:
        raise MedvlError(f"--max-image-pixels must be at least 1, got {s.limits.max_image_pixels}",
                         fix="e.g. --max-image-pixels 16777216 (4096 x 4096)")
    if s.limits.max_images < 0:
        raise MedvlError(f"--max-images must be 0 (text only) or more, got {s.limits.max_images}")
    if s.limits.max_new_tokens < 1:
        raise MedvlError(f"--max-tokens must be at least 1, got {s.limits.max_new_tokens}")
    if not s.limits.timeout_s > 0:  # `not >` also refuses NaN
        raise MedvlError(f"--timeout must be above 0 seconds, got {s.limits.timeout_s:g}",
                         fix="e.g. --timeout 300 (the default)")
    for root in s.image_roots:
        if not Path(root).is_dir():
            raise MedvlError(f"image root {root} is not a folder", where=str(root),
                             fix="give an existing folder (--image-root) whose images clients may name by path")
    from medvl.resolve import resolve_device, resolve_dtype

    resolve_dtype(s.dtype)  # a misspelt --dtype or --device (or a GPU this machine lacks): now, not after loading
    resolve_device(s.device)


def served_name(s: ServeSettings, source) -> str:
    if s.served_name:
        return s.served_name
    path = source.run_dir or source.path
    return Path(path).name if Path(str(s.model)).exists() else str(s.model)


def serve(s: ServeSettings, *, on_ready: Callable[[dict], None] = lambda info: None,
          on_loading: Callable[[str], None] = lambda what: None) -> None:
    """Load the model once, then answer HTTP requests until interrupted (Ctrl-C, SIGTERM)."""
    check_settings(s)
    from medvl.resolve import resolve_model

    source = resolve_model(s.model, adapter=s.adapter)
    sock = _bind(s.host, s.port)  # a port in use fails now, not after minutes of loading
    try:
        _run(s, source, sock, on_ready, on_loading)
    finally:
        sock.close()


def _run(s: ServeSettings, source, sock, on_ready, on_loading) -> None:
    import uvicorn

    from medvl.inference import Chatbot
    from medvl.server.app import create_app
    from medvl.server.batching import Batcher

    on_loading(source.describe())
    bot = Chatbot(source=source, dtype=s.dtype, device=s.device, system=s.system)
    batcher = Batcher(bot, limits=s.limits, max_batch=s.max_batch)
    name = served_name(s, source)
    info = {"url": f"http://{s.host}:{s.port}/v1", "model": name, "family": bot.family.name,
            "device": str(bot.device), "dtype": bot.dtype, "source": source.describe(),
            "image_roots": [str(r) for r in s.image_roots], "key": bool(s.api_key)}
    app = create_app(batcher, model_name=name, api_key=s.api_key,
                     image_roots=[os.path.abspath(r) for r in s.image_roots], on_ready=lambda: on_ready(info))
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    batcher.start()
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        batcher.close()


def _bind(host: str, port: int):
    """The listening socket, bound before the app starts: a port in use is a clear error, not a log line."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MedvlError(f"cannot listen on {host}:{port}: {exc.strerror}",
                         fix="another program holds the port: pick another with --port" if exc.errno == 98
                         else "check --host (an address of this machine, e.g. 127.0.0.1 or 0.0.0.0)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
