"""Answers per second from `medvl serve` at 1, 4 and 16 concurrent clients, against one request at a time.

    python -m tests.bench.serve_throughput [REQUESTS]      (default 96; tiny Qwen2.5-VL on CPU, 16 new tokens)

A live server in a subprocess, the official openai client in threads; half the questions carry an image as a
data URL. Every answer is checked against `Chatbot`'s greedy answer for the same question (batching must not
change an answer). Also runs the server with --max-batch 1 at 16 clients: concurrency without batching.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.test_serve import MEDVL, QUESTIONS, ask, expected_answers, free_port, get_json  # noqa: E402

MAX_NEW = 16


def start(model_dir: Path, *extra: str):
    port = free_port()
    proc = subprocess.Popen([MEDVL, "serve", str(model_dir), "--port", str(port), "--name", "tiny", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(240):
        try:
            get_json(f"http://127.0.0.1:{port}/health")
            break
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(proc.stderr.read())
            time.sleep(0.25)
    from openai import OpenAI

    return proc, OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)


def run(client, jobs, clients: int) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda p: ask(client, *p, max_tokens=MAX_NEW).choices[0].message.content, jobs))
    return len(jobs) / (time.perf_counter() - t0), answers


def main(n: int = 96) -> None:
    import easy_vqa

    from medvl.tiny import build_tiny

    pngs = list(easy_vqa.get_train_image_paths().values())[:4]
    tmp = Path(tempfile.mkdtemp(prefix="medvl-bench-serve-"))
    model = tmp / "model"
    build_tiny("qwen2.5-vl", model)
    prompts = [(q, pngs[i % 4] if i % 2 else None) for i, q in enumerate(QUESTIONS * 2)]
    import tests.test_serve as ts

    ts.MAX_NEW = MAX_NEW  # expected answers with the same budget
    want = expected_answers(model, prompts)
    jobs = [prompts[i % len(prompts)] for i in range(n)]
    rows = []
    for label, extra, levels in [("batched", (), (1, 4, 16)), ("--max-batch 1", ("--max-batch", "1"), (16,))]:
        proc, client = start(model, *extra)
        try:
            run(client, jobs[:8], 4)  # warm-up
            for c in levels:
                rate, answers = run(client, jobs, c)
                same = sum(a == want[p] for p, a in zip(jobs, answers))
                rows.append((label, c, rate, same))
        finally:
            proc.terminate()
            proc.wait(30)
    base = rows[0][2]
    print(f"{n} requests, {MAX_NEW} new tokens, tiny Qwen2.5-VL on CPU ({os.cpu_count()} cores)")
    print(f"{'server':<14} {'clients':>7} {'answers/s':>10} {'x one-at-a-time':>16} {'= Chatbot':>10}")
    for label, c, rate, same in rows:
        print(f"{label:<14} {c:>7} {rate:>10.1f} {rate / base:>16.2f} {same:>6}/{n}")
    at16 = next(rate for label, c, rate, _ in rows if label == "batched" and c == 16)
    ok = all(same == n for *_, same in rows) and at16 >= 3 * base
    print(f"target: 16 clients >= 3x one at a time, every answer = Chatbot's: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 96))
