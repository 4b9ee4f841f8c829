"""`medvl doctor`'s building blocks: the Check a line of the report is, and looking packages up without trusting
them (installed? importable? the version medvl pins?). The GPU and toolchain checks are in doctor_gpu.py, the
report itself in doctor.py.

Each package is looked up with importlib.metadata and find_spec before it is imported, and every import is
wrapped, so a broken install shows as `fail` with its error instead of crashing the doctor.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

STATUSES = ("ok", "warn", "missing", "fail")
GIB = 1024**3
MIN_PYTHON = (3, 10)  # pyproject's requires-python


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # one of STATUSES
    detail: str  # what was found: version, build, path, or the error
    advice: str  # what it enables, or what to do about it
    required: bool = False  # a `fail` here makes the whole report not ok (exit status 1)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")


def dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def has_module(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # find_spec imports the parent package of a dotted name, which may be broken
        return False


def error_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def quiet():
    """Swallow what packages print while being imported: DeepSpeed logs `Setting accelerator to CPU` to stdout,
    bitsandbytes and transformers print or warn about missing CUDA."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def safe_import(module: str):
    """(module, None) or (None, "ErrorType: first line")."""
    with quiet():
        try:
            return importlib.import_module(module), None
        except Exception as exc:  # a broken install raises anything: ImportError, OSError (a missing .so), RuntimeError
            return None, error_line(exc)


def tested_pins() -> dict[str, str]:
    """The verified set: every `name==version` of medvl/constraints.txt (shipped in the package), by canonical
    name. It is what `make test` and CI install; a user's own box may differ within the declared ranges."""
    from importlib import resources

    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    try:
        text = resources.files("medvl").joinpath("constraints.txt").read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):
        return {}
    pins = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            pins[canonicalize_name(req.name)] = exact[0]
    return pins


def declared_ranges() -> dict[str, str]:
    """What medvl's own metadata allows (`torch>=2.6,<3`), by canonical name; empty for a never-installed tree."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        requires = importlib.metadata.requires("medvl") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    ranges = {}
    for text in requires:
        req = Requirement(text)
        if req.marker is None and str(req.specifier):  # extras (dev, demo) carry a marker
            ranges[canonicalize_name(req.name)] = str(req.specifier)
    return ranges


def in_range(version: str, spec: str) -> bool:
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) in SpecifierSet(spec)
    except (InvalidSpecifier, InvalidVersion):
        return True  # cannot tell: do not cry wolf


def matches_pin(version: str, pin: str) -> bool:
    """PEP 440 equality: '2.13.0+cpu' is torch 2.13.0 (a local build label does not change the release)."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion

    try:
        return SpecifierSet(f"=={pin}").contains(version, prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return version == pin


def install_hint(dist: str, pins: Mapping[str, str]) -> str:
    return f"pip install {dist}=={pins[dist]}" if dist in pins else f"pip install {dist}"


def check_package(name: str, dist: str, module: str, *, enables: str, pins: Mapping[str, str],
                  required: bool = False, missing_advice: str | None = None, ranges: Mapping[str, str] | None = None):
    """Installed? importable? inside the declared range? the verified version? Returns (Check, the module or
    None). `ranges` defaults to medvl's own metadata (declared_ranges)."""
    version = dist_version(dist)
    found = has_module(module)
    install = install_hint(dist, pins)
    if version is None and not found:
        advice = missing_advice or f"{enables}: {install}"
        return Check(name, "fail" if required else "missing", "not installed", advice, required), None
    if not found:
        return Check(name, "fail", f"{version}: installed, but module {module!r} is not importable",
                     f"reinstall: {install}", required), None
    mod, err = safe_import(module)
    if err:
        return Check(name, "fail", f"{version or '?'}: {err}", f"reinstall: {install}", required), None
    version = version or getattr(mod, "__version__", "unknown version")
    pin = pins.get(dist)
    spec = (declared_ranges() if ranges is None else ranges).get(dist)
    if spec and not in_range(version.split("+")[0], spec):
        return Check(name, "fail" if required else "warn", version,
                     f"outside the range medvl supports ({spec}): expect import or API errors; "
                     f"{install} (the verified version)", required), mod
    if pin and not matches_pin(version, pin):
        return Check(name, "warn", version, f"{enables}; outside medvl's verified set ({pin}): supported, but "
                     "not what the test suite ran; if something misbehaves, compare with "
                     f"`{install}`", required), mod
    return Check(name, "ok", version, enables, required), mod


def check_python() -> Check:
    v = sys.version_info
    detail = f"{v.major}.{v.minor}.{v.micro} ({sys.prefix})"
    if (v.major, v.minor) < MIN_PYTHON:
        return Check("python", "fail", detail, "medvl needs Python 3.10 or newer", required=True)
    return Check("python", "ok", detail, "supported (3.10+)", required=True)


def _not_needed(name: str, dist: str, module: str, why: str, broken_advice: str, ok_detail: str) -> Check:
    """A package medvl does not need but whose presence matters: missing is fine, broken is a warning."""
    version = dist_version(dist)
    if version is None and not has_module(module):
        return Check(name, "missing", "not installed", why)
    _, err = safe_import(module)
    if err:
        return Check(name, "warn", f"{version or '?'}: {err}", broken_advice)
    return Check(name, "ok", version or "installed", ok_detail)


def check_torchvision() -> Check:
    # transformers decides "torchvision is available" from find_spec alone, then imports it for its fast image
    # processors, so a broken install breaks image processing that would work without it.
    return _not_needed("torchvision", "torchvision", "torchvision",
                       "not needed (PIL image processors); PyPI's build is CUDA-linked, fails on CPU torch",
                       "transformers sees it installed and may pick it for images: pip uninstall torchvision",
                       "not needed by medvl; transformers may use it")


def check_qwen_vl_utils() -> Check:
    why = "not needed (transformers resizes images); imports torchvision at import"
    return _not_needed("qwen-vl-utils", "qwen-vl-utils", "qwen_vl_utils", why, why,
                       "importable (optional, not required)")
