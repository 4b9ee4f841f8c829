"""Turning a recipe into processes: one in-process run, or torchrun with the standard multi-node arguments.

Every worker runs `python -m WORKER RESOLVED.yaml`, WORKER being the module the caller names (the CLI passes
`medvl.commands.worker`: the library never names the command layer); the resolved recipe (overrides applied) is
written into the run directory first, so all ranks and all nodes train exactly the same thing. DDP, DeepSpeed
and FSDP are configured inside the worker (accelerate plugins), so the launch line is the same for all three.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


def in_launched_process() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_launch(recipe) -> bool:
    return recipe.world_size > 1 and not in_launched_process()


def launch_command(recipe, recipe_file: Path, resume: str | None = None, *, worker: str) -> list[str]:
    """The torchrun line that starts `python -m worker recipe_file` on every rank of this node."""
    d = recipe.distributed
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={d.nproc}", f"--nnodes={d.nnodes}"]
    if d.nnodes > 1:
        cmd += [f"--node_rank={d.node_rank}", f"--master_addr={d.master_addr}", f"--master_port={d.master_port}"]
    else:
        cmd += ["--standalone"] if d.master_port == 29500 else [f"--master_port={d.master_port}"]
    cmd += ["-m", worker, str(recipe_file)]
    if resume:
        cmd += ["--resume", resume]
    return cmd


def write_launch_recipe(recipe) -> Path:
    from medvl.config import recipe_to_yaml

    run_dir = Path(recipe.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "launch-recipe.yaml"
    path.write_text(recipe_to_yaml(recipe))
    return path


def run_launched(recipe, resume: str | None = None, *, worker: str, env: dict | None = None,
                 timeout: float | None = None) -> int:
    """Start the worker processes (`python -m worker`, see the module docstring) and wait; returns the
    launcher's exit code. `timeout` (tests): past it the launcher and every rank are killed and TimeoutError
    raised, so ranks that wait on each other forever fail a test instead of hanging it."""
    import signal
    import subprocess

    cmd = launch_command(recipe, write_launch_recipe(recipe), resume, worker=worker)
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("OMP_NUM_THREADS", "1" if recipe.train.device == "cpu" else full_env.get("OMP_NUM_THREADS", "4"))
    if timeout is None:
        return subprocess.call(cmd, env=full_env)
    proc = subprocess.Popen(cmd, env=full_env, start_new_session=True)  # its own group: the ranks die with it
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise TimeoutError(f"the launched run did not finish in {timeout:g} s (ranks out of step?)") from None


def format_command(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
