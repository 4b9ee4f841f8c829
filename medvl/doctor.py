"""`medvl doctor`: what this machine has, and what that lets you do.

Meant as the first command on a new GPU box. Every check is one line with a verdict (ok / warn / missing / fail),
what was found, and what it enables or what to do; the report ends with one overall sentence.

Each package is looked up with importlib.metadata and find_spec before it is imported, and every import is
wrapped, so a broken install shows as `fail` with its error instead of crashing the doctor. Nothing is compiled,
downloaded or JIT-built. The slow part is importing torch, transformers and deepspeed: about 4 s on a 2-core box.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from medvl import __version__
from medvl.progress import NullProgress, ProgressSink

STATUSES = ("ok", "warn", "missing", "fail")
GIB = 1024**3
MIN_PYTHON = (3, 10)  # pyproject's requires-python
# Mixed-precision AdamW holds 16 bytes per parameter (bf16 weights 2 + grads 2 + fp32 master copy 4 + two Adam
# moments 8, the ZeRO paper's 16*psi); LoRA keeps the frozen base in bf16, 2 bytes per parameter. Both are
# before activations, so they are upper bounds on the model that fits one GPU.
FULL_FT_BYTES_PER_PARAM = 16
LORA_BYTES_PER_PARAM = 2
# Disk yardstick: Qwen2.5-VL-7B has 8.29e9 parameters, so one bf16 copy (a checkpoint or an export) is 15.4 GiB.
VLM_7B_BF16_BYTES = int(8.29e9 * 2)
# huggingface_hub's ENV_VARS_TRUE_VALUES: what it accepts as "on" for HF_HUB_OFFLINE.
_TRUE = {"1", "ON", "YES", "TRUE"}


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


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_gib: float
    capability: str  # "9.0" on CUDA; the gfx arch name on ROCm
    bf16: bool


@dataclass(frozen=True)
class Report:
    checks: tuple[Check, ...]
    gpus: tuple[Gpu, ...]
    verdict: str

    @property
    def ok(self) -> bool:
        return not any(c.required and c.status == "fail" for c in self.checks)

    def to_dict(self) -> dict:
        """The `--json` shape. Keys are stable: scripts read them."""
        return {
            "medvl": __version__,
            "ok": self.ok,
            "verdict": self.verdict,
            "checks": [asdict(c) for c in self.checks],
            "gpus": [asdict(g) for g in self.gpus],
        }


# ---------------------------------------------------------------------------------------------------------
# Looking packages up without trusting them.


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _has_module(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # find_spec imports the parent package of a dotted name, which may be broken
        return False


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _quiet():
    """Swallow what packages print while being imported: DeepSpeed logs `Setting accelerator to CPU` to stdout,
    bitsandbytes and transformers print or warn about missing CUDA."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _import(module: str):
    """(module, None) or (None, "ErrorType: first line")."""
    with _quiet():
        try:
            return importlib.import_module(module), None
        except Exception as exc:  # a broken install raises anything: ImportError, OSError (a missing .so), RuntimeError
            return None, _error(exc)


def _pins() -> dict[str, str]:
    """The exact versions medvl was tested with, read from its own installed metadata (`torch==2.13.0`)."""
    try:
        requires = importlib.metadata.requires("medvl") or []
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return {}
    pins = {}
    for req in requires:
        spec = req.split(";")[0].strip()
        if "==" in spec:
            name, version = spec.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def _install_hint(dist: str, pins: Mapping[str, str]) -> str:
    return f"pip install {dist}=={pins[dist]}" if dist in pins else f"pip install {dist}"


def check_package(name: str, dist: str, module: str, *, enables: str, pins: Mapping[str, str],
                  required: bool = False, missing_advice: str | None = None):
    """Installed? importable? the tested version? Returns (Check, the module or None)."""
    version = _dist_version(dist)
    found = _has_module(module)
    install = _install_hint(dist, pins)
    if version is None and not found:
        advice = missing_advice or f"{enables}: {install}"
        return Check(name, "fail" if required else "missing", "not installed", advice, required), None
    if not found:
        return Check(name, "fail", f"{version}: installed, but module {module!r} is not importable",
                     f"reinstall: {install}", required), None
    mod, err = _import(module)
    if err:
        return Check(name, "fail", f"{version or '?'}: {err}", f"reinstall: {install}", required), None
    version = version or getattr(mod, "__version__", "unknown version")
    pin = pins.get(dist)
    if pin and version.split("+")[0] != pin:
        return Check(name, "warn", version, f"{enables}; medvl is tested with {pin}", required), mod
    return Check(name, "ok", version, enables, required), mod


