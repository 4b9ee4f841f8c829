"""medvl doctor: truthful on this machine (one real run through the console script), and every branch a GPU box
or a broken install would take, driven with fake torch modules, fake packages and fake toolchains."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import stat
import subprocess
import sys
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest

from medvl import doctor as d
from medvl.doctor_lookup import has_module

GiB = 1024**3
CHECK_KEYS = {"name", "status", "detail", "advice", "required"}


# ---------------------------------------------------------------------------------------------------------
# One real run (~4.5 s: it imports torch, transformers and deepspeed), in a subprocess exactly as a user runs it,
# which also keeps those imports out of the test process. stdout must be pure JSON, so DeepSpeed's import-time
# "[WARNING] ... Setting accelerator to CPU" (printed to stdout) would break this test if it leaked.


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    exe = Path(sys.executable).with_name("medvl")
    if not exe.exists():
        pytest.skip("console script not installed (pip install -e .)")
    out = tmp_path_factory.mktemp("runs")
    proc = subprocess.run([str(exe), "doctor", "--json", "--out-dir", str(out / "new-run")],
                          capture_output=True, text=True, timeout=120)
    try:
        return proc, json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"`medvl doctor --json` stdout is not pure JSON:\n{proc.stdout[:400]}")


def test_real_run_is_json_with_stable_keys_and_exit_0(real):
    proc, report = real
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr
    assert set(report) == {"medvl", "ok", "verdict", "checks", "gpus"}
    assert report["ok"] is True
    for c in report["checks"]:
        assert set(c) == CHECK_KEYS
        assert c["status"] in d.STATUSES
    names = [c["name"] for c in report["checks"]]
    assert names[:2] == ["python", "torch"]
    for expected in ("transformers", "accelerate", "peft", "deepspeed", "flash-attn", "bitsandbytes", "textual",
                     "pydicom", "easy-vqa", "torchvision", "qwen-vl-utils", "disk", "hf cache"):
        assert expected in names


def test_real_run_tells_the_truth_about_this_machine(real):
    import torch

    _, report = real
    by = {c["name"]: c for c in report["checks"]}
    assert by["python"]["detail"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}.")
    assert by["torch"]["detail"].startswith(importlib.metadata.version("torch"))
    assert by["transformers"]["detail"] == importlib.metadata.version("transformers")
    assert by["deepspeed"]["detail"].startswith(importlib.metadata.version("deepspeed"))
    assert "(does not exist: it would be created inside" in by["disk"]["detail"]  # --out-dir not made yet
    if torch.version.cuda is None:
        assert ", CPU build" in by["torch"]["detail"]
        assert report["gpus"] == []
        assert "CPU tests" in report["verdict"]
        if not shutil.which("nvidia-smi"):
            assert by["gpu"]["status"] == "missing"
    else:
        assert len(report["gpus"]) == torch.cuda.device_count()
    try:
        import torchvision  # noqa: F401
    except Exception:
        assert by["torchvision"]["status"] in ("missing", "warn")
        assert by["torchvision"]["advice"].startswith("not needed") or "uninstall" in by["torchvision"]["advice"]


# ---------------------------------------------------------------------------------------------------------
# GPUs, through a fake torch.


def fake_torch(cuda="12.8", hip=None, gpus=(), fail=None):
    def props(i):
        name, mem_bytes, major, minor = gpus[i]
        return SimpleNamespace(name=name, total_memory=mem_bytes, major=major, minor=minor)

    def count():
        if fail:
            raise RuntimeError(fail)
        return len(gpus)

    return SimpleNamespace(version=SimpleNamespace(cuda=cuda, hip=hip),
                           cuda=SimpleNamespace(device_count=count, get_device_properties=props,
                                                is_bf16_supported=lambda: True))


H100 = ("NVIDIA H100 80GB HBM3", 85_520_809_984, 9, 0)  # torch reports 79.6 GiB
V100 = ("Tesla V100-SXM2-32GB", 34_089_730_048, 7, 0)


def test_identical_gpus_make_one_line_with_bf16_and_memory_rule():
    checks, gpus = d.check_gpus(fake_torch(gpus=[H100] * 8))
    assert len(gpus) == 8 and all(g.bf16 and g.capability == "9.0" for g in gpus)
    assert [c.name for c in checks] == ["gpu"]
    (c,) = checks
    assert c.status == "ok"
    assert c.detail == "8× NVIDIA H100 80GB HBM3, 80 GiB, sm 9.0, bf16"
    # 79.6 GiB / 16 bytes per param = 5.3e9 params full fine-tune; / 2 bytes = 43e9 LoRA.
    assert "≈5.3B params full fine-tune, ≈43B LoRA" in c.advice


def test_pre_ampere_gpu_warns_fp16_and_mixed_kinds_get_one_line_each():
    checks, gpus = d.check_gpus(fake_torch(gpus=[H100, V100, V100]))
    assert [c.name for c in checks] == ["gpu 0", "gpu 1-2"]
    assert [c.status for c in checks] == ["ok", "warn"]
    assert checks[1].detail == "2× Tesla V100-SXM2-32GB, 32 GiB, sm 7.0, no bf16"
    assert "fp16 only" in checks[1].advice
    assert [g.bf16 for g in gpus] == [True, False, False]


def test_cpu_torch_on_a_gpu_box_is_a_fail_that_says_install_cuda_torch():
    checks, gpus = d.check_gpus(fake_torch(cuda=None), nvidia_smi=lambda: ["NVIDIA A100-SXM4-80GB"] * 4)
    assert gpus == []
    assert checks[0].status == "fail"
    assert checks[0].detail == "4× NVIDIA A100-SXM4-80GB visible to the driver, but torch is a CPU build"
    assert "CUDA build of torch" in checks[0].advice


def test_cpu_torch_without_gpus_is_missing_not_fail():
    checks, _ = d.check_gpus(fake_torch(cuda=None), nvidia_smi=lambda: [])
    assert (checks[0].status, checks[0].detail) == ("missing", "none")


def test_cuda_torch_seeing_no_gpu_warns_with_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    checks, _ = d.check_gpus(fake_torch(gpus=[]))
    assert checks[0].status == "warn"
    assert "CUDA 12.8 build, CUDA_VISIBLE_DEVICES=)" in checks[0].detail


def test_broken_driver_is_a_fail_not_a_crash():
    checks, gpus = d.check_gpus(fake_torch(fail="CUDA driver version is insufficient for CUDA runtime version"))
    assert (checks[0].status, gpus) == ("fail", [])
    assert checks[0].detail == "RuntimeError: CUDA driver version is insufficient for CUDA runtime version"


def test_torch_build_names():
    assert d.torch_build(fake_torch(cuda="12.8")) == "CUDA 12.8"
    assert d.torch_build(fake_torch(cuda=None, hip="6.2.41133")) == "ROCm 6.2.41133"
    assert d.torch_build(fake_torch(cuda=None)) == "CPU"


# ---------------------------------------------------------------------------------------------------------
# Packages: a broken one is a `fail` carrying its error, never a crash of the doctor.


def make_dist(site: Path, name: str, version: str, body: str | None) -> None:
    """A distribution on sys.path: dist-info metadata, and a module whose import runs `body` (None: no module)."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if body is not None:
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(body)


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    yield root
    for mod in [m for m in sys.modules if m.startswith(("medvlbroken", "medvlfine", "medvlghost"))]:
        del sys.modules[mod]


