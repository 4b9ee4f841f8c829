"""`medvl doctor`: what this machine has, and what that lets you do.

Meant as the first command on a new GPU box. Every check is one line with a verdict (ok / warn / missing / fail),
what was found, and what it enables or what to do; the report ends with one overall sentence.

Nothing is compiled, downloaded or JIT-built; a broken install shows as `fail` with its error instead of crashing
the doctor (doctor_lookup.py). The slow part is importing torch, transformers and deepspeed: about 4 s on a 2-core
box. Here: the report, the disk and Hugging Face cache lines, the verdict; the GPU lines are in doctor_gpu.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from medvl import __version__
from medvl.doctor_gpu import Gpu, build_toolchain, check_bitsandbytes, check_deepspeed, check_flash_attn, \
    check_gpus, check_torch, cuda_home, probe_gpus, torch_build
from medvl.doctor_lookup import GIB, STATUSES, Check, check_package, check_python, check_qwen_vl_utils, \
    check_torchvision, declared_ranges, error_line, tested_pins
from medvl.progress import NullProgress, ProgressSink

__all__ = [
    "STATUSES", "Check", "Gpu", "Report", "build_toolchain", "check_bitsandbytes", "check_deepspeed", "check_disk",
    "check_flash_attn", "check_gpus", "check_hf_cache", "check_package", "check_python", "check_qwen_vl_utils",
    "check_torch", "check_torchvision", "cuda_home", "declared_ranges", "hf_cache_dir", "probe_gpus", "run_checks", "tested_pins",
    "torch_build", "verdict",
]

# Disk yardstick: Qwen2.5-VL-7B has 8.29e9 parameters, so one bf16 copy (a checkpoint or an export) is 15.4 GiB.
VLM_7B_BF16_BYTES = int(8.29e9 * 2)


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
        return Check("disk", "fail", f"{target}: {error_line(exc)}", "pick another --out-dir")
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
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES  # what huggingface_hub itself reads as "on"

    offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").upper() in ENV_VARS_TRUE_VALUES
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
    pins = tested_pins()
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
