"""`medvl serve MODEL`: an OpenAI-compatible endpoint (chat completions with images, streaming) for a model."""

from __future__ import annotations

from pathlib import Path

import typer

EXAMPLES = """[bold]Examples[/]
  medvl serve runs/sft                                     [dim]# http://127.0.0.1:8000/v1, this machine only[/]
  medvl serve runs/sft --host 0.0.0.0 --api-key $KEY       [dim]# reachable from the network: a key is required[/]
  medvl serve Qwen/Qwen2.5-VL-7B-Instruct --adapter runs/lora/final --image-root /data/scans
  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "sft", "messages": [{"role": "user", "content": "What is a pneumothorax?"}]}'"""


def serve(
    model: str = typer.Argument(..., help="A run directory, checkpoint, model directory or cached hub id.",
                                show_default=False),
    adapter: Path = typer.Option(None, "--adapter", help="A LoRA adapter applied over MODEL without merging.",
                                 show_default=False),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Anything but loopback needs --api-key "
                             "(or --insecure-no-key)."),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port."),
    api_key: str = typer.Option(None, "--api-key", envvar="MEDVL_API_KEY", show_default=False,
                                help="Require 'Authorization: Bearer KEY' on every API call (env MEDVL_API_KEY)."),
    insecure_no_key: bool = typer.Option(False, "--insecure-no-key",
                                         help="Allow a non-loopback address without a key (your network only)."),
    name: str = typer.Option(None, "--name", help="The model name clients send (default: MODEL's folder name).",
                             show_default=False),
    image_root: list[Path] = typer.Option(None, "--image-root", show_default=False,
                                          help="A folder whose images clients may name by absolute path; repeat "
                                          "for several. Without one, images come as data: URLs only."),
    max_batch: int = typer.Option(16, "--max-batch", help="Most requests answered by one generate call."),
    max_images: int = typer.Option(8, "--max-images", help="Most images in one request."),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="Largest max_tokens a request may ask for."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds one request may take before it gets 504."),
    max_body_mb: float = typer.Option(32.0, "--max-body-mb", help="Largest request body in MB (base64 images "
                                      "count 4/3 of their size); larger gets 413."),
    max_image_pixels: int = typer.Option(4096 * 4096, "--max-image-pixels",
                                         help="Largest image (width x height) a request may send."),
    system: str = typer.Option(None, "--system", help="System prompt when a request has none (default: the "
                               "model's own).", show_default=False),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on a GPU, else fp32), bf16, fp16, fp32."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present).",
                               show_default=False),
) -> None:
    """Serve a model over HTTP with the OpenAI chat-completions API: text and images, streaming, batched."""
    from medvl.commands.chat import quiet_loading
    from medvl.server import ServeSettings, serve as run
    from medvl.server.protocol import Limits

    from medvl.commands.ui import err_console as err  # off a terminal: lines never folded at 80 columns

    settings = ServeSettings(model, adapter, host, port, api_key, insecure_no_key, name, list(image_root or []),
                             dtype, device, system, max_batch,
                             Limits(max_images=max_images, max_new_tokens=max_tokens, timeout_s=timeout,
                                    max_body_bytes=int(max_body_mb * 1024 * 1024), max_image_pixels=max_image_pixels))

    def ready(info: dict) -> None:
        roots = ", ".join(info["image_roots"]) or "none (data: URLs only)"
        err.print(f"[bold green]serving[/] {info['model']} ({info['family']}, {info['device']}, {info['dtype']}) at "
                  f"[bold]{info['url']}[/]\n  key: {'required' if info['key'] else 'none'}   image roots: {roots}\n"
                  f"  [dim]POST /v1/chat/completions   GET /v1/models   GET /health   Ctrl-C stops[/]")

    def loading(what: str) -> None:
        quiet_loading()
        err.print(f"[dim]loading {what}[/]")

    run(settings, on_ready=ready, on_loading=loading)
    err.print("stopped")
