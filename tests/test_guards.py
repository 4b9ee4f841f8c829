"""Guardrails: a diverging or collapsed run stops with a diagnosis and never saves (or keeps only) a broken
checkpoint; a resume with changed settings applies what can apply and refuses the rest; written outputs follow
the umask."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch

from medvl.engine.train import train
from medvl.errors import MedvlError

from .test_train import recipe


def run(tiny_dir, prepared_text, out, *extra):
    return recipe(tiny_dir("causal-lm"), prepared_text, out, "optim.warmup_steps=0", *extra)


def checkpoint_tensors_finite(ckpt) -> bool:
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "model.safetensors"))
    optim = torch.load(ckpt / "optimizer.bin", weights_only=True)
    tensors = list(weights.values()) + [t for s in optim["state"].values() for t in s.values() if torch.is_tensor(t)]
    return all(bool(torch.isfinite(t).all()) and float(t.abs().max()) < 1e6 for t in tensors if t.numel())


def test_huge_lr_overflow_inside_adam_is_diagnosed(tiny_dir, prepared_text, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(MedvlError) as err:
        train(run(tiny_dir, prepared_text, out, "optim.lr=1e38", "train.save_every=1"))
    text = str(err.value)
    # torch's fused AdamW (medvl's optimizer on CPU and GPU) writes inf/NaN instead of raising an overflow: the
    # finite check before the first save catches it; the unfused one raised inside Adam (diagnosed as overflow)
    assert "training diverged" in text and ("overflow" in text and "at step 1" in text
                                            or "non-finite values" in text and "step-000001 (not written)" in text)
    assert "no good checkpoint" in text and "lower optim.lr" in text
    assert not (out / "checkpoints").exists()


def test_collapse_stops_and_never_names_a_collapsed_checkpoint(tiny_dir, prepared_text, tmp_path):
    """lr=1e6: one step makes every logit equal (loss == ln V exactly, gradient exactly 0)."""
    out = tmp_path / "run"
    with pytest.raises(MedvlError) as err:
        train(run(tiny_dir, prepared_text, out, "optim.lr=1e6", "train.save_every=1", "train.max_steps=20"))
    text = str(err.value)
    assert "collapsed and is not learning" in text and "exactly 0" in text and "ln(vocab) 6.4" in text
    assert "no good checkpoint" in text and "checkpoints from step 1 on hold the broken model" in text
    assert "at step 2" in text  # stopped at the first dead step, not after 19 of them
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("step", 0) for m in metrics) <= 2


def test_collapse_names_the_last_healthy_checkpoint_and_resume_with_lower_lr_applies(tiny_dir, prepared_text,
                                                                                      tmp_path):
    out = tmp_path / "run"
    with pytest.raises(MedvlError) as err:
        train(run(tiny_dir, prepared_text, out, "optim.lr=1e3", "train.save_every=1", "train.max_steps=20"))
    text = str(err.value)
    good = out / "checkpoints" / "step-000001"
    assert f"last good checkpoint: {good}" in text and f"--resume {good}" in text
    assert all(checkpoint_tensors_finite(c) for c in (out / "checkpoints").iterdir())
    # the advice works: resuming from it with a sane rate trains at that rate (re-applied over the checkpoint's)
    res = train(run(tiny_dir, prepared_text, out, "optim.lr=1e-3", "train.save_every=1", "train.max_steps=4",
                    "optim.scheduler=constant"), resume=str(good))
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_start = max(i for i, m in enumerate(events) if m["kind"] == "start")
    lrs = [m["lr"] for m in events[last_start:] if m["kind"] == "train"]
    assert lrs and all(math.isclose(lr, 1e-3) for lr in lrs)
    assert all(math.isfinite(loss) for loss in res.losses)
    info = json.loads((out / "final" / "medvl_run.json").read_text())
    assert info["recipe"]["optim"]["lr"] == 1e-3
    assert info["recipe_changes"][0]["changes"]["optim.lr"] == {"checkpoint": 1e3, "now": 1e-3}


def test_nan_never_reaches_a_checkpoint(tiny_dir, prepared_text, tmp_path, monkeypatch):
    """Weights poisoned after step 2 (save_every 1): the step-3 save is refused, step-2 is named."""
    import medvl.engine.train as engine

    out = tmp_path / "run"
    real = engine.guards.check_finite_state

    def poison(accelerator, model, optimizer, step, run_dir, watch):
        if step == 3:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
        return real(accelerator, model, optimizer, step, run_dir, watch)

    monkeypatch.setattr(engine.guards, "check_finite_state", poison)
    with pytest.raises(MedvlError) as err:
        train(run(tiny_dir, prepared_text, out, "train.save_every=1", "train.keep_last=5"))
    text = str(err.value)
    assert "non-finite values in" in text and "step-000003 (not written)" in text
    assert f"last good checkpoint: {out / 'checkpoints' / 'step-000002'}" in text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_resume_refuses_a_change_that_would_not_apply_and_forcing_works(tiny_dir, prepared_text, tmp_path,
                                                                        monkeypatch):
    from medvl.engine.checkpoint import FORCE_ENV

    out = tmp_path / "run"
    train(run(tiny_dir, prepared_text, out, "train.save_every=2", "train.max_steps=4"), stop_after_step=3)
    with pytest.raises(MedvlError) as err:
        train(run(tiny_dir, prepared_text, out, "train.save_every=2", "train.max_steps=4", "train.seed=7",
                  "train.micro_batch_size=2"), resume="auto")
    text = str(err.value)
    assert "train.seed: 0 -> 7" in text and "train.micro_batch_size: 4 -> 2" in text
    assert "--allow-recipe-change" in text and not (out / "final").exists()
    monkeypatch.setenv(FORCE_ENV, "1")
    train(run(tiny_dir, prepared_text, out, "train.save_every=2", "train.max_steps=4", "train.seed=7"),
          resume="auto")
    events = [{k: v for k, v in m.items() if k != "time"}
              for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if m.get("kind") == "recipe_change"]
    assert events == [{"kind": "recipe_change", "step": 2, "changes": {"train.seed": {"checkpoint": 0, "now": 7}},
                       "forced": ["train.seed"]}]


def test_unchanged_resume_logs_no_change(tiny_dir, prepared_text, tmp_path):
    out = tmp_path / "run"
    train(run(tiny_dir, prepared_text, out, "train.save_every=2", "train.max_steps=4"), stop_after_step=3)
    train(run(tiny_dir, prepared_text, out, "train.save_every=2", "train.max_steps=4"), resume="auto")
    kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "recipe_change" not in kinds
    assert json.loads((out / "final" / "medvl_run.json").read_text())["recipe_changes"] == []


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_outputs_follow_the_umask(tmp_path, mask):
    from safetensors.torch import save_file

    from medvl.atomic import atomic_dir

    old = os.umask(mask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors itself writes 0600
            (tmp / "sub").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "out") == 0o777 & ~mask and mode(tmp_path / "out" / "sub") == 0o777 & ~mask
    assert mode(tmp_path / "out" / "model.safetensors") == 0o666 & ~mask


def test_checkpoints_and_final_follow_the_umask(tiny_dir, prepared_text, tmp_path):
    old = os.umask(0o022)
    try:
        train(run(tiny_dir, prepared_text, tmp_path / "run", "train.save_every=2", "train.max_steps=2"))
    finally:
        os.umask(old)
    for path in [tmp_path / "run" / "final", tmp_path / "run" / "final" / "model.safetensors",
                 tmp_path / "run" / "checkpoints" / "step-000002" / "model.safetensors"]:
        assert stat.S_IMODE(path.stat().st_mode) in (0o755, 0o644), path


def test_rerunning_tiny_cpu_without_resume_keeps_the_checkpoints(tiny_dir, prepared_text, tmp_path):
    """The shipped demo recipe no longer has overwrite: true; a second run refuses and deletes nothing."""
    from medvl.config import load_recipe

    assert load_recipe("tiny_cpu").output.overwrite is False
    r = recipe(tiny_dir("causal-lm"), prepared_text, tmp_path / "run", "train.save_every=2", "train.max_steps=2")
    train(r)
    with pytest.raises(MedvlError) as err:
        train(r)
    assert "1 checkpoint(s), newest step-000002" in str(err.value) and "--resume auto" in str(err.value)
    assert (tmp_path / "run" / "checkpoints" / "step-000002").is_dir()