def test_broken_package_fails_with_its_error(site):
    make_dist(site, "medvlbroken", "1.2", "raise RuntimeError('operator torchvision::nms does not exist')\n")
    check, mod = d.check_package("broken", "medvlbroken", "medvlbroken", enables="x", pins={})
    assert mod is None
    assert check.status == "fail"
    assert check.detail == "1.2: RuntimeError: operator torchvision::nms does not exist"
    assert check.advice == "reinstall: pip install medvlbroken"


def test_required_broken_package_makes_the_report_not_ok(site):
    make_dist(site, "medvlbroken", "1.2", "raise ImportError('libcudnn.so.9: cannot open shared object file')\n")
    check, _ = d.check_package("torch", "medvlbroken", "medvlbroken", enables="x", pins={}, required=True)
    report = d.Report((d.check_python(), check), (), d.verdict([check], []))
    assert not report.ok
    assert report.verdict == "not ready: fix torch first (the lines marked fail)"


def test_metadata_without_module_is_a_fail(site):
    make_dist(site, "medvlghost", "0.3", None)
    check, _ = d.check_package("ghost", "medvlghost", "medvlghost", enables="x", pins={})
    assert (check.status, check.detail) == ("fail", "0.3: installed, but module 'medvlghost' is not importable")


def test_version_against_pin_ignores_local_build_tag(site):
    make_dist(site, "medvlfine", "2.13.0+cu128", "")
    ok, _ = d.check_package("fine", "medvlfine", "medvlfine", enables="GPU", pins={"medvlfine": "2.13.0"})
    assert (ok.status, ok.detail) == ("ok", "2.13.0+cu128")
    warn, _ = d.check_package("fine", "medvlfine", "medvlfine", enables="GPU", pins={"medvlfine": "2.14.0"})
    assert warn.status == "warn" and warn.advice.startswith("GPU; outside medvl's verified set (2.14.0)")
    assert "pip install medvlfine==2.14.0" in warn.advice


