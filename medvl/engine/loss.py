"""The loss the loop optimises: summed token cross-entropy over supervised tokens (the caller divides by the
supervised tokens of the whole accumulation window on all ranks).

Chunked loss (the default). The full-vocabulary logits are never materialised: the model's forward runs with
its LM head fed an empty slice (a pre-hook captures the final hidden states instead), the hidden states of the
supervised positions are gathered, and the head + cross-entropy run over them in chunks of `CHUNK_TOKENS`
tokens, each chunk recomputed in the backward pass (non-reentrant checkpoint), so at most one chunk's logits
live at a time. At seq 4096 and Qwen's 151,936-token vocabulary the plain path holds ~12 bytes per logit
(the head's output, its fp32 copy, log-softmax and its gradient): 7.5 GB; one 1,024-token chunk holds 1.9 GB,
and only supervised tokens are projected at all (on short-answer VQA, a few percent of the row). The cost is
one extra head matmul per supervised token outside the last chunk, in the backward pass (at most ~2 % of a 7B
step's FLOPs; none when a micro-batch has <= 1,024 supervised tokens).

The head is called as a module, not through its weight, so DeepSpeed ZeRO-3's gather hooks and LoRA/peft
wrappers see an ordinary call. Models that post-process logits (soft-capping, a logit scale) keep the plain
path: the chunked one would skip that step.
"""

from __future__ import annotations

import contextlib
import functools

from medvl.data.collate import IGNORE, model_inputs
from medvl.models import unwrap_model

# 1,024 tokens x 151,936 vocab x ~12 B = 1.9 GB per chunk at Qwen's vocabulary; smaller chunks save little more
# memory (the model's own activations dominate) and add per-chunk overhead.
CHUNK_TOKENS = 1024
# Per logit while a chunk's loss and gradient are computed: head output in the compute dtype, its fp32 copy,
# log-softmax (fp32) and the gradient of the logits (fp32). Measured ~12 B on CPU fp32 (tests/bench/loss_memory.py).
BYTES_PER_LOGIT = 12
# Config attributes that make a model transform its logits after the head: the chunked path would skip that.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def supervised_tokens(batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum()) if batch is not None else 0


def token_loss_sum(model, family, batch, *, chunk_tokens: int | None = CHUNK_TOKENS):
    """Summed cross-entropy of the supervised tokens of `batch`. chunk_tokens=None: the plain path (full logits),
    kept as the reference the chunked path is tested against."""
    import torch

    inner = unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if chunk_tokens is None or head is None or _transforms_logits(inner):
        out = model(**model_inputs(inner, family, batch))
        logits = out.logits[:, :-1].float()
        labels = batch["labels"][:, 1:].flatten().to(logits.device)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels, ignore_index=IGNORE, reduction="sum")
    with _capture_head_input(head) as captured:
        model(**model_inputs(inner, family, batch))  # inner: rope helpers, not the DDP wrapper
    hidden = captured[0][:, :-1]
    labels = batch["labels"][:, 1:].to(hidden.device)
    keep = labels != IGNORE
    return chunked_cross_entropy_sum(head, hidden[keep], labels[keep], chunk_tokens)


def chunked_cross_entropy_sum(head, hidden, targets, chunk_tokens: int = CHUNK_TOKENS):
    """sum_i CE(head(hidden[i]), targets[i]) over (N, H) hidden states, `chunk_tokens` rows at a time."""
    import torch
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    if hidden.shape[0] == 0:
        # Still touch the head so its parameters stay in the graph (DDP expects a gradient for each of them).
        return total + head(hidden[:0]).float().sum()
    step = functools.partial(_chunk_loss, head)
    grad = torch.is_grad_enabled()
    n = hidden.shape[0]
    for s in range(0, n, chunk_tokens):
        h, t = hidden[s:s + chunk_tokens], targets[s:s + chunk_tokens]
        # The last chunk is not recomputed: its backward runs first, before any other chunk's recomputation, so
        # keeping its tensors does not raise the peak; a batch with <= chunk_tokens supervised tokens (most VQA
        # micro-batches) then costs no extra head matmul at all.
        last = s + chunk_tokens >= n
        total = total + (checkpoint(step, h, t, use_reentrant=False) if grad and not last else step(h, t))
    return total


def _chunk_loss(head, h, t):
    import torch

    return torch.nn.functional.cross_entropy(head(h).float(), t, reduction="sum")


@contextlib.contextmanager
def _capture_head_input(head):
    """During the model's forward: record the hidden states the LM head receives and hand the head an empty
    slice of them instead, so the forward returns (batch, 0, vocab) logits and allocates none."""
    captured: list = []

    def hook(_module, args, kwargs):
        captured.append(args[0])
        return (args[0][..., :0, :],) + tuple(args[1:]), kwargs

    handle = head.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the LM head ran {len(captured)} times in one forward; expected once")


def _transforms_logits(model) -> bool:
    configs = [model.config, getattr(model.config, "text_config", None)]
    return any(getattr(c, a, None) not in (None, 1, 1.0) for c in configs if c is not None for a in _LOGIT_TRANSFORMS)


def logits_bytes(tokens: int, vocab: int, chunk_tokens: int | None = CHUNK_TOKENS) -> int:
    """Peak bytes the loss holds for logits over `tokens` positions (the dry-run estimate's logits term)."""
    live = tokens if chunk_tokens is None else min(tokens, chunk_tokens)
    return live * vocab * BYTES_PER_LOGIT


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
