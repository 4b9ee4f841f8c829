"""Packed rows that attend per sample: the attention kernel a packed row runs, and `data.packing: auto`.

A packed row holds several samples back to back. transformers alone turns the restarting position ids into a
block-diagonal mask over the whole row: sdpa then computes (and on CPU runs its masked, non-flash kernel on)
all row^2 query-key pairs although only sum(n_i^2) are wanted; a row of 8 x 256 tokens does 8x the attention
work of its samples. medvl instead passes the row's sample boundaries (`cu_seq_lens_q/k`, the varlen keywords
transformers forwards to the attention function) and
  - on flash_attention_2 (GPU), transformers' varlen path uses them directly;
  - on sdpa, the model runs `medvl_sdpa_segments`: causal sdpa once per sample (no mask built at all), or once
    over the row's samples right-padded to the longest when that costs at most BATCHED_WORK_LIMIT x the exact
    work (similar lengths: one kernel call instead of dozens), and plain sdpa for everything else (padded
    batches, generation, the bidirectional vision towers).
torch 2.13's own `torch.nn.attention.varlen.varlen_attn` runs only on CUDA (on CPU: NotImplementedError for
aten::_flash_attention_forward), so it is not an option for the CPU path.

`auto` packs when the attention runs per sample (sdpa, flash_attention_2) and pads with eager, from
tests/bench/train_throughput.py (tiny Qwen2.5-VL, 2-core CPU, quiet; speed relative to padded micro-batches of 8,
medians of 3 interleaved rounds):
    data (padding of padded batches)     block mask over the row   per sample
    short answers, like the demo (6 %)
      forward + backward, same samples            0.69x                 2.02x
      end to end, supervised tokens/s             0.78x                 1.83x
    1-40-word answers (29 %)
      forward + backward, same samples            0.47x                 1.42x
      end to end, supervised tokens/s             0.61x                 1.48x
Per-sample attention wins even with little padding: one packed row runs the layers once for ~40 short
samples where padded batches run them 5 times, and the fixed per-step costs are shared by more samples (an
earlier quiet-machine measurement gave 1.67x/1.44x and 1.41x/1.40x; the spread is the machine's). With
29 % padding, removing it saves at most 1/0.71 = 1.41x of the work, which the varied data reaches.
"""

from __future__ import annotations

from dataclasses import dataclass

SEGMENT_ATTENTION = "medvl_sdpa_segments"


