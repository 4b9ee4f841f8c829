"""`medvl doctor`'s GPU lines: torch's build, the GPUs it sees (and what fits on them), the CUDA toolchain that
DeepSpeed's ops build with, flash-attn and bitsandbytes.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from medvl.doctor_lookup import GIB, Check, check_package, error_line, quiet

# Mixed-precision AdamW holds 16 bytes per parameter (bf16 weights 2 + grads 2 + fp32 master copy 4 + two Adam
# moments 8, the ZeRO paper's 16*psi); LoRA keeps the frozen base in bf16, 2 bytes per parameter. Both are
# before activations, so they are upper bounds on the model that fits one GPU.
FULL_FT_BYTES_PER_PARAM = 16
LORA_BYTES_PER_PARAM = 2


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_gib: float
    capability: str  # "9.0" on CUDA; the gfx arch name on ROCm
    bf16: bool


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
        return [Check("gpu", "fail", error_line(exc), "check the driver with nvidia-smi")], []
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
        with quiet():
            from deepspeed.accelerator import get_accelerator

            accelerator = get_accelerator().device_name()
            compatible = dict(getattr(importlib.import_module("deepspeed.ops"), "__compatible_ops__", {}))
            installed = dict(importlib.import_module("deepspeed.git_version_info").installed_ops)
    except Exception as exc:
        return Check("deepspeed", "warn", f"{check.detail}: cannot list its ops ({error_line(exc)})", enables)
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