# ---------------------------------------------------------------------------------------------------------
# The checks.


def check_python() -> Check:
    v = sys.version_info
    detail = f"{v.major}.{v.minor}.{v.micro} ({sys.prefix})"
    if (v.major, v.minor) < MIN_PYTHON:
        return Check("python", "fail", detail, "medvl needs Python 3.10 or newer", required=True)
    return Check("python", "ok", detail, "supported (3.10+)", required=True)


def torch_build(torch) -> str:
    """'CUDA 12.8', 'ROCm 6.2' or 'CPU'."""
    version = getattr(torch, "version", None)
    if getattr(version, "hip", None):
        return f"ROCm {version.hip}"
    if getattr(version, "cuda", None):
        return f"CUDA {version.cuda}"
    return "CPU"


def check_torch(pins: Mapping[str, str]):
    check, torch = check_package("torch", "torch", "torch", enables="tensors and training", pins=pins,
                                 required=True,
                                 missing_advice="required: pip install torch==2.13.0 (on a GPU box, the CUDA "
                                                "build for your driver: see pytorch.org/get-started)")
    if torch is None:
        return check, None
    build = torch_build(torch)
    if build == "CPU":
        advice = "tests and the tiny demo; no GPU training"
    else:
        advice = "GPU training"
    if check.status == "warn":
        advice += f"; medvl is tested with {pins.get('torch')}"
    return Check("torch", check.status, f"{check.detail}, {build} build", advice, required=True), torch


