"""prepare-data end to end: mixed formats with corrupt samples, quarantine, manifest, resume, strict, inspect."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from medvl.commands.main import app
from medvl.data.prepare import prepare
from medvl.errors import MedvlError


@pytest.fixture
def mixed(tmp_path):
    """A directory of raw files in three formats, with one bad sample of each kind among good ones."""
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (64, 48), (40 * i, 90, 200)).save(raw / "images" / f"{i}.png")
    (raw / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    llava = [{"id": i, "image": f"images/{i}.png",
              "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                                {"from": "gpt", "value": f"A coloured square number {i}."}]} for i in range(6)]
    llava += [{"id": "missing", "image": "images/nope.png", "conversations": [
                  {"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]},
              {"id": "broken", "image": "images/broken.png", "conversations": [
                  {"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]},
              {"id": "escape", "image": "../../etc/passwd", "conversations": [
                  {"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]},
              {"id": "twotags", "image": "images/0.png", "conversations": [
                  {"from": "human", "value": "<image><image>\nx"}, {"from": "gpt", "value": "y"}]},
              {"id": "noanswer", "image": "images/1.png", "conversations": [{"from": "human", "value": "x"}]}]
    (raw / "llava.json").write_text(json.dumps(llava))
    disc = [{"_id": f"d{i}", "conversation": [{"role": "user", "content": f"I have a cough, day {i}."},
                                              {"role": "assistant", "content": "How long has it lasted?"}]}
            for i in range(4)]
    (raw / "disc.jsonl").write_text("\n".join(json.dumps(d) for d in disc) + "\n{not json\n")
    (raw / "alpaca.json").write_text(json.dumps([{"instruction": "Classify: chest pain", "input": "",
                                                  "output": "cardiology"}]))
    return raw


def test_mixed_corrupt_data_quarantined_with_reasons(mixed, tmp_path):
    out = tmp_path / "out"
    inputs = [mixed / "llava.json", mixed / "disc.jsonl", mixed / "alpaca.json"]
    res = prepare(inputs, out, shard_size=4)
    m = res.manifest
    assert m["inputs"] == 17 and m["accepted"] == 11  # 6 llava + 4 disc + 1 alpaca
    assert m["rejected"] == {"bad-json": 1, "extra-placeholders": 1, "image-escapes-root": 1, "image-missing": 1,
                             "image-undecodable": 1, "no-trainable-turn": 1}
    quarantine = [json.loads(line) for line in open(out / "quarantine.jsonl")]
    assert len(quarantine) == 6 and all(q["location"] and q["message"] for q in quarantine)
    assert any(q["location"].endswith("llava.json[6]") and q["code"] == "image-missing" for q in quarantine)
    assert any(q["location"].endswith("disc.jsonl:5") for q in quarantine)
    assert m["sources"]["llava"] == {"accepted": 6, "rejected": 5}
    records = [json.loads(line) for p in sorted(out.glob("data-*.jsonl")) for line in open(p)]
    assert len(records) == 11 and len({r["id"] for r in records}) == 11
    assert len(m["content_hash"]) == 64


def test_exact_lengths_and_too_long(mixed, tmp_path, tiny_dir):
    model = tiny_dir("qwen2.5-vl")
    prepare([mixed / "llava.json"], tmp_path / "out", model=str(model), max_seq_len=80)
    recs = [json.loads(line) for p in sorted((tmp_path / "out").glob("data-*.jsonl")) for line in open(p)]
    assert recs and all(40 < r["meta"]["n_tokens"] <= 80 for r in recs)
    assert all(r["meta"]["visual_tokens"] == [4] for r in recs)  # 64x48 -> 56x56 at the tiny model's floor
    # the real encoder agrees with the manifest's lengths
    from medvl.data.collate import encode_record
    from medvl.data.images import load_image
    from medvl.families import get_family
    from medvl.models import load_processor

    proc, fam = load_processor(model), get_family("qwen2.5-vl")
    r = recs[0]
    enc = encode_record(r, [load_image(f"{r['image_root']}/{p}") for p in r["images"]], proc, fam)
    assert len(enc) == r["meta"]["n_tokens"]
    tight = prepare([mixed / "llava.json"], tmp_path / "tight", model=str(model), max_seq_len=20)
    assert tight.manifest["rejected"].get("too-long") == 6


def test_images_a_qwen_processor_refuses_are_quarantined_not_a_crash(tmp_path, tiny_dir):
    # Qwen-VL's resize raises on aspect ratios over 200:1; with a Qwen-VL model such an image is a rejection.
    (tmp_path / "images").mkdir()
    Image.new("RGB", (402, 2)).save(tmp_path / "images" / "strip.png")
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "ok.png")
    rows = [{"image": f"images/{name}.png", "conversations": [{"from": "human", "value": "<image>What is it?"},
                                                              {"from": "gpt", "value": "A scan."}]}
            for name in ("strip", "ok")]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    res = prepare([tmp_path / "d.json"], tmp_path / "out", model=str(tiny_dir("qwen2.5-vl")))
    assert res.manifest["accepted"] == 1 and res.manifest["rejected"] == {"image-aspect-ratio": 1}


def test_resume_skips_finished_shards_and_loses_nothing(mixed, tmp_path, monkeypatch):
    import medvl.data.prepare as mod

    out = tmp_path / "out"
    real = mod.process_shard
    calls = []

    def dying(k, items, out_dir, settings=None):
        if k == 2:
            raise KeyboardInterrupt  # Ctrl-C while the third shard is being written
        calls.append(k)
        return real(k, items, out_dir, settings)

    monkeypatch.setattr(mod, "process_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare([mixed / "llava.json", mixed / "disc.jsonl"], out, shard_size=3)
    assert calls == [0, 1] and not (out / "manifest.json").exists()
    monkeypatch.setattr(mod, "process_shard", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    res = prepare([mixed / "llava.json", mixed / "disc.jsonl"], out, shard_size=3)
    assert calls == [0, 1, 2, 3, 4, 5] and res.skipped_shards == 2
    fresh = prepare([mixed / "llava.json", mixed / "disc.jsonl"], tmp_path / "fresh", shard_size=3)
    assert res.manifest["content_hash"] == fresh.manifest["content_hash"]
    assert res.manifest["accepted"] == fresh.manifest["accepted"] == 10


def test_other_settings_do_not_mix_into_an_existing_output(mixed, tmp_path):
    prepare([mixed / "disc.jsonl"], tmp_path / "out")
    with pytest.raises(MedvlError, match="other inputs or settings"):
        prepare([mixed / "disc.jsonl"], tmp_path / "out", max_images=2)


def test_strict_stops_at_first_bad_sample_with_location(mixed, tmp_path):
    with pytest.raises(MedvlError) as err:
        prepare([mixed / "llava.json"], tmp_path / "out", strict=True)
    assert "image-missing" in str(err.value) and "llava.json[6]" in err.value.where


def test_parallel_workers_give_the_same_output(mixed, tmp_path):
    one = prepare([mixed / "llava.json", mixed / "disc.jsonl"], tmp_path / "one", shard_size=3)
    two = prepare([mixed / "llava.json", mixed / "disc.jsonl"], tmp_path / "two", shard_size=3, workers=2)
    assert one.manifest["content_hash"] == two.manifest["content_hash"]


def test_cli_reports_without_traceback_and_inspect_shows_the_sample(mixed, tmp_path, tiny_dir):
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(app, ["prepare-data", str(mixed / "llava.json"), "--out", str(out), "--model",
                              str(tiny_dir("qwen2.5-vl"))])
    assert res.exit_code == 0, res.output
    assert "6 of 11 samples kept" in res.output and "image-undecodable" in res.output
    res = runner.invoke(app, ["inspect-data", str(out), "--index", "0", "--model", str(tiny_dir("qwen2.5-vl"))])
    assert res.exit_code == 0, res.output
    assert "A coloured square number 0.<|im_end|>" in res.output and "1 image(s): 4 visual tokens" in res.output
    res = runner.invoke(app, ["prepare-data", str(tmp_path / "nope.json"), "--out", str(out)])
    assert res.exit_code != 0 and "Traceback" not in res.output
