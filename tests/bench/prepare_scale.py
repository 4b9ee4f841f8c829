"""prepare-data at scale: samples/s and peak RSS for N = 10k and 100k synthetic samples (RSS must not grow).

    python -m tests.bench.prepare_scale [N ...]

Each N runs in a fresh subprocess (so its peak RSS is its own), on a LLaVA-style JSON array of N samples over
200 small PNGs, with exact token lengths measured by a tiny Qwen2.5-VL's processor, 2 workers.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_data(root: Path, n: int) -> Path:
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(200):
        Image.new("RGB", (64 + i % 7 * 16, 64 + i % 5 * 16), (i % 255, 80, 160)).save(images / f"{i}.png")
    path = root / f"data-{n}.json"
    with open(path, "w") as f:
        f.write("[")
        for i in range(n):
            rec = {"id": i, "image": f"images/{i % 200}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat is the modality of this image?"},
                {"from": "gpt", "value": f"An axial CT slice, case {i}."}]}
            f.write(("," if i else "") + json.dumps(rec))
        f.write("]")
    return path


def child(path: str, out: str, model: str) -> None:
    from medvl.data.prepare import prepare

    t = time.perf_counter()
    res = prepare([path], out, model=model, max_seq_len=512, workers=2, overwrite=True)
    wall = time.perf_counter() - t
    main_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    worker_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest worker
    print(json.dumps({"accepted": res.manifest["accepted"], "wall": wall, "main": main_rss, "worker": worker_rss}))


def main(sizes: list[int]) -> None:
    from medvl.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny("qwen2.5-vl", root / "tiny")
        print(f"{'N':>8} {'samples/s':>10} {'peak RSS main':>14} {'peak RSS worker':>16}")
        for n in sizes:
            path = make_data(root, n)
            code = f"from tests.bench.prepare_scale import child; child({str(path)!r}, {str(root / 'out')!r}, {str(root / 'tiny')!r})"
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  env=dict(os.environ, OMP_NUM_THREADS="1"))
            if proc.returncode:
                print(proc.stderr[-2000:])
                raise SystemExit(1)
            stats = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{n:>8} {stats['accepted'] / stats['wall']:>10.0f} {stats['main']:>11.0f} MB "
                  f"{stats['worker']:>13.0f} MB", flush=True)


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [10_000, 100_000])
