"""`medvl train RECIPE [k=v ...]`: run a recipe; launches itself as several processes when the recipe asks."""

from __future__ import annotations

import typer

from medvl.commands.options import OverridesArg, RecipeArg
from medvl.commands.ui import console

EXAMPLES = """[bold]Examples[/]
  medvl train tiny_cpu                                   [dim]# the shipped CPU demo recipe[/]
  medvl train recipes/my_sft.yaml optim.lr=1e-5 train.max_steps=100
  medvl train huatuo_sft_qwen25vl_7b --dry-run           [dim]# table, launch line, memory estimate[/]
  medvl train my.yaml --resume auto                      [dim]# continue from the newest checkpoint[/]
  medvl train tiny_cpu --tui                             [dim]# with the live dashboard (re-attach: medvl watch RUN)[/]"""


def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe, launch command, "
                                 "trainability table and a memory estimate; train nothing."),
    resume: str = typer.Option(None, "--resume", help="'auto' (newest checkpoint of this run) or a checkpoint path."),
    allow_recipe_change: bool = typer.Option(False, "--allow-recipe-change",
                                             help="Resume even when settings that cannot change mid-run (data, "
                                                  "batch size, seed, model, method) differ from the checkpoint's."),
    tui: bool = typer.Option(False, "--tui", help="Show the live dashboard while training runs in a background "
                             "process; closing asks whether to stop it or leave it running (medvl watch RUN re-attaches)."),
) -> None:
    """Train a model: alignment or instruction tuning, full or LoRA, on CPU, one GPU or many."""
    import os

    from medvl.config import load_recipe
    from medvl.engine.checkpoint import FORCE_ENV

    if allow_recipe_change:
        os.environ[FORCE_ENV] = "1"  # read where the checkpoint is compared, in this process or launched ranks

    from medvl.commands.worker import MODULE as worker

    r = load_recipe(recipe, overrides or [])
    from medvl.commands.ui import interrupt_context

    interrupt_context.update(run_dir=r.output.dir, save_every=r.train.save_every)  # for the Ctrl-C hint
    if dry_run:
        from medvl.commands.ui import render_dry_run
        from medvl.engine.dryrun import plan_run

        render_dry_run(plan_run(r, worker=worker))
        return
    from pathlib import Path

    from medvl.engine.checkpoint import FinishedRun, finished_run

    finished = finished_run(Path(r.output.dir), resume)  # before launching anything: it may have nothing to do
    if finished is not None and finished.done_for(r):
        console.print(finished.nothing_to_do())
        return
    if tui:
        from medvl.tui.dashboard import train_with_dashboard

        if not console.is_terminal:
            console.print("[yellow]--tui needs a terminal; training with plain output[/]")
        else:
            console.print(train_with_dashboard(recipe, overrides or [], resume, r.output.dir))
            return
    from medvl.engine.launch import needs_launch, run_launched

    if needs_launch(r):
        from medvl.data.dataset import verify_recipe_data
        from medvl.engine.setup import prepare_run_dir

        # Mistakes found here print once, not under torchrun's failure report of every rank.
        verify_recipe_data(r)
        prepare_run_dir(r, resume)
        console.print(f"[dim]launching {r.world_size} processes ({r.distributed.strategy})[/]")
        code = run_launched(r, resume, worker=worker)
        if code:
            raise typer.Exit(code)
        return
    from medvl.commands.ui import TrainConsole
    from medvl.engine.train import train as run

    view = TrainConsole()
    try:
        result = run(r, resume=resume, sinks=[view])
    finally:
        view.close()  # a stopped run must not leave the live panel drawing over the error message
    if result.already_finished:  # the total only known once the data loaded (epochs) came out at or below it
        console.print(FinishedRun(result.steps, result.final_dir, None).nothing_to_do())
