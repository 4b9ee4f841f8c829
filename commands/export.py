"""`medvl export RUN_OR_CHECKPOINT --out DIR`: a self-contained model directory, reload-checked on the spot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medvl.commands.options import OutDirOpt
from medvl.commands.ui import console

EXAMPLES = """[bold]Examples[/]
  medvl export runs/huatuo-sft --out models/huatuo-sft                   [dim]# bf16, 5GB shards[/]
  medvl export runs/lora/final --out models/merged --dtype fp32          [dim]# merge a LoRA adapter[/]
  medvl export runs/sft/checkpoints/step-000400 --out models/step400     [dim]# incl. DeepSpeed ZeRO shards[/]
  medvl export adapter-dir --base Qwen2.5-VL-7B-Instruct --out merged"""

def complete_dtype(incomplete: str) -> list[str]:
    from medvl.models import DTYPES  # light: the table lives with model loading

    return [d for d in DTYPES if d.startswith(incomplete)]


SourceArg = Annotated[Path, typer.Argument(
    help="A run directory (uses RUN/final), a final/ or LoRA adapter directory, a save_pretrained model "
         "directory, or a checkpoint RUN/checkpoints/step-N.", show_default=False)]


def export(
    source: SourceArg,
    out: OutDirOpt,
    dtype: str = typer.Option("bf16", "--dtype", help="Weights dtype: bf16, fp16 or fp32.",
                              autocompletion=complete_dtype),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard to write."),
    base: str = typer.Option(None, "--base", help="Base model for a LoRA adapter (default: the one it names)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
) -> None:
    """Merge, write safetensors shards + processor + model card, reload with stock transformers, compare."""
    from medvl.commands.ui import RichProgress
    from medvl.export import export as run

    r = run(source, out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, base=base,
            progress=RichProgress())
    p = r.parity
    console.print(f"[green]exported[/] {r.kind} {r.family} model -> {r.out}")
    console.print(f"  model        {r.model_class}, {r.dtype}, {r.shards} shard(s), {r.bytes / 1e6:,.1f} MB"
                  + (f"; base {r.base}" if r.base else ""))
    if p.merge_max_abs_diff is not None:
        console.print(f"  merge        LoRA merged: max |logit diff| vs the adapter model "
                      f"{p.merge_max_abs_diff:.3g} (fp32)")
    console.print(f"  parity       reloaded with stock transformers, fp32 compute, {p.prompt_tokens} tokens incl. "
                  f"{p.image_tokens} image tokens: max |logit diff| vs the pre-export model with {r.dtype} weights "
                  f"{p.logits_max_abs_diff:.3g} (limit {p.tolerance:g}); {p.tensors_checked} tensors bit-identical; "
                  f"greedy {len(p.generated_export)} tokens identical: {r.generated_text!r}")
    if r.dtype != "fp32":
        console.print(f"  rounding     {r.dtype} weights vs the fp32 pre-export model: max |logit diff| "
                      f"{p.pre_export_max_abs_diff:.3g} (largest logit {p.logits_scale:.3g}); greedy tokens "
                      f"{'identical' if p.generation_matches_pre_export else 'differ'}")
    console.print(f"  files        {', '.join(r.files)}")
    console.print(f"  done in {r.seconds:.1f} s")
