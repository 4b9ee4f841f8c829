"""The one model resolver as chat uses it (medvl/resolve.py): a run without final/ stands for its newest
checkpoint, a hub id is read from the Hugging Face cache offline, and several images go in one turn."""

from __future__ import annotations

import json
import shutil

import pytest

from medvl.errors import MedvlError


def test_run_without_final_is_its_newest_checkpoint(tiny_dir, tmp_path):
    from medvl.config import load_recipe, recipe_to_yaml
    from medvl.resolve import resolve_model

    run = tmp_path / "run"
    recipe = load_recipe("tiny_cpu", [f"model.base={tiny_dir('qwen2.5-vl')}", f"output.dir={run}",
                                      "data.train=[/data/x]"])
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    for step in (2, 10, 4):
        ckpt = run / "checkpoints" / f"step-{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    (run / "checkpoints" / ".step-000012.partial").mkdir()  # an interrupted save is never chosen
    src = resolve_model(run)
    assert (src.kind, src.path.name, src.run_dir) == ("checkpoint", "step-000010", run)
    assert src.base_dir == tiny_dir("qwen2.5-vl") and src.name == "run/step-000010"
    shutil.copytree(tiny_dir("qwen2.5-vl"), run / "final")  # once it finished: final/
    assert resolve_model(run).path == run / "final"


def test_cached_hub_id_resolves_offline(tiny_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    from medvl.inference import Chatbot, GenerationOptions
    from medvl.resolve import resolve_model

    repo = tmp_path / "hub" / "models--medvl-test--tiny-vl"
    shutil.copytree(tiny_dir("qwen2.5-vl"), repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    src = resolve_model("medvl-test/tiny-vl")
    assert (src.kind, src.family.name, src.path) == ("full", "qwen2.5-vl", repo / "snapshots" / "0123abcd")
    assert Chatbot("medvl-test/tiny-vl", options=GenerationOptions(max_new_tokens=3)).chat("hi")
    with pytest.raises(MedvlError, match=r"neither a local directory \(looked for .*\) nor a model in the Hugging "
                                         "Face cache"):
        resolve_model("medvl-test/not-downloaded")


@pytest.mark.parametrize("family", ["qwen3-vl", "internvl"])
def test_several_images_in_one_turn(family, tiny_dir):
    import easy_vqa

    from medvl.inference import Chatbot, GenerationOptions

    paths = list(easy_vqa.get_train_image_paths().values())[:3]
    bot = Chatbot(tiny_dir(family), options=GenerationOptions(max_new_tokens=4))
    assert bot.chat("Compare these scans.", images=paths)
    inputs = bot._inputs()
    n_image_tokens = int((inputs["input_ids"] == bot.image_token_id).sum())
    one = Chatbot(tiny_dir(family), options=GenerationOptions(max_new_tokens=4))
    one.turns = []
    one.stream("x", images=paths[:1])  # the turn is queued; we only count its tokens
    assert n_image_tokens == 3 * int((one._inputs()["input_ids"] == one.image_token_id).sum())


def test_device_and_dtype_are_checked_before_loading(monkeypatch):
    import torch

    from medvl.resolve import resolve_device, resolve_dtype

    assert resolve_device("cpu") == torch.device("cpu") and resolve_dtype("bf16") == "bf16"
    for bad in ("gpu0", "cuda:x"):
        with pytest.raises(MedvlError, match="unknown device") as err:
            resolve_device(bad)
        assert err.value.where == "--device"
    with pytest.raises(MedvlError, match="unknown dtype 'float16'"):
        resolve_dtype("float16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MedvlError, match="no usable CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(MedvlError, match=r"there is no GPU 2 \(this machine has 2\)") as err:
        resolve_device("cuda:2")
    assert err.value.fix == "use cuda:0 to cuda:1"
