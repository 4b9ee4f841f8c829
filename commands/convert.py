"""`medvl convert --vl VL --llm LLM --out DIR`: a VLM whose language model is the LLM, verified on the spot."""

from __future__ import annotations

from pathlib import Path

import typer

from medvl.commands.options import OutDirOpt
from medvl.commands.ui import console

EXAMPLES = """[bold]Examples[/]
  medvl convert --vl Qwen2.5-VL-7B-Instruct --llm Qwen2.5-7B-Instruct --out Qwen2.5-VL-7B-Base  [dim]# HuatuoGPT[/]
  medvl convert --vl Qwen3-VL-8B-Instruct --llm my-medical-qwen3-8b --out med-qwen3-vl --vocab refuse
  medvl tiny --family qwen2.5-vl --out t-vl && medvl tiny --family causal-lm --out t-lm && \\
    medvl convert --vl t-vl --llm t-lm --out t-conv                                      [dim]# try it offline[/]"""


def complete_vocab(incomplete: str) -> list[str]:
    return [p for p in ("resize", "refuse") if p.startswith(incomplete)]


def convert(
    out: OutDirOpt,
    vl: Path = typer.Option(..., "--vl", help="Vision-language model directory: gives the vision tower, projector, "
                            "processor and chat template.", show_default=False),
    llm: Path = typer.Option(..., "--llm", help="Text LLM directory: gives the whole language model.",
                             show_default=False),
    vocab: str = typer.Option("resize", "--vocab", help="resize: the LLM's rows plus the VL model's rows for tokens "
                              "only its tokenizer has (vision specials); refuse: stop if the vocabularies differ.",
                              autocompletion=complete_vocab),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
) -> None:
    """Build a VLM from a VL model's vision tower and an LLM; check its text logits equal the LLM's."""
    from medvl.commands.ui import RichProgress
    from medvl.convert import convert as run

    r = run(vl, llm, out, vocab=vocab, overwrite=overwrite, max_shard_size=max_shard_size, progress=RichProgress())
    v = r.vocab
    specials = ", ".join(v.vl_tokens[:6]) + (" ..." if len(v.vl_tokens) > 6 else "")
    console.print(f"[green]converted[/] {r.family} -> {r.out}")
    console.print(f"  tensors      {r.from_llm} from the LLM ({r.decoder_replaced} decoder), {r.from_vl} from the VL "
                  f"model; {r.replaced} VL language-model tensors replaced")
    for d in r.dropped:
        console.print(f"  dropped      {d}")
    console.print(f"  vocabulary   {v.rows} rows: {v.rows - len(v.from_vl)} from the LLM, {len(v.from_vl)} from the VL "
                  f"model" + (f" ({specials})" if specials else ""))
    console.print(f"  embeddings   {'tied' if r.tied else 'untied'}, as in the LLM")
    for key, old, new in r.config_from_llm:
        console.print(f"  config       {key}: {old} -> {new}")
    console.print(f"  weights      {r.dtype}, {r.shards} shard(s), {r.bytes / 1e6:,.1f} MB; names: "
                  f"{r.vl_layout} layout in, {r.out_layout} out (what transformers' save_pretrained writes)")
    console.print(f"  verified     text probe of {r.probe_tokens} tokens: max |diff| vs the LLM's fp32 logits "
                  f"{r.logits_max_abs_diff:.3g} over {r.logits_columns} columns (limit 1e-4)")
    console.print(f"               image prompt: {r.image_tokens} image tokens, greedy output {r.image_generated!r}")
    console.print(f"  done in {r.seconds:.1f} s")
