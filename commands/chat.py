"""`medvl chat [MODEL] --image x.png`: multi-turn image chat; a Textual app on a terminal, a line loop otherwise."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from medvl.commands.evaluate import complete_decoding

EXAMPLES = """[bold]Examples[/]
  medvl chat --image ct.png                               [dim]# $MEDVL_MODEL, else the newest run under ./runs[/]
  medvl chat runs/sft --image scan.dcm                    [dim]# a run: its final model (LoRA applied, not merged)[/]
  medvl chat Qwen/Qwen2.5-VL-7B-Instruct --compare runs/sft --image x.png   [dim]# base vs fine-tuned, side by side[/]
  echo "What modality is this?" | medvl chat runs/sft --image ct.dcm          [dim]# plain: prints one answer[/]
  medvl chat runs/sft --plain --json < questions.txt      [dim]# {"answer", "tokens", "seconds"} per line[/]
  [dim]In the app: /image PATH, /clear, /undo, /retry, /system TEXT, /window lung, /save FILE, /export FILE.md, /help;
  Esc stops an answer.[/]"""


def chat(
    model: Path = typer.Argument(None, help="A run directory, checkpoint, model directory or cached hub id. Default: "
                                "$MEDVL_MODEL, else the newest finished run under ./runs, else ./demo-out/run.",
                                show_default=False),
    image: list[Path] = typer.Option(None, "--image", "-i", help="Image(s) for the first question (PNG, JPEG, "
                                     "TIFF, BMP, WebP, DICOM); repeat for several.", show_default=False),
    adapter: Path = typer.Option(None, "--adapter", help="A LoRA adapter (or LoRA run) applied over MODEL without "
                                 "merging.", show_default=False),
    compare: Path = typer.Option(None, "--compare", help="A second model: every question goes to both, answers side "
                                "by side (base vs fine-tuned).", show_default=False),
    system: str = typer.Option(None, "--system", help="System prompt (default: the model's own).",
                               show_default=False),
    decoding: str = typer.Option("greedy", "--decoding", autocompletion=complete_decoding,
                                 help="greedy (deterministic) or huatuo (the published sampling preset of `eval`)."),
    temperature: float = typer.Option(None, "--temperature", help="Sample at this temperature (0: greedy).",
                                      show_default=False),
    top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling mass.", show_default=False),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="Longest answer, in tokens."),
    repetition_penalty: float = typer.Option(None, "--repetition-penalty", help="e.g. 1.2 (huatuo's).",
                                             show_default=False),
    seed: int = typer.Option(None, "--seed", help="Seed for sampled decoding.", show_default=False),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on a GPU, else fp32), bf16, fp16, fp32."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present).",
                               show_default=False),
    plain: bool = typer.Option(False, "--plain", help="Line mode (automatic when stdin or stdout is not a "
                               "terminal): answers on stdout, notes on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Plain mode, one JSON object per answer."),
) -> None:
    """Chat with a model about your images, turn by turn, streamed; --compare puts two models side by side."""
    from medvl.inference import GenerationOptions
    from medvl.resolve import default_model, resolve_device, resolve_dtype, resolve_model

    from medvl.commands.ui import err_console as err  # off a terminal: lines never folded at 80 columns

    if model is None:
        model, why = default_model()
        err.print(f"model: {model} [dim]({why}; pass MODEL to choose another)[/]")
    options = GenerationOptions(decoding, max_new_tokens, temperature, top_p, repetition_penalty, seed)
    options.kwargs()  # bad values fail now, not after loading
    resolve_dtype(dtype)  # a misspelt --dtype or --device (or a GPU this machine lacks): now, not after loading
    resolve_device(device)
    sources = [resolve_model(model, adapter=adapter)] + ([resolve_model(compare)] if compare else [])
    images = _check_images(sources, list(image or []))
    quiet_loading()
    if plain or as_json or not (sys.stdin.isatty() and sys.stdout.isatty()):
        from medvl.commands.chat_plain import check_stdin, run_plain

        check_stdin(sources[0].path)
        from medvl.inference import Chatbot
        from medvl.session import ChatSession

        for src in sources:
            err.print(f"[dim]loading {src.describe()}[/]")
        bots = [Chatbot(source=s, dtype=dtype, device=device, options=options, system=system) for s in sources]
        raise typer.Exit(run_plain(ChatSession(bots, images), as_json=as_json))
    from medvl.tui.chat import ChatApp

    ChatApp(sources, options=options, images=images, system=system, dtype=dtype, device=device).run()


def _check_images(sources, images) -> list:
    """Before minutes of loading: a text-only model refuses images, every image exists, stays in the root and
    decodes (medvl.conversation.check_image)."""
    from medvl.conversation import check_image
    from medvl.errors import MedvlError

    for src in sources:
        if images and not src.family.is_vision:
            raise MedvlError(f"{src.path} is a text-only model ({src.family.name}): it cannot see images",
                             where=str(images[0]), fix="drop --image, or chat with a vision-language model")
    return [check_image(path) for path in images]


def quiet_loading() -> None:
    """transformers draws a 'Loading weights' bar on stderr: noise in a script, garbage over the app's screen."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
