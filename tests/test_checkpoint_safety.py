"""No checkpoint runs code: a crafted pickle (its __reduce__ would create a marker file) is refused by resume and by
export with a message that says why, and the marker never appears. Also: finite-only checkpoints, disk-full
saves and a save cut mid-write leave the previous checkpoint readable and the next run resumes."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch

from medvl.engine.train import train
from medvl.errors import MedvlError

from .test_train import recipe


class Payload:
    """Unpickling this calls os.system: the attack a shared checkpoint could carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path, marker):
    torch.save({"state": Payload(marker)}, path)


@pytest.fixture(scope="module")
def stopped_run(tiny_dir, prepared_text, tmp_path_factory):
    """A causal-lm run stopped after step 3 of 6 with a checkpoint at step 2 (a few seconds)."""
    out = tmp_path_factory.mktemp("safety") / "run"
    r = recipe(tiny_dir("causal-lm"), prepared_text, out, "train.max_steps=6", "train.save_every=2")
    train(r, stop_after_step=3)
    return out


def copy_run(stopped_run, tmp_path):
    return shutil.copytree(stopped_run, tmp_path / "run")


def resume(tiny_dir, prepared_text, run):
    return train(recipe(tiny_dir("causal-lm"), prepared_text, run, "train.max_steps=6", "train.save_every=2"),
                 resume="auto")


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_resume_refuses_a_pickle_that_would_run_code(name, stopped_run, tiny_dir, prepared_text, tmp_path):
    run = copy_run(stopped_run, tmp_path)
    marker = tmp_path / "pwned"
    plant(run / "checkpoints" / "step-000002" / name, marker)
    with pytest.raises(MedvlError) as err:
        resume(tiny_dir, prepared_text, run)
    assert not marker.exists()
    text = str(err.value)
    assert "run code" in text and ("step-000002" in text)
    assert not (run / "final").exists()


def test_resume_state_is_json_not_pickle(stopped_run):
    import json

    ckpt = stopped_run / "checkpoints" / "step-000002"
    assert not list(ckpt.glob("custom_checkpoint_*"))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["resume_state"]["position"] == {"step": 2}
    assert state["resume_state"]["scheduler"]["last_epoch"] == 2