def _nvidia_smi_gpus() -> list[str]:
    """GPU names the driver sees, independent of torch; [] without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _span(ids: list[int]) -> str:
    return str(ids[0]) if len(ids) == 1 else f"{ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) \
        else ",".join(map(str, ids))


def probe_gpus(torch) -> list[Gpu]:
    """Every GPU torch sees. Raises whatever torch raises when the driver is broken."""
    hip = torch_build(torch).startswith("ROCm")
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        if hip:
            capability = getattr(p, "gcnArchName", f"{p.major}.{p.minor}")
            bf16 = bool(torch.cuda.is_bf16_supported())
        else:
            capability = f"{p.major}.{p.minor}"
            # Ampere (sm 8.0) and newer have bf16 tensor cores. torch.cuda.is_bf16_supported() also says yes on
            # older cards through slow emulation, so read the capability instead.
            bf16 = p.major >= 8
        gpus.append(Gpu(i, p.name, round(p.total_memory / GIB, 1), capability, bf16))
    return gpus


def check_gpus(torch, nvidia_smi: Callable[[], list[str]] = _nvidia_smi_gpus):
    """One line per kind of GPU (eight identical H100s are one line). Returns (checks, gpus)."""
    build = torch_build(torch)
    if build == "CPU":
        seen = nvidia_smi()
        if seen:
            return [Check("gpu", "fail", f"{len(seen)}× {seen[0]} visible to the driver, but torch is a CPU build",
                          "install the CUDA build of torch==2.13.0 that matches your driver "
                          "(pytorch.org/get-started)")], []
        return [Check("gpu", "missing", "none", "GPU training needs an NVIDIA GPU and CUDA torch")], []
    try:
        gpus = probe_gpus(torch)
    except Exception as exc:  # a driver/runtime mismatch raises RuntimeError from cuda init
        return [Check("gpu", "fail", _error(exc), "check the driver with nvidia-smi")], []
    if not gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        return [Check("gpu", "warn", f"none visible to torch ({build} build, CUDA_VISIBLE_DEVICES={visible})",
                      "check the driver with nvidia-smi (rocm-smi on AMD) and CUDA_VISIBLE_DEVICES")], []
    groups: dict[tuple, list[Gpu]] = {}
    for g in gpus:
        groups.setdefault((g.name, g.memory_gib, g.capability, g.bf16), []).append(g)
    checks = []
    for (name, mem, capability, bf16), members in groups.items():
        label = "gpu" if len(groups) == 1 else f"gpu {_span([g.index for g in members])}"
        arch = "sm" if build.startswith("CUDA") else "arch"
        detail = f"{len(members)}× {name}, {mem:.0f} GiB, {arch} {capability}, {'bf16' if bf16 else 'no bf16'}"
        full = mem * GIB / FULL_FT_BYTES_PER_PARAM / 1e9
        lora = mem * GIB / LORA_BYTES_PER_PARAM / 1e9
        fits = f"per GPU ≈{full:.1f}B params full fine-tune, ≈{lora:.0f}B LoRA (before activations)"
        if bf16:
            checks.append(Check(label, "ok", detail, f"bf16 training; {fits}"))
        else:
            checks.append(Check(label, "warn", detail, f"fp16 only (bf16 needs sm 8.0+), no flash-attn 2; {fits}"))
    return checks, gpus


def cuda_home(env: Mapping[str, str] | None = None) -> tuple[Path | None, str]:
    """Where torch's extension builder will look for the CUDA toolkit, and why (same order as
    torch.utils.cpp_extension._find_cuda_home, without importing it: that import logs warnings)."""
    env = os.environ if env is None else env
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            return Path(env[var]), var
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        return Path(nvcc).parent.parent, f"nvcc on PATH at {nvcc}"
    if Path("/usr/local/cuda").exists():
        return Path("/usr/local/cuda"), "the default /usr/local/cuda"
    return None, "no CUDA_HOME, no nvcc on PATH, no /usr/local/cuda"


def _nvcc_release(home: Path) -> str | None:
    try:
        out = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def build_toolchain(torch_cuda: str | None, env: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """What DeepSpeed needs to JIT-build its ops: (tools found, problems). Nothing is compiled."""
    env = os.environ if env is None else env
    path = env.get("PATH")
    found, problems = [], []
    cxx = env.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c, path=path)), None)
    if cxx and shutil.which(cxx, path=path):
        found.append(Path(cxx).name)
    else:
        problems.append("no C++ compiler (apt install g++, or set CXX)")
    if shutil.which("ninja", path=path):
        found.append("ninja")
    elif (Path(sys.executable).parent / "ninja").exists():
        # torch's builder runs plain `ninja` from PATH; a venv that is used but not activated hides it.
        problems.append(f"ninja is in {Path(sys.executable).parent} but not on PATH: activate the venv")
    else:
        problems.append("no ninja: pip install ninja")
    if torch_cuda:
        home, why = cuda_home(env)
        if home is None:
            problems.append(f"no CUDA toolkit ({why}): set CUDA_HOME")
        elif not (home / "include" / "cuda_runtime.h").exists():
            problems.append(f"CUDA_HOME resolves to {home} ({why}) but it has no include/cuda_runtime.h: "
                            "set CUDA_HOME to the toolkit, e.g. /usr/local/cuda")
        else:
            release = _nvcc_release(home)
            if release is None:
                problems.append(f"{home}/bin/nvcc does not run: set CUDA_HOME to a CUDA toolkit")
            elif release.split(".")[0] != torch_cuda.split(".")[0]:
                problems.append(f"nvcc {release} vs torch's CUDA {torch_cuda}: DeepSpeed refuses to build ops "
                                "across CUDA major versions; install a matching toolkit")
            else:
                found.append(f"nvcc {release}")
    return found, problems


def check_deepspeed(torch, pins: Mapping[str, str]) -> Check:
    enables = "ZeRO-2/3 sharded training"
    check, ds = check_package("deepspeed", "deepspeed", "deepspeed", enables=enables, pins=pins)
    if ds is None:
        return check
    try:
        with _quiet():
            from deepspeed.accelerator import get_accelerator

            accelerator = get_accelerator().device_name()
            compatible = dict(getattr(importlib.import_module("deepspeed.ops"), "__compatible_ops__", {}))
            installed = dict(importlib.import_module("deepspeed.git_version_info").installed_ops)
    except Exception as exc:
        return Check("deepspeed", "warn", f"{check.detail}: cannot list its ops ({_error(exc)})", enables)
    ops = [k for k in compatible if k != "deepspeed_not_implemented"]
    prebuilt = sum(bool(installed.get(k)) for k in ops)
    can_build = sum(bool(compatible[k]) for k in ops)
    found, problems = build_toolchain(getattr(torch.version, "cuda", None) if torch is not None else None)
    detail = f"{check.detail}, {accelerator}, {prebuilt}/{len(ops)} ops prebuilt"
    if problems:
        return Check("deepspeed", "warn", detail, f"{enables}; its ops cannot JIT-build: " + "; ".join(problems))
    # From the reference machine: the CPU shm op took ~33 s, fused_adam ~55 s, cpu_adam ~57 s, once each.
    advice = (f"{enables}; {can_build} ops can JIT-build on first use ({', '.join(found)}; 30-60 s each, "
              "then cached)")
    if check.status == "warn":
        advice += f"; medvl is tested with {pins.get('deepspeed')}"
    return Check("deepspeed", check.status, detail, advice)


def check_flash_attn(gpus: list[Gpu], pins: Mapping[str, str]) -> Check:
    if any(g.bf16 for g in gpus):
        missing = "optional, faster attention: pip install flash-attn --no-build-isolation (else SDPA)"
    else:
        missing = "CUDA sm 8.0+ only; SDPA attention is used instead"
    check, _ = check_package("flash-attn", "flash-attn", "flash_attn", pins=pins, missing_advice=missing,
                             enables="attn_implementation='flash_attention_2'")
    if check.status == "fail":  # nearly always a wheel built against another torch or CUDA
        return Check("flash-attn", "fail", check.detail,
                     "built for another torch/CUDA: pip install flash-attn --no-build-isolation --force-reinstall")
    return check


def check_bitsandbytes(pins: Mapping[str, str]) -> Check:
    check, _ = check_package("bitsandbytes", "bitsandbytes", "bitsandbytes", pins=pins,
                             enables="QLoRA: 4-bit base weights (0.5 byte/param) on CUDA",
                             missing_advice="optional QLoRA (4-bit) on CUDA: pip install bitsandbytes")
    return check


def _not_needed(name: str, dist: str, module: str, why: str, broken_advice: str, ok_detail: str) -> Check:
    """A package medvl does not need but whose presence matters: missing is fine, broken is a warning."""
    version = _dist_version(dist)
    if version is None and not _has_module(module):
        return Check(name, "missing", "not installed", why)
    _, err = _import(module)
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


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(out_dir: Path) -> Check:
    target = Path(out_dir).expanduser().absolute()
    probe = _existing_parent(target)  # a run directory not made yet lands on its parent's filesystem
    try:
        usage = shutil.disk_usage(probe)
    except OSError as exc:
        return Check("disk", "fail", f"{target}: {_error(exc)}", "pick another --out-dir")
    where = (str(target) if probe == target else
             f"{target} (does not exist: it would be created inside {probe}, the nearest existing folder)")
    detail = f"{usage.free / GIB:.1f} of {usage.total / GIB:.0f} GiB free at {where}"
    if not probe.is_dir():
        return Check("disk", "fail", f"{target}: {probe} is a file, not a folder",
                     "pick another --out-dir (runs and exports are folders)")
    if not os.access(probe, os.W_OK | os.X_OK):
        return Check("disk", "fail", detail, f"{probe} is not writable by you, so {target} cannot be "
                                             "created there: pick another --out-dir" if probe != target else
                     f"{probe} is not writable: pick another --out-dir")
    per_copy = f"{VLM_7B_BF16_BYTES / GIB:.1f} GiB"
    if usage.free < GIB:
        return Check("disk", "fail", detail, "too little for checkpoints: free space or pick another --out-dir")
    copies = usage.free // VLM_7B_BF16_BYTES
    if copies < 2:  # training keeps a rotating checkpoint plus the final export
        return Check("disk", "warn", detail, f"tiny and small runs only: a bf16 7B VLM is {per_copy} per copy "
                                             "and training keeps several")
    return Check("disk", "ok", detail, f"room for {copies} bf16 copies of a 7B VLM ({per_copy} each)")


def hf_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The hub cache, in huggingface_hub's order: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub,
    XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub. Computed, not imported, so it follows `env`."""
    env = os.environ if env is None else env

    def expand(p: str) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(p)))

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return expand(env[var])
    if env.get("HF_HOME"):
        return expand(env["HF_HOME"]) / "hub"
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return expand(xdg) / "huggingface" / "hub"


