"""The chunked loss (no full-vocabulary logits) equals the plain one, value and gradients, on every family:
packed and padded batches, LoRA and full fine-tuning."""

import pytest
import torch

from medvl.data.collate import IGNORE, collate, encode_record
from medvl.engine.loss import chunked_cross_entropy_sum, logits_bytes, supervised_tokens, token_loss_sum
from medvl.plan import Plan, apply_plan
from medvl.families import get_family
from medvl.models import load_model, load_processor

from .conftest import FAMILIES
from .test_collate import ONE, TEXT, TWO, _images

FULL = Plan({"vision": "full", "projector": "full", "language": "full", "head": "full"}, {})
LORA = Plan({"vision": "lora", "projector": "lora", "language": "lora", "head": "frozen"}, {}, lora_dropout=0.0)


def _batch(family, proc, pack):
    fam = get_family(family)
    tok = getattr(proc, "tokenizer", proc)
    pairs = [(TEXT, []), (dict(TEXT, id="t2"), [])] + ([(ONE, _images(1)), (TWO, _images(2))] if fam.is_vision else [])
    return collate([encode_record(r, i, proc, fam) for r, i in pairs], tok.pad_token_id, pack=pack)


def _loss_and_grads(model, family, batch, chunk):
    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model, get_family(family), batch, chunk_tokens=chunk)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_and_gradients_equal_plain(family, pack, method, tiny_dir):
    torch.manual_seed(0)
    model = apply_plan(load_model(tiny_dir(family)), get_family(family), FULL if method == "full" else LORA)
    model.train()
    if method == "lora":  # peft starts lora_B at zero: give the adapters weight so their gradients are non-trivial
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    batch = _batch(family, load_processor(tiny_dir(family)), pack)
    assert supervised_tokens(batch) > 7
    plain, g_plain = _loss_and_grads(model, family, batch, None)
    # 7-token chunks: several chunks per batch, the last one short
    chunked, g_chunked = _loss_and_grads(model, family, batch, 7)
    assert chunked == pytest.approx(plain, rel=1e-5)
    assert g_chunked.keys() == g_plain.keys() and len(g_plain) > 0
    if method == "full":
        assert any("lm_head" in n for n in g_plain)  # the head trains through the chunked path too
    else:
        assert all("lora_" in n for n in g_plain)
    for name, g in g_plain.items():
        torch.testing.assert_close(g_chunked[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_sum_matches_cross_entropy_and_handles_no_tokens():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    h = torch.randn(23, 8, requires_grad=True)
    t = torch.randint(0, 50, (23,))
    ref = torch.nn.functional.cross_entropy(head(h), t, reduction="sum")
    got = chunked_cross_entropy_sum(head, h, t, chunk_tokens=5)
    assert float(got) == pytest.approx(float(ref), rel=1e-6)
    (gh_ref,) = torch.autograd.grad(ref, h)
    (gh,) = torch.autograd.grad(got, h)
    torch.testing.assert_close(gh, gh_ref)
    empty = chunked_cross_entropy_sum(head, h[:0], t[:0])
    assert float(empty) == 0.0
    empty.backward()
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) == 0.0


def test_chunked_forward_returns_no_logits(tiny_dir):
    """The model's own forward must not project the vocabulary: the head sees an empty slice."""
    family = "causal-lm"
    model = load_model(tiny_dir(family))
    proc = load_processor(tiny_dir(family))
    batch = _batch(family, proc, pack=False)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    try:
        token_loss_sum(model, get_family(family), batch, chunk_tokens=4)
    finally:
        handle.remove()
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    vocab = model.config.vocab_size
    # one empty projection inside the forward, then ceil(n / 4) chunks of supervised tokens only
    assert seen[0] == (batch["input_ids"].shape[0], 0, vocab)
    assert sum(s[0] for s in seen[1:]) == n and max(s[0] for s in seen[1:]) == 4


def test_logits_bytes():
    assert logits_bytes(4096, 151936, None) == 4096 * 151936 * 12
    assert logits_bytes(4096, 151936) == 1024 * 151936 * 12
    assert logits_bytes(100, 151936) == 100 * 151936 * 12


@pytest.mark.parametrize("method", ["full", "lora"])
def test_chunked_loss_under_gradient_checkpointing_trains(method, tiny_dir, prepared_vqa, tmp_path):
    """Recomputed decoder layers (use_reentrant=False) and the captured head input work together."""
    from medvl.engine.train import train

    from .test_train import recipe

    extra = ["method=lora", "optim.lr=5e-3"] if method == "lora" else []
    res = train(recipe(tiny_dir("qwen2.5-vl"), prepared_vqa, tmp_path / "run", "train.max_steps=6",
                       "train.gradient_checkpointing=true", "train.vision_gradient_checkpointing=true", *extra))
    assert all(torch.isfinite(torch.tensor(res.losses))) and res.losses[-1] < res.losses[0]


def test_logit_transform_check_sees_the_model_config_inside_a_deepspeed_engine(tiny_dir):
    """A DeepSpeedEngine forwards get_output_embeddings to its model but its `config` is DeepSpeed's: the loss
    must unwrap it by type, or a soft-capping model would take the chunked path (which skips the capping)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    from medvl.engine.loss import _transforms_logits
    from medvl.models import unwrap_model

    model = load_model(tiny_dir("causal-lm"))
    model.config.final_logit_softcapping = 30.0
    engine = DeepSpeedEngine.__new__(DeepSpeedEngine)  # the wrapper as DeepSpeed leaves it, without a process group
    torch.nn.Module.__init__(engine)
    engine.__dict__["module"] = model  # where DeepSpeed keeps it (its __getattr__ forwards through this)
    engine.__dict__["config"] = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    assert engine.get_output_embeddings() is model.lm_head  # forwarded: looking like a model is not enough
    assert unwrap_model(engine) is model and _transforms_logits(unwrap_model(engine))
