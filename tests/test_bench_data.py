"""The training benchmarks' data (tests/bench/train_throughput.prepare_bench_data, also used by vs_trainer and
vs_peers) prepares every sample: when the image-root rule arrived it silently quarantined all of them and the
benchmarks had nothing to train on."""

import json
import shutil

import pytest


def test_bench_data_prepares_every_sample_with_its_image(tmp_path, tiny_dir):
    from tests.bench.train_throughput import prepare_bench_data

    shutil.copytree(tiny_dir("qwen2.5-vl"), tmp_path / "tiny")
    out = prepare_bench_data(tmp_path, True, 12, tmp_path / "data")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["accepted"] == 12 and manifest["rejected_total"] == 0
    rows = [json.loads(line) for line in open(out / "data-00000.jsonl")]
    assert all(len(r["images"]) == 1 for r in rows)


@pytest.mark.slow
def test_the_training_benchmarks_run_end_to_end(capsys):
    """Both training benchmarks once, on 24 samples and 2 steps: they had rotted unseen (every sample
    quarantined; a second round refused by the run-folder guard). Figures are not judged at this size."""
    from tests.bench import train_throughput, vs_trainer

    res = train_throughput.run(1, 5, n=24, judge=False, compute_rounds=1)
    assert set(res) == {"short", "varied"} and all(len(r) == 3 for r in res.values())
    assert all(x["sup"] > 0 for r in res.values() for runs in r.values() for x in runs)
    med = vs_trainer.run(2, 2, n=24, judge=False)  # two rounds: each reuses the first round's folders
    assert set(med) == set(vs_trainer.RUNS) and all(m["loop"] > 0 for m in med.values())
    assert "loop ratio" in capsys.readouterr().out