def check_hf_cache(env: Mapping[str, str] | None = None) -> Check:
    env = os.environ if env is None else env
    cache = hf_cache_dir(env)
    offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").upper() in _TRUE
    probe = _existing_parent(cache)
    try:
        free = f"{shutil.disk_usage(probe).free / GIB:.0f} GiB free"
    except OSError:
        free = "free space unknown"
    if cache.is_dir():
        models = sum(1 for p in cache.iterdir() if p.name.startswith("models--"))
        state = f"{models} model{'s' if models != 1 else ''}, {free}"
    else:
        state = f"not created yet, {free}"
    detail = f"{cache} ({state})"
    if not os.access(probe, os.W_OK):
        return Check("hf cache", "warn", detail, "not writable: set HF_HOME to a writable directory")
    if offline:
        return Check("hf cache", "ok", detail, "HF_HUB_OFFLINE=1: models load from here or local paths only")
    return Check("hf cache", "ok", detail, "online: downloads land here (HF_HOME moves it; HF_HUB_OFFLINE=1 "
                                           "where there is no internet)")


# ---------------------------------------------------------------------------------------------------------
# The report.


def verdict(checks: list[Check], gpus: list[Gpu]) -> str:
    status = {c.name: c.status for c in checks}
    broken = [c.name for c in checks if c.required and c.status == "fail"]
    if broken:
        return f"not ready: fix {', '.join(broken)} first (the lines marked fail)"
    trains = all(status.get(n) in ("ok", "warn") for n in ("accelerate", "peft"))
    if gpus:
        kinds: dict[str, int] = {}
        for g in gpus:
            kinds[g.name] = kinds.get(g.name, 0) + 1
        summary = " + ".join(f"{n}× {name}" for name, n in kinds.items())
        precision = "bf16" if all(g.bf16 for g in gpus) else "fp16 only, no bf16"
        parts = [f"ready for GPU training on {summary} ({precision})" if trains
                 else f"{summary} found, but training needs accelerate and peft"]
        parts.append({"ok": "DeepSpeed ZeRO ready", "warn": "DeepSpeed ops cannot build (see its line)"}
                     .get(status.get("deepspeed"), "no DeepSpeed (single GPU and DDP only)"))
        parts.append("QLoRA ready" if status.get("bitsandbytes") == "ok" else "no QLoRA (needs bitsandbytes)")
        return "; ".join(parts)
    first = ("ready for CPU tests and the tiny demo" if status.get("easy-vqa") == "ok"
             else "ready for CPU tests (the tiny demo needs easy-vqa: pip install 'medvl[demo]')")
    parts = [first]
    if not trains:
        parts.append("training needs accelerate and peft")
    gpu = status.get("gpu")
    if gpu == "fail":
        parts.append("GPU training needs the CUDA build of torch (the driver sees GPUs)")
    elif gpu == "warn":
        parts.append("torch sees no GPU (see the gpu line)")
    else:
        parts.append("GPU training needs CUDA torch and an NVIDIA GPU")
    return "; ".join(parts)


