"""tests/bench/vs_peers.py without any peer installed: it skips cleanly (`make bench` runs every bench), and what
it hands the peers is the benchmark's own samples with medvl's hyper-parameters."""

import json
import shutil


def test_vs_peers_skips_cleanly_without_peers(monkeypatch, capsys):
    from tests.bench import vs_peers

    monkeypatch.delenv("MEDVL_BENCH_SWIFT", raising=False)
    monkeypatch.delenv("MEDVL_BENCH_LLAMAFACTORY", raising=False)
    assert vs_peers.main([]) == 0
    assert "skipped, no peer given" in capsys.readouterr().out


def test_vs_peers_refuses_a_peer_path_outside_a_venv(tmp_path, capsys):
    from tests.bench import vs_peers

    assert vs_peers.main(["--swift", str(tmp_path / "swift"), "1", "20"]) == 2
    assert "no python beside swift" in capsys.readouterr().err


def test_peers_get_the_same_samples_model_and_settings(tmp_path, tiny_dir):
    from tests.bench.train_throughput import prepare_bench_data
    from tests.bench.vs_peers import lf_args, swift_args, write_peer_inputs

    shutil.copytree(tiny_dir("qwen2.5-vl"), tmp_path / "tiny")
    prepare_bench_data(tmp_path, False, 12, tmp_path / "data")
    info = write_peer_inputs(tmp_path)
    prepared = [json.loads(line) for line in open(tmp_path / "data" / "data-00000.jsonl")]
    swift = [json.loads(line) for line in open(tmp_path / "swift.jsonl")]
    lf = json.loads((tmp_path / "lf-data" / "bench.json").read_text())
    assert info["samples"] == 12 and swift == lf
    assert [s["images"] for s in swift] == [p["images"] for p in prepared]
    assert [s["messages"][0]["content"] for s in swift] == [p["messages"][0]["content"] for p in prepared]
    assert all(s["messages"][0]["content"].startswith("<image>") for s in swift)
    assert json.loads((tmp_path / "lf-data" / "dataset_info.json").read_text())["bench"]["file_name"] == "bench.json"

    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    template = (tmp_path / "swift_tiny_template.py").read_text()
    assert f"image_token_id = {config['image_token_id']}" in template
    pre = json.loads((tmp_path / "tiny-peer" / "preprocessor_config.json").read_text())
    assert (pre["patch_size"], pre["merge_size"]) == (14, 2)
    assert (tmp_path / "tiny-peer" / "model.safetensors").resolve() == (tmp_path / "tiny" / "model.safetensors")

    args = swift_args(tmp_path, "lora", 50, info["lora_regex"])[1:]
    flags = dict(zip(args[::2], args[1::2]))
    assert (flags["--max_steps"], flags["--per_device_train_batch_size"]) == ("50", "8")
    assert flags["--learning_rate"] == "0.001" and flags["--gradient_accumulation_steps"] == "1"
    assert (flags["--lora_rank"], flags["--lora_alpha"], flags["--lora_dropout"]) == ("16", "32", "0.05")
    assert flags["--target_regex"] == info["lora_regex"] and flags["--max_length"] == "256"
    assert flags["--adam_beta2"] == "0.999" and flags["--gradient_checkpointing"] == "false"
    full = swift_args(tmp_path, "full", 50, info["lora_regex"])
    assert full[full.index("--freeze_vit") + 1] == full[full.index("--freeze_aligner") + 1] == "false"

    cfg = json.loads(open(lf_args(tmp_path, "full", 50)[-1]).read())  # JSON written as the YAML file
    assert (cfg["max_steps"], cfg["per_device_train_batch_size"], cfg["learning_rate"]) == (50, 8, 1e-3)
    assert cfg["cutoff_len"] == 256 and cfg["disable_gradient_checkpointing"] is True
    assert cfg["freeze_vision_tower"] is False and cfg["freeze_multi_modal_projector"] is False
    assert (cfg["image_min_pixels"], cfg["image_max_pixels"]) == (3136, 12544)
