"""`medvl prepare-data` and `medvl inspect-data`: clean training data before training starts."""

from __future__ import annotations

from pathlib import Path

import typer

from medvl.commands.ui import RichProgress

EXAMPLES = """[bold]Examples[/]
  medvl prepare-data PubMedVision_Alignment_VQA.json --out data/align --model Qwen/Qwen2.5-VL-7B-Instruct
  medvl prepare-data a.json b.jsonl --out data/mix --model ./Qwen2.5-VL-7B-Base --max-seq-len 4096 --workers 8
  medvl prepare-data disc.jsonl --out data/disc --format disc --strict
  medvl prepare-data raw/ --out data/all --image-root /mnt/pmc-images      [dim]# every file in raw/[/]
  medvl prepare-data qa.csv --out data/qa --columns user=question,assistant=answer,image=path"""

INSPECT_EXAMPLES = """[bold]Examples[/]
  medvl inspect-data data/align --index 0 --model Qwen/Qwen2.5-VL-7B-Instruct"""


def prepare_data(
    inputs: list[Path] = typer.Argument(..., help="Raw data files (JSON, JSONL, CSV, InternVL meta JSON), or "
                                        "folders: every such file directly inside is read.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for shards, manifest and quarantine."),
    model: str = typer.Option(None, "--model", help="Model whose processor measures exact token lengths."),
    format: str = typer.Option(None, "--format", help="Force a reader (sharegpt, internvl-meta, disc, "
                               "llm-finetune, openai, alpaca, medeval); default: detected per file."),
    max_seq_len: int = typer.Option(None, "--max-seq-len", help="Longest sample in tokens (needs --model)."),
    max_images: int = typer.Option(8, "--max-images", help="Most images per sample."),
    resolution: str = typer.Option(None, "--resolution", help="Pixel preset: huatuo (<=420x360) or qwen-finetune."),
    min_pixels: int = typer.Option(None, "--min-pixels", help="Smallest image area after resizing (Qwen-VL)."),
    max_pixels: int = typer.Option(None, "--max-pixels", help="Largest image area after resizing (Qwen-VL)."),
    loss_mask: str = typer.Option("all", "--loss-mask", help="all: every assistant turn; last: only the last."),
    workers: int = typer.Option(1, "--workers", "-j", help="Worker processes."),
    shard_size: int = typer.Option(10_000, "--shard-size", help="Input samples per output shard."),
    image_root: list[str] = typer.Option(None, "--image-root", help="A folder images may be read from besides "
                                         "each data file's own (repeat for several); relative paths not found "
                                         "beside the data file are looked up here.", show_default=False),
    columns: str = typer.Option(None, "--columns", help="Read CSV files by column: which is the user turn, the "
                                "answer, the image, e.g. user=question,assistant=answer,image=path (also "
                                "system=, id=). With --format columns, flat JSON rows too.", show_default=False),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad sample (file, line, reason)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an output made with other settings."),
) -> None:
    """Turn raw medical image-text data into clean, checked, length-measured training shards."""
    from medvl.config import RESOLUTION_PRESETS
    from medvl.data.prepare import prepare

    if resolution:
        if resolution not in RESOLUTION_PRESETS:
            raise typer.BadParameter(f"choose one of {', '.join(RESOLUTION_PRESETS)}", param_hint="--resolution")
        min_pixels, max_pixels = RESOLUTION_PRESETS[resolution]
    result = prepare(inputs, out, format=format, model=model, max_seq_len=max_seq_len, max_images=max_images,
                     min_pixels=min_pixels, max_pixels=max_pixels, loss_mask=loss_mask, shard_size=shard_size,
                     workers=workers, strict=strict, image_root=image_root, columns=columns, overwrite=overwrite,
                     progress=RichProgress())
    from medvl.commands.ui import render_prepare

    render_prepare(result)
    if result.failed:  # after the summary: a file that failed, or nothing kept, is not a success
        raise typer.Exit(2)


def inspect_data(
    data: Path = typer.Argument(..., help="A prepared-data directory.", show_default=False),
    index: int = typer.Option(0, "--index", "-i", help="Which sample (0-based, across shards)."),
    model: str = typer.Option(..., "--model", help="The model whose chat template and processor to use."),
    loss_mask: str = typer.Option("all", "--loss-mask", help="all or last."),
) -> None:
    """Show one prepared sample exactly as the model will see it: trained tokens and image spans marked."""
    from medvl.data.inspect import inspect_sample

    from medvl.commands.ui import render_inspection

    render_inspection(inspect_sample(data, index, model, loss_mask=loss_mask))


inspect_data.examples = INSPECT_EXAMPLES