def run_checks(out_dir: Path = Path("."), progress: ProgressSink | None = None) -> Report:
    """Every check, in the order a user reads them: interpreter, torch and GPUs, the libraries, optional
    accelerators, data/UI packages, the two packages medvl deliberately does without, then disk and cache."""
    progress = progress or NullProgress()
    pins = _pins()
    progress.start("doctor", total=8)

    steps: list[str] = []

    def step(label: str) -> None:  # names what runs next, so a spinner shows the slow import in progress
        if steps:
            progress.advance()
        steps.append(label)
        progress.note(label)

    step("python, torch")
    checks = [check_python()]
    torch_check, torch = check_torch(pins)
    checks.append(torch_check)
    gpu_checks, gpus = check_gpus(torch) if torch is not None else ([], [])
    checks += gpu_checks

    step("transformers")
    checks.append(check_package("transformers", "transformers", "transformers", pins=pins, required=True,
                                enables="models, processors, chat templates")[0])
    step("accelerate, peft")
    checks.append(check_package("accelerate", "accelerate", "accelerate", pins=pins,
                                enables="multi-GPU and multi-node launch")[0])
    checks.append(check_package("peft", "peft", "peft", pins=pins, enables="LoRA adapters, merging")[0])
    step("deepspeed")
    checks.append(check_deepspeed(torch, pins))
    step("flash-attn, bitsandbytes")
    checks.append(check_flash_attn(gpus, pins))
    checks.append(check_bitsandbytes(pins))
    step("textual, pydicom, easy-vqa")
    checks.append(check_package("textual", "textual", "textual", pins=pins,
                                enables="terminal UIs: training monitor, image chat")[0])
    checks.append(check_package("pydicom", "pydicom", "pydicom", pins=pins, enables="DICOM (.dcm) images")[0])
    checks.append(check_package("easy-vqa", "easy-vqa", "easy_vqa", pins=pins, enables="offline demo/test data",
                                missing_advice="offline demo/test data: pip install 'medvl[demo]'")[0])
    step("torchvision, qwen-vl-utils")
    checks.append(check_torchvision())
    checks.append(check_qwen_vl_utils())
    step("disk, hf cache")
    checks.append(check_disk(out_dir))
    checks.append(check_hf_cache())
    progress.advance()
    progress.finish()
    return Report(tuple(checks), tuple(gpus), verdict(checks, gpus))
