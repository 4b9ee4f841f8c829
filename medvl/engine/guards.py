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

# A trained transformer's weights sit within ~10 of zero (LayerNorm gains ~1, linear layers ~0.1); lr=1e3 on the
# tiny model put |w| = 1e30 into a still-finite checkpoint. 1e6 is far past any sane weight and below fp32's
# 3.4e38, where the next update overflows.
MAX_ABS_WEIGHT = 1e6
COLLAPSE_STEPS = 5  # lr=1e6 sat at exactly zero from step 2; 5 steps leaves no doubt and costs little
UNIFORM_TOL = 1e-4  # |loss - ln V|: a random tiny model starts ~0.01-0.1 away; a collapsed one is at 0.0
STUCK_TOL = 1e-6  # relative change of the loss between steps that counts as "did not move"
SAVE_MARGIN = 1.10  # free space wanted: the estimated save + 10 % (safetensors/zip headers, trainer_state)
_DIVERGED_FIX = ("lower optim.lr (or raise optim.warmup_steps); with fp16 switch to bf16; with flash attention "
                 "try sdpa")


# ---------------------------------------------------------------------------------------------------------
# divergence

def last_good_checkpoint(run_dir: Path, before: int | None = None, watch: "Collapse | None" = None) -> Path | None:
    """The newest complete checkpoint (older than step `before`, when the trouble is known to start there):
    medvl writes none with non-finite or exploded weights or optimizer state, and `watch` (the run's health
    record) vouches only for checkpoints whose next step still learned."""
    from medvl.checkpoint_files import list_checkpoints, step_of

    found = [p for p in list_checkpoints(run_dir) if (before is None or step_of(p) < before)
             and (watch is None or watch.vouches_for(step_of(p)))]
    return found[-1] if found else None


def diverged(what: str, step: int, run_dir: Path, *, before: int | None = None,
             title: str = "training diverged", watch: "Collapse | None" = None) -> MedvlError:
    good = last_good_checkpoint(run_dir, before, watch)
    if good is None:
        where = ("no good checkpoint was written before it" +
                 (" (weights are checked before every save)" if before is None else
                  f" (checkpoints from step {before} on hold the broken model)"))
        fix = f"{_DIVERGED_FIX}; then start the run again (output.overwrite=true)"
    else:
        where = f"last good checkpoint: {good}"
        fix = (f"{_DIVERGED_FIX}; then resume from it with the lower rate: --resume {good} optim.lr=... "
               "(the rate is re-applied on resume)")
    return MedvlError(f"{title}: {what} at step {step}; stopped, nothing more was saved", where=where, fix=fix)


@contextlib.contextmanager
def optimizer_overflow(step: int, run_dir: Path, watch: "Collapse | None" = None):
    """AdamW multiplies by lr / bias_correction as a float32 scalar: lr=1e38 overflows inside torch."""
    try:
        yield
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        raise diverged(f"the optimizer update overflowed the weights' dtype ({exc})", step, run_dir,
                       watch=watch) from None


def check_finite_state(accelerator, model, optimizer, step: int, run_dir: Path,
                       watch: "Collapse | None" = None) -> None:
    """Every rank checks its own trainable weights and optimizer tensors; all ranks agree before a save."""
    import torch

    if watch is not None and watch.dead_at(step):
        raise watch.error(step)  # a collapsed model is finite: never let it into (and rotate out) good checkpoints
    bad = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.numel():
            w = _local(p.detach())
            if not bool(torch.isfinite(w).all()):
                bad.append(f"non-finite values in {name}")
            elif float(w.abs().max()) > MAX_ABS_WEIGHT:
                bad.append(f"|w| = {float(w.abs().max()):.1e} in {name}")
            if bad:
                break
    if not bad:
        for state in getattr(optimizer, "state", {}).values():
            if any(torch.is_tensor(t) and t.is_floating_point() and t.numel()
                   and not bool(torch.isfinite(_local(t)).all()) for t in state.values()):
                bad.append("non-finite values in the optimizer state")
                break
    flag = accelerator.reduce(torch.tensor([float(bool(bad))], device=accelerator.device), "sum")
    if float(flag) > 0:
        what = bad[0] if bad else "broken weights on another process"
        raise diverged(f"{what} before saving checkpoint step-{step:06d} (not written)", step, run_dir, watch=watch)


def _local(t):
    """This rank's shard of an FSDP2 DTensor (each rank checks its own; the flags are reduced), else t."""
    return t.to_local() if hasattr(t, "to_local") else t


