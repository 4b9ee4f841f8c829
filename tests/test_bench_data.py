"""The training benchmarks' data (tests/bench/train_throughput.prepare_bench_data, also used by vs_trainer and
vs_peers) prepares every sample: when the image-root rule arrived it silently quarantined all of them and the
benchmarks had nothing to train on."""

import json
import shutil


def test_bench_data_prepares_every_sample_with_its_image(tmp_path, tiny_dir):
    from tests.bench.train_throughput import prepare_bench_data

    shutil.copytree(tiny_dir("qwen2.5-vl"), tmp_path / "tiny")
    out = prepare_bench_data(tmp_path, True, 12, tmp_path / "data")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["accepted"] == 12 and manifest["rejected_total"] == 0
    rows = [json.loads(line) for line in open(out / "data-00000.jsonl")]
    assert all(len(r["images"]) == 1 for r in rows)