def register() -> None:
    """Make `medvl_sdpa_segments` a known attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, _mask)


def use_segment_attention(model) -> bool:
    """Switch an sdpa model to per-sample attention for packed rows; True if it did. flash_attention_2 needs
    nothing (it reads the same boundaries); eager keeps transformers' block mask."""
    from medvl.models import unwrap_model

    inner = unwrap_model(model)
    if getattr(inner.config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    inner.set_attn_implementation(SEGMENT_ATTENTION)
    return True


def segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """sdpa per sample of a packed row ((1, heads, row, dim) tensors, boundaries in cu_seq_lens_q)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.pop("cu_seq_lens_q", None)
    for k in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(k, None)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if cu is None or not causal:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.shape[0] != 1 or query.shape[2] != key.shape[2] or attention_mask is not None:
        # medvl packs one row per micro-batch, without padding or cache; anything else would need a mask here
        raise ValueError(f"per-sample attention takes one packed row without mask or cache, got a batch of "
                         f"{query.shape[0]}, {query.shape[2]} queries over {key.shape[2]} keys")
    # Every layer (and gradient checkpointing's recompute) gets the same boundary tensor: work out the layout once
    # per forward, not once per layer (on a GPU each .tolist() is a device sync).
    layout = getattr(cu, "_medvl_layout", None)
    if layout is None:
        layout = cu._medvl_layout = segment_layout(cu.tolist(), query.shape[2], query.device)
    if layout.index is None:
        outs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None,
                                       dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0]
                for s, e in zip(layout.bounds[:-1], layout.bounds[1:]) if e > s]
        return torch.cat(outs, dim=1), None  # (1, row, heads, dim), as sdpa_attention_forward returns

    def batched(x):  # (1, heads, row, dim) -> (samples, heads, longest, dim), each sample right-padded
        return x[0].index_select(1, layout.index).unflatten(1, (layout.n, layout.longest)).transpose(0, 1)

    out = sdpa_attention_forward(module, batched(query), batched(key), batched(value), None, dropout=dropout,
                                 scaling=scaling, is_causal=True, **kwargs)[0]  # (samples, longest, heads, dim)
    return out.flatten(0, 1).index_select(0, layout.keep).unsqueeze(0), None


# One sdpa call over the row's samples, right-padded to the longest, costs n x longest^2 attention work instead
# of sum(n_i^2), but saves a kernel call per sample. Measured on the tiny Qwen2.5-VL (CPU, one thread, fwd + bwd
# of one layer's attention over a 2,048-token row): 43 samples of 42-52 tokens (batched work 1.2x the exact)
# 8.5 ms batched vs 13.5 ms per sample; 18 samples of 40-162 tokens (2.4x) 22 ms vs 13 ms. Batch up to 1.5x.
BATCHED_WORK_LIMIT = 1.5


@dataclass
class SegmentLayout:
    """How a packed row's samples are attended: `bounds` (the row's sample boundaries) and, when one padded sdpa
    call is cheaper than one per sample, `index` (row position of every padded slot; a padded slot repeats its
    sample's last token, which only the discarded padded queries can see under the causal mask) and `keep`
    (the padded slot of every row position, in row order)."""

    bounds: list[int]
    index: object = None  # LongTensor, or None: attend per sample
    keep: object = None
    n: int = 0
    longest: int = 0


def segment_layout(bounds: list[int], row: int, device) -> SegmentLayout:
    import torch

    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    starts = [s for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    if not lengths or sum(lengths) != row:
        return SegmentLayout(bounds)
    n, longest = len(lengths), max(lengths)
    if n == 1 or n * longest * longest > BATCHED_WORK_LIMIT * sum(x * x for x in lengths):
        return SegmentLayout(bounds)
    index = [s + min(j, n_i - 1) for s, n_i in zip(starts, lengths) for j in range(longest)]
    keep = [i * longest + j for i, n_i in enumerate(lengths) for j in range(n_i)]
    return SegmentLayout(bounds, torch.tensor(index, device=device), torch.tensor(keep, device=device), n, longest)


def _mask(*args, attention_mask=None, **kwargs):
    # No padding (a packed row, or an unpadded batch): no mask; segment_attention applies causality per sample.
    # With padding (padded batches, generation): exactly sdpa's mask.
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def resolve_packing(setting, attn_implementation: str, lengths: list[int], micro_batch: int,
                    seed: int = 0) -> tuple[bool, str]:
    """(pack?, the run header's line) for data.packing = true / false / "auto"."""
    if setting is True or setting is False:
        return setting, "data.packing: " + str(setting).lower()
    waste = f"padded micro-batches would be {padded_waste(lengths, micro_batch, seed):.0%} padding"
    if attn_implementation == "eager":
        return False, (f"data.packing auto -> padded: eager attention masks a packed row as a whole (measured "
                       f"0.72-0.76x padded on CPU); {waste}")
    how = "flash-attention varlen" if attn_implementation.startswith("flash") else "sdpa per sample"
    return True, f"data.packing auto -> packed: {attn_implementation} attends per sample ({how}); {waste}"


def padded_waste(lengths: list[int], micro_batch: int, seed: int = 0) -> float:
    """Fraction of token slots that are padding in the micro-batches the padded plan of epoch 0 makes."""
    from medvl.data.dataset import epoch_batches

    batches = epoch_batches(lengths, seed=seed, epoch=0, micro_batch=micro_batch, pack_budget=None)
    slots = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths) / slots if slots else 0.0