def test_version_outside_the_declared_range_is_flagged(site):
    make_dist(site, "medvlold", "2.2.0+cu118", "")
    ranges = {"medvlold": ">=2.6,<3"}
    req, _ = d.check_package("old", "medvlold", "medvlold", enables="x", pins={"medvlold": "2.13.0"},
                             required=True, ranges=ranges)
    assert req.status == "fail" and "outside the range medvl supports (>=2.6,<3)" in req.advice
    opt, _ = d.check_package("old", "medvlold", "medvlold", enables="x", pins={}, ranges=ranges)
    assert opt.status == "warn"
    inside, _ = d.check_package("old", "medvlold", "medvlold", enables="x", pins={}, ranges={"medvlold": ">=2"})
    assert inside.status == "ok"


def test_missing_package_says_how_to_install_it_at_the_pin():
    check, _ = d.check_package("nope", "medvl-nope", "medvl_nope", enables="QLoRA", pins={"medvl-nope": "0.45.0"})
    assert (check.status, check.advice) == ("missing", "QLoRA: pip install medvl-nope==0.45.0")
    req, _ = d.check_package("nope", "medvl-nope", "medvl_nope", enables="QLoRA", pins={}, required=True)
    assert req.status == "fail"


def test_broken_torchvision_is_a_warning_to_uninstall_it(site):
    if "torchvision" in sys.modules:
        pytest.skip("a real torchvision is already imported")
    make_dist(site, "torchvision", "0.28.0", "raise RuntimeError('operator torchvision::nms does not exist')\n")
    c = d.check_torchvision()
    assert (c.status, c.detail) == ("warn", "0.28.0: RuntimeError: operator torchvision::nms does not exist")
    assert c.advice.endswith("pip uninstall torchvision")


@pytest.mark.skipif(has_module("flash_attn"), reason="flash-attn is installed here")
def test_missing_flash_attn_advice_depends_on_the_gpus():
    h100 = [d.Gpu(0, "NVIDIA H100 80GB HBM3", 79.6, "9.0", True)]
    assert "pip install flash-attn --no-build-isolation" in d.check_flash_attn(h100, {}).advice
    assert d.check_flash_attn([], {}).advice == "CUDA sm 8.0+ only; SDPA attention is used instead"


