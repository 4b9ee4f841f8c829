"""The loss the loop optimises: summed token cross-entropy over supervised tokens (the caller divides by the
supervised tokens of the whole accumulation window on all ranks)."""

from __future__ import annotations

from medvl.data.collate import IGNORE, model_inputs


def supervised_tokens(batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum()) if batch is not None else 0


def token_loss_sum(model, family, batch):
    import torch

    out = model(**model_inputs(model, family, batch))
    logits = out.logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten().to(logits.device),
                                             ignore_index=IGNORE, reduction="sum")


def require_supervision(tokens_seen: int, steps_done: int, steps_per_epoch: int, steps_total: int) -> None:
    """Stop a run that has trained nothing: once a whole epoch (or the whole run, if shorter) has gone by without a
    single supervised token, no later step will have one either (every epoch sees the same samples)."""
    if tokens_seen or steps_done < min(steps_per_epoch, steps_total):
        return
    from medvl.errors import MedvlError

    raise MedvlError(
        f"{steps_done} optimizer step(s) ran and not one token was supervised: every label is masked, so this run "
        "would train nothing (no final model is written)",
        fix="check data.loss_mask and the prepared data (`medvl inspect-data DIR --index 0 --model M` shows the "
            "trained tokens); re-run prepare-data with --model so samples without a trainable turn are "
            "quarantined")
