"""Guardrails that stop a run with a diagnosis instead of saving, or training on, something broken.

- Divergence: a loss or gradient norm that is not finite, or an update too large for the dtype (lr=1e38 made
  AdamW raise "value cannot be converted to type float without overflow"), stops the run; the message names the
  newest checkpoint that is actually good. A checkpoint is only written when every trainable weight and every
  optimizer tensor is finite (a diverging lr had put |w| = 1e30 and inf Adam moments into a checkpoint that
  the old advice then told the user to resume from).
- Collapse: a model whose gradient is exactly zero for COLLAPSE_STEPS optimizer steps, or whose loss sits at
  the uniform value ln(vocab) and does not move, learns nothing (lr=1e6 gave loss == ln(vocab) and grad norm
  0.000 for 19 steps, then exit 0). A model that learns never has an exactly zero gradient with supervised
  tokens in the window.
- Disk: a save is refused before it starts when the filesystem cannot hold it, and a save cut by a full disk
  says so (torch's own message is "unexpected pos"), names the intact checkpoint and the space a save needs.
"""

from __future__ import annotations

import contextlib
import errno
import math
import shutil
from pathlib import Path

from medvl.errors import MedvlError

COLLAPSE_STEPS = 5  # lr=1e6 sat at exactly zero from step 2; 5 steps leaves no doubt and costs little
UNIFORM_TOL = 1e-4  # |loss - ln V|: a random tiny model starts ~0.01-0.1 away; a collapsed one is at 0.0
STUCK_TOL = 1e-6  # relative change of the loss between steps that counts as "did not move"
SAVE_MARGIN = 1.10  # free space wanted: the estimated save + 10 % (safetensors/zip headers, trainer_state)
_DIVERGED_FIX = ("lower optim.lr (or raise optim.warmup_steps); with fp16 switch to bf16; with flash attention "
                 "try sdpa")


# ---------------------------------------------------------------------------------------------------------
# divergence

def last_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: medvl writes none with non-finite weights or optimizer state."""
    from medvl.engine.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def diverged(what: str, step: int, run_dir: Path) -> MedvlError:
    good = last_good_checkpoint(run_dir)
    if good is None:
        where = "no checkpoint was written before it (none would have been: weights are checked before saving)"
        fix = f"{_DIVERGED_FIX}; then start the run again"
    else:
        where = f"last good checkpoint: {good}"
        fix = f"{_DIVERGED_FIX}; then resume from it with --resume {good} and the lower rate (optim.lr=...)"
    return MedvlError(f"training diverged: {what} at step {step}; stopped, nothing more was saved",
                      where=where, fix=fix)


@contextlib.contextmanager
def optimizer_overflow(step: int, run_dir: Path):
    """AdamW multiplies by lr / bias_correction as a float32 scalar: lr=1e38 overflows inside torch."""
    try:
        yield
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        raise diverged(f"the optimizer update overflowed the weights' dtype ({exc})", step, run_dir) from None


def check_finite_state(accelerator, model, optimizer, step: int, run_dir: Path) -> None:
    """Every rank checks its own trainable weights and optimizer tensors; all ranks agree before a save."""
    import torch

    bad = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.numel() and not bool(torch.isfinite(p.detach()).all()):
            bad.append(name)
            break
    if not bad:
        for state in getattr(optimizer, "state", {}).values():
            if any(torch.is_tensor(t) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())
                   for t in state.values()):
                bad.append("optimizer state")
                break
    flag = accelerator.reduce(torch.tensor([float(bool(bad))], device=accelerator.device), "sum")
    if float(flag) > 0:
        what = f"non-finite values in {bad[0]}" if bad else "non-finite weights on another process"
        raise diverged(f"{what} before saving checkpoint step-{step:06d} (not written)", step, run_dir)


class Collapse:
    """Stops a run that trains but cannot learn: zero gradients, or a loss frozen at the uniform value."""

    def __init__(self, model, run_dir: Path):
        cfg = model.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        vocab = getattr(text, "vocab_size", None) or getattr(cfg, "vocab_size", None)
        self.uniform = math.log(vocab) if vocab else None
        self.run_dir = run_dir
        self.zero_grad = 0
        self.stuck = 0
        self.last = None

    def check(self, step: int, loss: float, grad_norm: float | None, tokens: int) -> None:
        if tokens == 0 or not math.isfinite(loss):
            return  # the divergence guard and the no-token warning handle these
        self.zero_grad = self.zero_grad + 1 if grad_norm == 0.0 else 0
        at_uniform = self.uniform is not None and abs(loss - self.uniform) < UNIFORM_TOL
        moved = self.last is None or abs(loss - self.last) > STUCK_TOL * max(1.0, abs(loss))
        self.stuck = self.stuck + 1 if at_uniform and not moved else 0
        self.last = loss
        if self.zero_grad >= COLLAPSE_STEPS or self.stuck >= COLLAPSE_STEPS:
            why = (f"the gradient norm has been exactly 0 for {self.zero_grad} steps"
                   if self.zero_grad >= COLLAPSE_STEPS else
                   f"the loss has sat at {loss:.6f} = ln(vocab {round(math.exp(self.uniform))}) for {self.stuck} "
                   "steps")
            uniform = (f"; loss {loss:.6f} vs ln(vocab) {self.uniform:.6f}"
                       + (" (uniform prediction: the model outputs the same logits for every token)"
                          if at_uniform else "")) if self.uniform else ""
            raise diverged(f"the model collapsed and is not learning: {why}{uniform}", step, self.run_dir)


# ---------------------------------------------------------------------------------------------------------
# disk

def save_bytes(model, optimizer) -> int:
    """What one checkpoint of this process takes: trainable weights + optimizer tensors (+ the margin)."""
    import torch

    n = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    for state in getattr(optimizer, "state", {}).values():
        n += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return int(n * SAVE_MARGIN) + (1 << 20)  # + 1 MiB: RNG states, trainer_state.json, file headers


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _intact(run_dir: Path) -> str:
    good = last_good_checkpoint(run_dir)
    return f"the last complete checkpoint {good} is intact" if good else "no earlier checkpoint exists"


def check_free_space(accelerator, root: Path, model, optimizer, run_dir: Path) -> int:
    """Refuse a save the filesystem cannot hold (all processes write to the same folder). Returns the bytes."""
    import torch

    mine = torch.tensor([float(save_bytes(model, optimizer))], device=accelerator.device)
    need = int(float(accelerator.reduce(mine, "sum")))
    free = shutil.disk_usage(root if root.exists() else run_dir).free
    if free < need:
        raise MedvlError(f"not enough disk space for a checkpoint: a save needs about {_human(need)}, "
                         f"{_human(free)} is free; {_intact(run_dir)}", where=str(root),
                         fix="free space (or lower train.keep_last), then resume with --resume auto")
    return need


_FULL_DISK_TEXT = ("unexpected pos", "file write failed", "No space left")


@contextlib.contextmanager
def disk_full_diagnosis(partial: Path, need: int, run_dir: Path):
    """A save cut by a full disk: remove the partial folder and say what happened, in words."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or (
            isinstance(exc, RuntimeError) and any(t in str(exc) for t in _FULL_DISK_TEXT))
        if not full:
            raise
        shutil.rmtree(partial, ignore_errors=True)
        raise MedvlError(f"the disk filled up while saving checkpoint {partial.name.strip('.').split('.')[0]}; "
                         f"nothing of it was kept and {_intact(run_dir)}", where=str(partial.parent),
                         fix=f"free at least {_human(need)} on this filesystem, then resume with --resume auto"
                         ) from None
