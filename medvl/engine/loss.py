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
