"""Start-up hygiene: `medvl --help`, `--version`, every subcommand's `--help` and TAB completion import none of
the heavy packages. Each case runs the installed console script in a subprocess with PYTHONPROFILEIMPORTTIME=1
(the same as `python -X importtime`), so stderr lists every module the real process imported.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from medvl import __version__
from medvl.commands.main import COMMANDS, GROUPS

MEDVL = Path(sys.executable).with_name("medvl")
pytestmark = pytest.mark.skipif(not MEDVL.exists(), reason="console script not installed (pip install -e .)")

# Import cost on the 2-core reference box, against a 0.25 s budget for --help and each TAB press:
# torch ~1.5 s, transformers ~1 s on top, deepspeed ~2 s, textual ~0.3 s, numpy ~0.075 s. huggingface_hub,
# tokenizers and safetensors only come in through transformers. pydantic is NOT on the list: typer 0.29 itself
# imports it (typer._adapters, ~55 ms with pydantic) to coerce the parameters of any subcommand, so every
# `medvl <cmd> --help` and every completion below the root pays it whatever medvl does.
HEAVY = ("torch", "transformers", "accelerate", "peft", "deepspeed", "textual", "numpy", "huggingface_hub",
         "tokenizers", "safetensors", "matplotlib", "plotext", "textual_plotext")


def run(args: list[str], **env_extra: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMP_", "_TYPER", "_MEDVL"))}
    env.update(env_extra, PYTHONPROFILEIMPORTTIME="1", COLUMNS="120")
    proc = subprocess.run([str(MEDVL), *args], env=env, capture_output=True, text=True, timeout=60)
    # "import time:       612 |       2795 |     medvl.commands.options"; the first such line is a header.
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:") and "cumulative" not in line}
    assert "typer" in modules, "import-time profile missing: is PYTHONPROFILEIMPORTTIME honoured?"
    return proc, modules


def heavy_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


CASES = [["--help"], ["--version"], []] + [[name, "--help"] for name in [*COMMANDS, *GROUPS]]


@pytest.mark.parametrize("args", CASES, ids=lambda a: " ".join(a) or "(no args)")
def test_no_heavy_imports(args):
    proc, modules = run(args)
    assert proc.returncode in (0, 2), proc.stderr[-2000:]  # click exits 2 when no args shows the help
    assert heavy_in(modules) == []


def completion_lines() -> list[str]:
    """The root, each command's options, each group's subcommands, and every value completer in use."""
    from medvl.commands.options import FamilyOpt, RecipeArg

    lines = ["medvl "] + [f"medvl {name} --" for name in COMMANDS] + [f"medvl {name} " for name in GROUPS]
    for name, fn in COMMANDS.items():
        hints = typing.get_type_hints(fn, include_extras=True).values()
        if FamilyOpt in hints:
            lines.append(f"medvl {name} --family ")
        if RecipeArg in hints:
            lines.append(f"medvl {name} ")
    return lines


@pytest.mark.parametrize("words", completion_lines())
def test_completion_request_imports_nothing_heavy(words):
    cword = str(len(words.split()) - (0 if words.endswith(" ") else 1))
    proc, modules = run([], _MEDVL_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=cword)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if not words.endswith(" ") or "--family" in words:  # a recipe list may be empty until recipes ship
        assert proc.stdout.strip(), "completion returned nothing"
    assert heavy_in(modules) == []


def test_version_prints_the_package_version():
    proc, _ = run(["--version"])
    assert proc.returncode == 0
    assert proc.stdout == f"medvl {__version__}\n"
    proc, _ = run(["-V"])
    assert proc.stdout == f"medvl {__version__}\n"


def test_no_args_shows_help_listing_every_command():
    proc, _ = run([])
    assert "Usage: medvl" in proc.stdout
    listed = {line.strip("│ ").split(" ")[0] for line in proc.stdout.splitlines() if line.startswith("│ ")}
    assert set(COMMANDS) | set(GROUPS) <= listed


def test_the_detector_sees_a_heavy_import():
    """The check can fail: a profiled process that imports numpy (cheapest of HEAVY, ~0.075 s) is caught."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run([sys.executable, "-c", "import numpy"], env=env, capture_output=True, text=True,
                          timeout=60)
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:") and "cumulative" not in line}
    assert "numpy" in heavy_in(modules)


def test_bench_files_are_not_collected_by_pytest():
    """Benches run with `make bench`; pytest's default patterns (test_*.py, *_test.py) must not match them."""
    bench = Path(__file__).parent / "bench"
    names = [p.name for p in bench.glob("*.py")]
    assert "run_all.py" in names
    assert [n for n in names if fnmatch.fnmatch(n, "test_*.py") or fnmatch.fnmatch(n, "*_test.py")] == []
