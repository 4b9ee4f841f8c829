"""Every family: build, save, reload offline, processor call with an image, forward+loss, backward, generate."""

import json

import pytest
import torch
from PIL import Image

from medvl.errors import MedvlError
from medvl.families import get_family
from medvl.models import load_model, load_processor
from medvl.tiny import build_tiny

from .conftest import FAMILIES


def _inputs(family, processor):
    if not get_family(family).is_vision:
        msgs = [{"role": "user", "content": "is there a pleural effusion?"}, {"role": "assistant", "content": "no"}]
        return processor(processor.apply_chat_template(msgs, tokenize=False), return_tensors="pt")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the blue shape?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "circle"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False)
    return processor(text=[text], images=[Image.new("RGB", (64, 64), "blue")], return_tensors="pt")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_round_trip(family, tiny_dir):
    path = tiny_dir(family)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] in get_family(family).model_types
    for name in ("tokenizer.json", "chat_template.jinja", "model.safetensors", "generation_config.json"):
        assert (path / name).is_file(), name
    model, processor = load_model(path), load_processor(path)
    enc = _inputs(family, processor)
    if get_family(family).is_vision:
        image_token = processor.tokenizer.convert_tokens_to_ids(get_family(family).image_token)
        assert int((enc["input_ids"] == image_token).sum()) >= 4  # the placeholder was expanded
    out = model(**enc, labels=enc["input_ids"])
    # random init over a ~600-token vocabulary: loss near ln(600) = 6.4
    assert 5.0 < float(out.loss) < 8.0
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    gen = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 4 or int(gen[0, -1]) == model.generation_config.eos_token_id
    again = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, again)


def test_saved_processor_names_stock_class(tiny_dir):
    # The image-only subclass must save under the stock class name, so the directory loads with
    # AutoProcessor wherever torchvision exists.
    cfg = json.loads((tiny_dir("qwen2.5-vl") / "processor_config.json").read_text())
    assert cfg["processor_class"] == "Qwen2_5_VLProcessor"
    internvl = json.loads((tiny_dir("internvl") / "processor_config.json").read_text())
    assert internvl["image_seq_length"] == 4 and load_processor(tiny_dir("internvl")).image_seq_length == 4


def test_same_seed_same_weights():
    a, _ = build_tiny("qwen2.5-vl", seed=3)
    b, _ = build_tiny("qwen2.5-vl", seed=3)
    c, _ = build_tiny("qwen2.5-vl", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_refuses_non_empty_dir_and_leaves_nothing_half_written(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MedvlError, match="not empty"):
        build_tiny("causal-lm", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    build_tiny("causal-lm", out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no .partial leftovers


def test_stock_processor_path_where_torchvision_imports(tiny_dir, monkeypatch):
    """With torchvision importable, the stock AutoProcessor is used (it then builds the video processor too);
    without it, the image-only subclass. Checked by routing, since no CPU torchvision exists here."""
    import transformers

    import medvl.models as models

    seen = {}
    monkeypatch.setattr(models, "torchvision_usable", lambda: True)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        classmethod(lambda cls, path, **kw: seen.setdefault("auto", str(path))))
    assert load_processor(tiny_dir("qwen2.5-vl")) == str(tiny_dir("qwen2.5-vl"))
    monkeypatch.setattr(models, "torchvision_usable", lambda: False)
    proc = load_processor(tiny_dir("qwen2.5-vl"))
    assert type(proc).__name__ == "Qwen2_5_VLProcessor" and not hasattr(proc, "video_processor")
    assert type(load_processor(tiny_dir("llava"))).__module__.startswith("transformers")  # no video part: stock


def test_the_command_prints_its_line_and_no_library_progress_bar(tmp_path):
    """transformers drew "Writing model shards: 0%|..." above medvl's own line: noise in a first command."""
    import subprocess
    import sys
    from pathlib import Path

    medvl = Path(sys.executable).with_name("medvl")
    proc = subprocess.run([str(medvl), "tiny", "--family", "causal-lm", "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "built tiny causal-lm model" in proc.stdout
    assert "Writing model shards" not in proc.stderr + proc.stdout and "it/s" not in proc.stderr
