"""YAML in, pydantic out, problems with line numbers: the layer under `medvl.config` that knows nothing of recipes.

    raw, lines, problems = read_yaml(text)           # data, {loc: line}, duplicate-key problems
    origins, more = apply_overrides(raw, ["optim.lr=1e-5"])
    message = reword(pydantic_error, Recipe)         # "unknown key; did you mean 'lr'?"
    problem = place(Problem(loc, message), lines, origins)

The YAML is read twice: once as data and once as a node tree, so every key has a line number (and duplicate
keys, which PyYAML silently collapses to the last one, are caught). `key.sub=value` overrides are read as YAML
scalars (1e-5, true, null, [a, b]). pydantic's errors are reworded for a YAML author, with did-you-mean where it
helps; the allowed values of a Literal come from pydantic's own `ctx["expected"]`.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where (dotted key, YAML line or override) and what."""

    loc: tuple[str | int, ...]
    message: str
    line: int | None = None
    override: str | None = None

    @property
    def path(self) -> str:
        return dotted(self.loc)

    def __str__(self) -> str:
        where = f"  [override {self.override}]" if self.override else f"  (line {self.line})" if self.line else ""
        return f"{self.path}: {self.message}{where}"


def dotted(loc: tuple) -> str:
    """("data", "train", 0, "path") -> "data.train[0].path"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "(recipe)"


class Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-5 as a float (YAML 1.1, and so PyYAML, only knows 1.0e-5)."""


Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                             list("-+0123456789."))


class Dumper(yaml.SafeDumper):
    """Block-style sections, but short scalar lists on one line: betas: [0.9, 0.999]."""


Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=all(not isinstance(v, (dict, list)) for v in data)))


def read_yaml(text: str) -> tuple[Any, dict[tuple, int], list[Problem]]:
    """(data, {loc: 1-based line}, duplicate-key problems). Text that is not YAML raises YamlSyntax, whose
    .problem carries the line."""
    try:
        raw = yaml.load(text, Loader=Loader)
        lines, problems = _line_map(yaml.compose(text, Loader=Loader))
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise YamlSyntax(Problem((), f"not valid YAML: {exc.problem or exc}", line=line)) from None
    return raw, lines, problems


class YamlSyntax(Exception):
    """The text is not YAML; `.problem` says where."""

    def __init__(self, problem: Problem):
        self.problem = problem
        super().__init__(str(problem))


def apply_overrides(raw: dict, overrides) -> tuple[dict[tuple, str], list[Problem]]:
    """Set each `key.sub=value` in raw (in place); returns ({loc: override text}, problems)."""
    origins: dict[tuple, str] = {}
    problems: list[Problem] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = tuple(key.strip().split("."))
        if not sep or not all(parts):
            problems.append(Problem(("override",), f"{item!r} is not key.sub=value (e.g. optim.lr=1e-5)",
                                    override=item))
            continue
        node = raw
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                problems.append(Problem(parts[: i + 1], f"is a {type(node[part]).__name__}, not a section, so "
                                        f"{key} cannot be set", override=item))
                break
            node = node[part]
        else:
            try:
                node[parts[-1]] = yaml.load(value, Loader=Loader)
            except yaml.YAMLError:
                node[parts[-1]] = value  # not YAML (e.g. "a: b: c"): keep the text as a string
            origins[parts] = item
    return origins, problems


def _line_map(node, loc=(), lines=None, problems=None):
    """{loc: 1-based line} for every key and list item, plus duplicate-key problems."""
    if lines is None:
        lines, problems = {(): 1}, []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value in node.value:
            here = loc + (key_node.value,)
            line = key_node.start_mark.line + 1
            if key_node.value in first:
                problems.append(Problem(here, f"duplicate key (first on line {first[key_node.value]}); YAML keeps "
                                        f"only the last one", line=line))
            first.setdefault(key_node.value, line)
            lines[here] = line
            _line_map(value, here, lines, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[loc + (i,)] = item.start_mark.line + 1
            _line_map(item, loc + (i,), lines, problems)
    return lines, problems


def place(p: Problem, lines: dict[tuple, int], origins: dict[tuple, str]) -> Problem:
    """Attach the YAML line of the deepest key of p.loc in the file, unless an override explains it better
    (it set that key, something under it, or the only part of its section the file does not have)."""
    if p.override or p.line:
        return p
    loc = p.loc
    while loc not in lines:
        loc = loc[:-1]
    best, best_score = None, float(len(loc))
    for oloc, item in origins.items():
        n = min(len(oloc), len(p.loc))
        shared = next((i for i in range(n) if oloc[i] != p.loc[i]), n)
        score = shared + (0.5 if shared == n and shared else 0)
        if score > best_score:
            best, best_score = item, score
    return Problem(p.loc, p.message, override=best) if best else Problem(p.loc, p.message, line=lines[loc])


# ---------------------------------------------------------------------------------------------------------
# pydantic errors, reworded

_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}


def reword(err: dict, root: type[BaseModel]) -> str:
    """pydantic's error (one item of ValidationError.errors()) reworded for a YAML author validating `root`."""
    kind, loc, ctx, got = err["type"], tuple(err["loc"]), err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        return _unknown_key(loc, root)
    if kind == "missing":
        return "required, not set"
    if kind == "literal_error":
        # ctx["expected"] is pydantic's own rendering: "'bf16', 'fp16' or 'fp32'".
        expected = ctx["expected"]
        close = difflib.get_close_matches(str(got), re.findall(r"'([^']*)'", expected), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{got!r} is not one of {expected}{hint}"
    if kind in _BOUNDS:
        return f"must be {_BOUNDS[kind]} {next(iter(ctx.values()))}, got {got!r}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"must be a section (a mapping of keys), got {got!r}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return f"{err['msg'][0].lower()}{err['msg'][1:]}, got {got!r}"


def _unknown_key(loc: tuple, root: type[BaseModel]) -> str:
    name, parent = str(loc[-1]), _unwrap(_annotation_at(loc[:-1], root))
    fields = list(parent.model_fields) if _is_model(parent) else []
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    # The most common slip is the right key in the wrong section (train.lr for optim.lr).
    elsewhere = [f"{sec}.{name}" for sec, cls in sections(root).items() if name in cls.model_fields]
    if elsewhere:
        return f"unknown key here; did you mean {elsewhere[0]}?"
    if len(loc) == 1:
        return f"unknown section; the sections are: {', '.join(fields)}"
    return f"unknown key; {dotted(loc[:-1])} takes: {', '.join(fields)}"


def sections(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """{name: model class} of root's fields that are sections (optional ones included)."""
    out = {}
    for name, field in root.model_fields.items():
        ann = _unwrap(field.annotation)
        if _is_model(ann):
            out[name] = ann
    return out


def _is_model(ann) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _annotation_at(loc: tuple, root: type[BaseModel]):
    """The type annotation of the field at loc, walking root -> section -> list item; None if unknown."""
    ann: Any = root
    for part in loc:
        ann = _unwrap(ann)
        if isinstance(part, int):
            args = typing.get_args(ann) if typing.get_origin(ann) is list else ()
            ann = args[0] if args else None
        elif _is_model(ann) and part in ann.model_fields:
            ann = ann.model_fields[part].annotation
        else:
            return None
    return ann


def _unwrap(ann):
    """Strip Optional: X | None -> X."""
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return args[0] if len(args) == 1 else ann
    return ann