def test_export_refuses_a_crafted_deepspeed_checkpoint(tmp_path):
    from medvl.resolve import checkpoint_state_dict

    ckpt = tmp_path / "step-000002"
    shards = ckpt / "pytorch_model"
    shards.mkdir(parents=True)
    (ckpt / "latest").write_text("pytorch_model")
    marker = tmp_path / "pwned"
    plant(shards / "zero_pp_rank_0_mp_rank_00_model_states.pt", marker)
    plant(shards / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(MedvlError, match="could run code") as err:
        checkpoint_state_dict(ckpt)
    assert not marker.exists() and str(ckpt) in str(err.value)


def test_export_refuses_a_crafted_bin(tmp_path):
    from medvl.resolve import checkpoint_state_dict

    ckpt = tmp_path / "step-000002"
    ckpt.mkdir()
    marker = tmp_path / "pwned"
    plant(ckpt / "pytorch_model.bin", marker)
    with pytest.raises(MedvlError, match="could run code"):
        checkpoint_state_dict(ckpt)
    assert not marker.exists()


def test_safe_loading_restores_the_environment(tmp_path):
    from medvl.checkpoint_files import safe_torch_load

    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with pytest.raises(MedvlError):
        with safe_torch_load(tmp_path):
            plant(tmp_path / "x.pt", tmp_path / "m")
            torch.load(tmp_path / "x.pt", weights_only=False)  # what DeepSpeed asks for: overridden
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before and not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------------------
# faults during a save: the previous checkpoint stays readable and the next run resumes exactly


def final_weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tiny_dir, prepared_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    train(recipe(tiny_dir("causal-lm"), prepared_text, out, "train.max_steps=6", "train.save_every=2"))
    return final_weights(out)


def test_crash_mid_save_keeps_the_previous_checkpoint_and_resumes(stopped_run, reference, tiny_dir,
                                                                  prepared_text, tmp_path, monkeypatch):
    import accelerate

    run = copy_run(stopped_run, tmp_path)
    real = accelerate.Accelerator.save_state

    def cut(self, output_dir, **kw):  # writes part of the state, then the process dies
        real(self, output_dir, **kw)
        (run / "checkpoints" / ".step-000004.partial" / "optimizer.bin").write_bytes(b"PK\x03\x04 cut")
        raise KeyboardInterrupt

    monkeypatch.setattr(accelerate.Accelerator, "save_state", cut)
    with pytest.raises(KeyboardInterrupt):
        resume(tiny_dir, prepared_text, run)
    monkeypatch.undo()
    assert [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-000002"]
    resume(tiny_dir, prepared_text, run)
    got = final_weights(run)
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
    assert not list((run / "checkpoints").glob(".*partial"))


def test_disk_full_mid_save_says_so_and_resumes(stopped_run, reference, tiny_dir, prepared_text, tmp_path,
                                                monkeypatch):
    import accelerate

    run = copy_run(stopped_run, tmp_path)

    def full(self, output_dir, **kw):
        (run / "checkpoints" / ".step-000004.partial" / "model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full)
    with pytest.raises(MedvlError) as err:
        resume(tiny_dir, prepared_text, run)
    text = str(err.value)
    assert "disk filled up" in text and "step-000002 is intact" in text and "free at least" in text
    assert not (run / "checkpoints" / ".step-000004.partial").exists()
    monkeypatch.undo()
    resume(tiny_dir, prepared_text, run)
    got = final_weights(run)
    assert all(torch.equal(got[k], reference[k]) for k in got)


def test_torch_unexpected_pos_is_read_as_disk_full(stopped_run, tiny_dir, prepared_text, tmp_path, monkeypatch):
    import accelerate

    run = copy_run(stopped_run, tmp_path)

    def full(self, output_dir, **kw):  # what torch's zip writer says when write() comes up short
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 44")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full)
    with pytest.raises(MedvlError, match="disk filled up"):
        resume(tiny_dir, prepared_text, run)


def test_too_little_free_space_refuses_before_writing(stopped_run, tiny_dir, prepared_text, tmp_path, monkeypatch):
    import collections

    import medvl.engine.guards as guards

    run = copy_run(stopped_run, tmp_path)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(guards.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(MedvlError) as err:
        resume(tiny_dir, prepared_text, run)
    text = str(err.value)
    assert "a save needs about" in text and "4.0 KiB is free" in text and "step-000002 is intact" in text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]


# ---------------------------------------------------------------------------------------------------------
# export and convert: a failure mid-write (here: ENOSPC while writing the last file) leaves the previous output
# readable and untouched, no partial directory, and the next run writes the new one


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _assert_previous_intact(out, marker_text):
    assert (out / "MARKER").read_text() == marker_text
    assert not [p.name for p in out.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_export_cut_mid_write_keeps_the_previous_export(tiny_dir, tmp_path, monkeypatch):
    import medvl.export as ex

    out = tmp_path / "models" / "lm"
    out.mkdir(parents=True)
    (out / "MARKER").write_text("previous export")
    monkeypatch.setattr(ex, "write_model_card", _disk_full)
    with pytest.raises(MedvlError, match=f"disk filled up while writing {out}; the previous {out} is untouched"):
        ex.export(tiny_dir("causal-lm"), out, dtype="fp32", overwrite=True)
    _assert_previous_intact(out, "previous export")
    monkeypatch.undo()
    res = ex.export(tiny_dir("causal-lm"), out, dtype="fp32", overwrite=True)
    assert res.parity.logits_max_abs_diff < 1e-4 and not (out / "MARKER").exists()
    assert (out / "model.safetensors").is_file()


def test_convert_cut_mid_write_keeps_the_previous_conversion(tiny_dir, tmp_path, monkeypatch):
    import medvl.convert as cv

    from .test_convert import make_llm

    llm = make_llm(tmp_path / "llm")
    out = tmp_path / "models" / "vlm"
    out.mkdir(parents=True)
    (out / "MARKER").write_text("previous conversion")
    monkeypatch.setattr(cv, "copy_processor_files", _disk_full)
    with pytest.raises(MedvlError, match="disk filled up"):
        cv.convert(tiny_dir("qwen2.5-vl"), llm, out, overwrite=True)
    _assert_previous_intact(out, "previous conversion")
    monkeypatch.undo()
    cv.convert(tiny_dir("qwen2.5-vl"), llm, out, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "MARKER").exists()