def test_pins_come_from_the_shipped_constraints_and_ranges_from_the_metadata():
    pins = d.tested_pins()
    assert pins["torch"] == "2.13.0" and pins["transformers"] == "5.23.0" and "pydantic" in pins
    ranges = d.declared_ranges()
    assert ranges["torch"] == "<3,>=2.6" or ranges["torch"] == ">=2.6,<3"
    assert "pytest" not in ranges  # the dev extra carries a marker


def test_every_declared_dependency_is_pinned_in_the_verified_set_and_inside_its_range():
    from packaging.specifiers import SpecifierSet

    pins, ranges = d.tested_pins(), d.declared_ranges()
    for name, spec in ranges.items():
        assert name in pins, f"{name} has no verified version in medvl/constraints.txt"
        assert pins[name] in SpecifierSet(spec), f"{name}=={pins[name]} is outside the declared {spec}"


def test_the_lowest_set_is_each_declared_lower_bound():
    """medvl/constraints-lowest.txt (`make test-lowest`) pins every dependency at the bound pyproject.toml declares,
    so a raised bound cannot go untested and an untested bound cannot be declared (torch: only 2.13.0 here)."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    root = Path(__file__).resolve().parents[1]
    deps = [Requirement(r) for r in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]]
    pins = dict(line.split("==") for line in (root / "medvl" / "constraints-lowest.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert set(pins) == {r.name for r in deps}
    for r in deps:
        lower = [Version(s.version) for s in r.specifier if s.operator == ">="]
        assert len(lower) == 1, r
        if r.name != "torch":
            assert Version(pins[r.name]) == lower[0], f"{r.name}: lowest set {pins[r.name]}, declared >={lower[0]}"


def test_check_rejects_unknown_status():
    with pytest.raises(ValueError):
        d.Check("x", "broken", "", "")


# ---------------------------------------------------------------------------------------------------------
# DeepSpeed's build toolchain (nothing is compiled: only PATH, CUDA_HOME and `nvcc --version`).


def executable(path: Path, text: str = "#!/bin/sh\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def fake_nvcc(home: Path, release: str, header: bool = True) -> None:
    executable(home / "bin" / "nvcc", f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.88'\n")
    if header:
        (home / "include").mkdir(parents=True, exist_ok=True)
        (home / "include" / "cuda_runtime.h").write_text("")


def test_toolchain_found_on_a_cpu_box(tmp_path):
    executable(tmp_path / "bin" / "g++")
    executable(tmp_path / "bin" / "ninja")
    found, problems = d.build_toolchain(None, env={"PATH": str(tmp_path / "bin")})
    assert (found, problems) == (["g++", "ninja"], [])


def test_ninja_in_an_unactivated_venv_is_reported(tmp_path, monkeypatch):
    executable(tmp_path / "bin" / "c++")
    executable(tmp_path / "venv" / "bin" / "ninja")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    found, problems = d.build_toolchain(None, env={"PATH": str(tmp_path / "bin")})
    assert found == ["c++"]
    assert problems == [f"ninja is in {tmp_path / 'venv' / 'bin'} but not on PATH: activate the venv"]


def test_no_compiler_no_ninja(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    found, problems = d.build_toolchain(None, env={"PATH": str(tmp_path)})
    assert found == []
    assert problems == ["no C++ compiler (apt install g++, or set CXX)", "no ninja: pip install ninja"]


def test_cuda_toolkit_matching_torch(tmp_path):
    executable(tmp_path / "bin" / "g++")
    executable(tmp_path / "bin" / "ninja")
    fake_nvcc(tmp_path / "cuda", "12.4")
    env = {"PATH": str(tmp_path / "bin"), "CUDA_HOME": str(tmp_path / "cuda")}
    found, problems = d.build_toolchain("12.8", env=env)
    assert (found, problems) == (["g++", "ninja", "nvcc 12.4"], [])


def test_cuda_major_mismatch_is_a_problem(tmp_path):
    fake_nvcc(tmp_path / "cuda", "13.0")
    _, problems = d.build_toolchain("12.8", env={"PATH": "", "CUDA_HOME": str(tmp_path / "cuda")})
    assert "nvcc 13.0 vs torch's CUDA 12.8: DeepSpeed refuses to build ops across CUDA major versions" in problems[-1]


def test_nvcc_wrapper_on_path_points_cuda_home_at_the_wrong_place(tmp_path):
    # A /usr/local/bin/nvcc shell wrapper makes torch guess CUDA_HOME=/usr/local, which has no CUDA headers.
    wrapper = executable(tmp_path / "usr" / "local" / "bin" / "nvcc")
    _, problems = d.build_toolchain("12.8", env={"PATH": str(wrapper.parent)})
    assert problems[-1].startswith(f"CUDA_HOME resolves to {tmp_path / 'usr' / 'local'} (nvcc on PATH at {wrapper})")
    assert "set CUDA_HOME" in problems[-1]


def test_cuda_home_order():
    assert d.cuda_home({"CUDA_HOME": "/opt/cuda-12.8", "CUDA_PATH": "/x"}) == (Path("/opt/cuda-12.8"), "CUDA_HOME")
    assert d.cuda_home({"CUDA_PATH": "/x", "PATH": ""})[1] == "CUDA_PATH"


# ---------------------------------------------------------------------------------------------------------
# Disk and Hugging Face cache.

Usage = namedtuple("Usage", "total used free")


@pytest.mark.parametrize("free_gib, status", [(500, "ok"), (20, "warn"), (0.5, "fail")])
def test_disk_thresholds(tmp_path, monkeypatch, free_gib, status):
    monkeypatch.setattr(d.shutil, "disk_usage", lambda p: Usage(1000 * GiB, 0, int(free_gib * GiB)))
    c = d.check_disk(tmp_path)
    assert c.status == status
    assert c.detail == f"{free_gib:.1f} of 1000 GiB free at {tmp_path}"
    if status == "ok":  # 500 GiB / 15.4 GiB per bf16 copy of an 8.29B-param model
        assert c.advice.startswith("room for 32 bf16 copies of a 7B VLM (15.4 GiB each)")


def test_disk_of_a_directory_not_made_yet_is_measured_on_its_parent(tmp_path):
    c = d.check_disk(tmp_path / "a" / "b")
    assert c.detail.endswith(f"at {tmp_path / 'a' / 'b'} (does not exist: it would be created inside {tmp_path}, "
                             "the nearest existing folder)")
    assert f"{shutil.disk_usage(tmp_path).total / GiB:.0f} GiB free" in c.detail


def test_disk_out_dir_under_a_file_fails(tmp_path):
    (tmp_path / "f").write_text("x")
    c = d.check_disk(tmp_path / "f" / "run")
    assert c.status == "fail" and f"{tmp_path / 'f'} is a file" in c.detail


def test_hf_cache_dir_follows_huggingface_hub_order(tmp_path):
    home = os.path.expanduser("~")
    assert d.hf_cache_dir({}) == Path(home) / ".cache" / "huggingface" / "hub"
    assert d.hf_cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/huggingface/hub")
    assert d.hf_cache_dir({"HF_HOME": "/big/hf", "XDG_CACHE_HOME": "/x"}) == Path("/big/hf/hub")
    assert d.hf_cache_dir({"HUGGINGFACE_HUB_CACHE": "/legacy", "HF_HOME": "/big/hf"}) == Path("/legacy")
    assert d.hf_cache_dir({"HF_HUB_CACHE": "/new", "HUGGINGFACE_HUB_CACHE": "/legacy"}) == Path("/new")


def test_hf_cache_counts_models_and_reports_offline(tmp_path):
    for repo in ("models--Qwen--Qwen2.5-VL-7B-Instruct", "models--llava-hf--llava-1.5-7b-hf", "datasets--x--y"):
        (tmp_path / "hub" / repo).mkdir(parents=True)
    c = d.check_hf_cache({"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert c.status == "ok"
    assert c.detail.startswith(f"{tmp_path / 'hub'} (2 models, ")
    assert c.advice.startswith("HF_HUB_OFFLINE=1")
    online = d.check_hf_cache({"HF_HOME": str(tmp_path / "new"), "HF_HUB_OFFLINE": "0"})
    assert "(not created yet" in online.detail and online.advice.startswith("online")


# ---------------------------------------------------------------------------------------------------------
# The overall sentence.


def ok(name: str, status: str = "ok") -> d.Check:
    return d.Check(name, status, "", "")


BASE = [ok("python"), ok("torch"), ok("transformers"), ok("accelerate"), ok("peft"), ok("easy-vqa")]


def test_verdict_on_a_gpu_box():
    gpus = [d.Gpu(i, "NVIDIA H100 80GB HBM3", 79.6, "9.0", True) for i in range(8)]
    text = d.verdict(BASE + [ok("deepspeed"), ok("bitsandbytes", "missing")], gpus)
    assert text == ("ready for GPU training on 8× NVIDIA H100 80GB HBM3 (bf16); DeepSpeed ZeRO ready; "
                    "no QLoRA (needs bitsandbytes)")
    v100 = [d.Gpu(0, "Tesla V100-SXM2-32GB", 31.7, "7.0", False)]
    assert "(fp16 only, no bf16)" in d.verdict(BASE + [ok("deepspeed", "warn")], v100)
    assert "DeepSpeed ops cannot build" in d.verdict(BASE + [ok("deepspeed", "warn")], v100)


def test_verdict_on_a_cpu_box():
    assert d.verdict(BASE + [ok("gpu", "missing")], []) == (
        "ready for CPU tests and the tiny demo; GPU training needs CUDA torch and an NVIDIA GPU")
    no_demo = [c for c in BASE if c.name != "easy-vqa"] + [ok("gpu", "fail")]
    assert d.verdict(no_demo, []) == ("ready for CPU tests (the tiny demo needs easy-vqa: pip install "
                                      "'medvl[demo]'); GPU training needs the CUDA build of torch (the driver "
                                      "sees GPUs)")


# ---------------------------------------------------------------------------------------------------------
# The command: thin, tested by patching the one library call.


def fake_report(torch_status: str) -> d.Report:
    checks = (d.Check("python", "ok", "3.11.7", "supported", True),
              d.Check("torch", torch_status, "2.13.0+cpu, CPU build", "tests", True),
              d.Check("flash-attn", "missing", "not installed", "CUDA only"))
    return d.Report(checks, (), d.verdict(list(checks), []))


@pytest.mark.parametrize("torch_status, code", [("ok", 0), ("fail", 1)])
def test_command_json_and_exit_status(monkeypatch, torch_status, code):
    from typer.testing import CliRunner

    from medvl.commands.main import app

    seen = {}

    def fake_run_checks(out_dir, progress=None):
        seen["out_dir"] = out_dir
        return fake_report(torch_status)

    monkeypatch.setattr(d, "run_checks", fake_run_checks)
    result = CliRunner().invoke(app, ["doctor", "--json", "--out-dir", "/scratch/runs"])
    assert result.exit_code == code
    assert seen["out_dir"] == Path("/scratch/runs")
    data = json.loads(result.stdout)
    assert data["ok"] is (code == 0)
    assert [c["status"] for c in data["checks"]] == ["ok", torch_status, "missing"]


def test_command_table(monkeypatch):
    from typer.testing import CliRunner

    from medvl.commands.main import app

    monkeypatch.setattr(d, "run_checks", lambda out_dir, progress=None: fake_report("ok"))
    result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert any(line.split()[:4] == ["flash-attn", "│", "missing", "│"] for line in lines)
    assert "overall: ready for CPU tests" in " ".join(result.stdout.split())
