"""Shell completion: the committed scripts are current, and completion works through the installed console
script with each shell's environment-variable protocol (and, for bash, through the committed script in bash)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from medvl.commands import completion_gen
from medvl.commands.main import COMMANDS, GROUPS
from medvl.commands.options import FAMILY_NAMES, FamilyOpt, RecipeArg, complete_family, complete_recipe, \
    shipped_recipe_names

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "completions"
BIN = Path(sys.executable).parent
MEDVL = BIN / "medvl"
needs_script = pytest.mark.skipif(not MEDVL.exists(), reason="console script not installed (pip install -e .)")


def complete(shell: str, line: str, cword: int | None = None) -> list[str]:
    """Ask the installed `medvl` for completions the way the generated script for `shell` does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMP_", "_TYPER", "_MEDVL"))}
    env["_MEDVL_COMPLETE"] = f"complete_{shell}"
    if shell == "bash":
        env["COMP_WORDS"] = line
        env["COMP_CWORD"] = str(len(line.split()) - (0 if line.endswith(" ") else 1) if cword is None else cword)
    else:
        env["_TYPER_COMPLETE_ARGS"] = line
        env["_TYPER_COMPLETE_FISH_ACTION"] = "get-args"
    proc = subprocess.run([str(MEDVL)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def commands_using(annotation) -> list[str]:
    """Registered commands with a parameter of this shared type (commands/options.py)."""
    return [name for name, fn in COMMANDS.items()
            if annotation in typing.get_type_hints(fn, include_extras=True).values()]


# ---------------------------------------------------------------------------------------------------------
# The committed files.


def test_committed_completion_scripts_are_current(tmp_path):
    written = completion_gen.write_all(tmp_path)
    assert [p.name for p in written] == ["medvl.bash", "medvl.zsh", "medvl.fish"]
    for path in written:
        committed = COMMITTED / path.name
        assert committed.exists(), f"{committed} is missing: run `make completions`"
        # the header names the typer that wrote it; under another typer within the declared range (make
        # test-lowest) only the script itself must be the same
        body = lambda text: [line for line in text.splitlines() if not line.startswith("# medvl completion for")]  # noqa: E731
        assert body(committed.read_text()) == body(path.read_text()), f"{committed} is stale: run `make completions`"


def test_zsh_script_starts_with_compdef():
    assert (COMMITTED / "medvl.zsh").read_text().splitlines()[0] == "#compdef medvl"


@needs_script
@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_committed_script_is_what_the_installed_command_emits(shell):
    """The file minus its header equals `_MEDVL_COMPLETE=source_<shell> medvl`, the app's own answer."""
    env = {**os.environ, "_MEDVL_COMPLETE": f"source_{shell}"}
    proc = subprocess.run([str(MEDVL)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    body = [line for line in (COMMITTED / f"medvl.{shell}").read_text().splitlines()
            if not line.startswith("# medvl completion for")]
    assert "\n".join(body).strip() == proc.stdout.strip()
    assert "_MEDVL_COMPLETE=complete_" in proc.stdout


def test_complete_var_follows_typer():
    assert completion_gen.complete_var("medvl") == "_MEDVL_COMPLETE"
    assert completion_gen.complete_var("med-vl") == "_MED_VL_COMPLETE"


# ---------------------------------------------------------------------------------------------------------
# Dynamic completion through the console script.


@needs_script
def test_bash_completes_every_subcommand():
    assert set(complete("bash", "medvl ")) == set(COMMANDS) | set(GROUPS)
    assert complete("bash", "medvl do") == ["doctor"]


@needs_script
def test_bash_completes_options_of_a_subcommand():
    assert {"--out-dir", "--json", "--help"} <= set(complete("bash", "medvl doctor --"))


@needs_script
def test_zsh_and_fish_protocols_complete_subcommands():
    zsh = "\n".join(complete("zsh", "medvl do"))
    assert zsh.startswith("_arguments '*: :((") and '"doctor":' in zsh
    fish = complete("fish", "medvl do")
    assert len(fish) == 1 and fish[0].startswith("doctor\t")


@needs_script
def test_family_option_completes_family_names():
    users = commands_using(FamilyOpt)
    if not users:
        pytest.skip("no registered command takes --family yet")
    cmd = users[0]
    assert complete("bash", f"medvl {cmd} --family qwen") == ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]
    assert complete("bash", f"medvl {cmd} --family ") == list(FAMILY_NAMES)
    assert complete("fish", f"medvl {cmd} --family ll") == ["llava"]


@needs_script
def test_recipe_argument_completes_shipped_recipes(tmp_path):
    users = commands_using(RecipeArg)
    if not users:
        pytest.skip("no registered command takes a recipe yet")
    shipped = shipped_recipe_names()
    assert set(shipped) <= set(complete("bash", f"medvl {users[0]} "))


@needs_script
def test_committed_bash_script_completes_in_real_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    script = (f"source {COMMITTED / 'medvl.bash'}; complete -p medvl; "
              "COMP_WORDS=(medvl do); COMP_CWORD=1; _medvl_completion medvl; printf '<%s>\\n' \"${COMPREPLY[@]}\"")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMP_", "_MEDVL"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the venv's medvl, as on a box where it is activated
    proc = subprocess.run([bash, "--norc", "--noprofile", "-c", script], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["complete -o default -F _medvl_completion medvl", "<doctor>"]


# ---------------------------------------------------------------------------------------------------------
# The completer functions themselves.


def test_complete_family():
    assert complete_family("qwen") == ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]
    assert complete_family("") == list(FAMILY_NAMES)
    assert complete_family("gpt") == []


def test_complete_recipe_lists_local_yaml_and_shipped_names(tmp_path, monkeypatch):
    (tmp_path / "my_recipe.yaml").write_text("")
    (tmp_path / "my_notes.txt").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "lora.yml").write_text("")
    monkeypatch.chdir(tmp_path)
    assert complete_recipe("my") == sorted({n for n in shipped_recipe_names() if n.startswith("my")}
                                           | {"my_recipe.yaml"})
    assert complete_recipe("sub/l") == ["sub/lora.yml"]
    assert set(shipped_recipe_names()) <= set(complete_recipe(""))
