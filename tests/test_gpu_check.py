"""`make gpu-check` (tests/bench/gpu_check.py): a clean exit without a GPU, and its cases run on CPU (--smoke)."""

import subprocess
import sys

import pytest
import torch


def _run(*args):
    return subprocess.run([sys.executable, "-m", "tests.bench.gpu_check", *args], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run for real")
def test_without_a_gpu_it_says_so_and_exits_cleanly():
    out = _run()
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("SKIP gpu-check: no CUDA GPU here")


@pytest.mark.slow
def test_smoke_runs_every_cpu_capable_case():
    out = _run("--smoke", "--steps", "2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = {line.split()[1]: line.split()[0] for line in out.stdout.splitlines()
             if line[:4] in ("PASS", "SKIP", "FAIL")}
    assert {k: v for k, v in lines.items() if v == "PASS"}.keys() == {"full", "lora", "packed-sdpa", "eval-generate"}
    assert lines["qlora"] == lines["zero2"] == lines["padded-fa2"] == "SKIP"
    assert "0 failed" in out.stdout