class Collapse:
    """Stops a run that trains but cannot learn: zero gradients, or a loss frozen at the uniform value. Also
    the run's health record: step k's checkpoint is vouched for once step k + 1, computed on its weights, gave a
    finite loss and a non-zero gradient."""

    def __init__(self, model, run_dir: Path):
        self.healthy: set[int] = set()
        self.first_seen: int | None = None
        self.dead: int | None = None  # last step seen with a zero gradient / stuck loss
        cfg = model.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        vocab = getattr(text, "vocab_size", None) or getattr(cfg, "vocab_size", None)
        self.uniform = math.log(vocab) if vocab else None
        self.run_dir = run_dir
        self.zero_grad = 0
        self.stuck = 0
        self.last = None
        self.onset = None  # first step of the current zero-gradient / stuck stretch

    def check(self, step: int, loss: float, grad_norm: float | None, tokens: int) -> None:
        if self.first_seen is None:
            self.first_seen = step
        if tokens == 0:
            return  # the no-token warning handles these
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            return  # the divergence guard stops the run
        self.zero_grad = self.zero_grad + 1 if grad_norm == 0.0 else 0
        at_uniform = self.uniform is not None and abs(loss - self.uniform) < UNIFORM_TOL
        moved = self.last is None or abs(loss - self.last) > STUCK_TOL * max(1.0, abs(loss))
        self.stuck = self.stuck + 1 if at_uniform and not moved else 0
        self.last = loss
        if self.zero_grad == 1 or self.stuck == 1:
            self.onset = step
        elif not (self.zero_grad or self.stuck):
            self.onset = None
            self.healthy.add(step)
        if self.zero_grad or self.stuck:
            self.dead = step
        if self.zero_grad >= COLLAPSE_STEPS or self.stuck >= COLLAPSE_STEPS:
            raise self.error(step)

    def vouches_for(self, ckpt_step: int) -> bool:
        """Checkpoint `ckpt_step` is good: the step after it was healthy, or it predates this process."""
        return ckpt_step + 1 in self.healthy or (self.first_seen is not None and ckpt_step + 1 < self.first_seen)

    def dead_at(self, step: int) -> bool:
        return self.dead == step

    def error(self, step: int) -> MedvlError:
        loss = self.last if self.last is not None else float("nan")
        why = (f"the gradient norm has been exactly 0 for {self.zero_grad} step(s)" if self.zero_grad else
               f"the loss has not moved for {self.stuck} step(s)")
        uniform = ""
        if self.uniform is not None:
            uniform = f"; loss {loss:.6f} vs ln(vocab) {self.uniform:.6f}"
            if abs(loss - self.uniform) < UNIFORM_TOL:
                uniform += " (uniform prediction: the model gives every token the same probability)"
        # The update before the first dead step did the damage: checkpoints from onset - 1 on are collapsed.
        return diverged(f"{why}{uniform}", step, self.run_dir, before=(self.onset or step) - 1,
                        title="the model collapsed and is not learning", watch=self)


# ---------------------------------------------------------------------------------------------------------
# disk

def save_bytes(model, optimizer) -> int:
    """What one checkpoint of this process takes: trainable weights + optimizer tensors (+ the margin)."""
    import torch

    n = sum(_local(p).numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    for state in getattr(optimizer, "state", {}).values():
        n += sum(_local(t).numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return int(n * SAVE_MARGIN) + (1 << 20)  # + 1 MiB: RNG states, trainer_state.json, file headers


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _intact(run_dir: Path, watch: "Collapse | None" = None) -> str:
    good = last_good_checkpoint(run_dir, watch=watch)
    return f"the last complete checkpoint {good} is intact" if good else "no earlier checkpoint exists"


def check_free_space(accelerator, root: Path, model, optimizer, run_dir: Path, watch: "Collapse | None" = None) -> int:
    """Refuse a save the filesystem cannot hold (all processes write to the same folder). Returns the bytes."""
    import torch

    mine = torch.tensor([float(save_bytes(model, optimizer))], device=accelerator.device)
    need = int(float(accelerator.reduce(mine, "sum")))
    free = shutil.disk_usage(root if root.exists() else run_dir).free
    if free < need:
        raise MedvlError(f"not enough disk space for a checkpoint: a save needs about {_human(need)}, "
                         f"{_human(free)} is free; {_intact(run_dir, watch)}", where=str(root),
                         fix="free space (or lower train.keep_last), then resume with --resume auto")
    return need


_FULL_DISK_TEXT = ("unexpected pos", "file write failed", "No space left")


@contextlib.contextmanager
def disk_full_diagnosis(partial: Path, need: int, run_dir: Path, watch: "Collapse | None" = None):
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
                         f"nothing of it was kept and {_intact(run_dir, watch)}", where=str(partial.parent),
                         fix=f"free at least {_human(need)} on this filesystem, then resume with --resume auto"
                         ) from None
