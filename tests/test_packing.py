"""Per-sample attention for packed rows (medvl_sdpa_segments) and `data.packing: auto`."""

import pytest
import torch

from medvl.data.collate import collate, encode_record, model_inputs
from medvl.engine import packing
from medvl.engine.loss import token_loss_sum
from medvl.families import get_family
from medvl.models import load_model, load_processor

from .conftest import FAMILIES
from .test_collate import ONE, TEXT, TWO, _images


def _encs(family, proc):
    fam = get_family(family)
    pairs = [(TEXT, []), (dict(TEXT, id="t2"), [])] + ([(ONE, _images(1)), (TWO, _images(2))] if fam.is_vision else [])
    return [encode_record(r, i, proc, fam) for r, i in pairs]


@pytest.mark.parametrize("batched", [False, True], ids=["per-sample", "batched"])
@pytest.mark.parametrize("family", FAMILIES)
def test_segment_attention_packed_equals_unpacked(family, batched, tiny_dir, monkeypatch):
    """Both ways of attending a packed row (one sdpa call per sample, or one over the samples right-padded)."""
    monkeypatch.setattr(packing, "BATCHED_WORK_LIMIT", float("inf") if batched else 0.0)
    fam = get_family(family)
    model, proc = load_model(tiny_dir(family)).eval(), load_processor(tiny_dir(family))
    pad = getattr(proc, "tokenizer", proc).pad_token_id
    encs = _encs(family, proc)
    with torch.no_grad():
        single = sum(float(token_loss_sum(model, fam, collate([e], pad))) for e in encs)
        assert packing.use_segment_attention(model)
        calls = []
        real = packing.segment_attention
        monkeypatch.setattr(packing, "segment_attention",
                            lambda *a, **k: calls.append(k.get("cu_seq_lens_q")) or real(*a, **k))
        packing.register()
        packed_batch = collate(encs, pad, pack=True)
        packed = float(token_loss_sum(model, fam, packed_batch))
        padded = float(token_loss_sum(model, fam, collate(encs, pad)))
    assert packed == pytest.approx(single, rel=1e-5)
    assert padded == pytest.approx(single, rel=1e-5)
    # every language layer of the packed forward ran per sample, with the row's boundaries
    text_calls = [c for c in calls if c is not None]
    assert len(text_calls) == model.config.get_text_config().num_hidden_layers
    bounds = [0] + packed_batch["seq_lens"].cumsum(0).tolist()
    assert all(c.tolist() == bounds for c in text_calls)
    assert (text_calls[0]._medvl_layout.index is not None) == batched


def test_layout_batches_samples_of_similar_length_only():
    row = [0, 40, 85, 130]  # 40, 45, 45 tokens: 3 x 45^2 = 1.1x the exact work -> one padded call
    lay = packing.segment_layout(row, 130, "cpu")
    assert (lay.n, lay.longest) == (3, 45)
    assert lay.index.tolist()[:46] == list(range(40)) + [39] * 5 + [40]  # sample 0 padded with its last token
    assert lay.keep.tolist() == list(range(40)) + list(range(45, 135))
    assert packing.segment_layout([0, 10, 160], 160, "cpu").index is None  # 2 x 150^2 = 4x the work: per sample
    assert packing.segment_layout([0, 50], 50, "cpu").index is None  # one sample: nothing to batch


@pytest.mark.parametrize("family", [f for f in FAMILIES if get_family(f).is_vision])
def test_sample_boundaries_never_reach_the_vision_tower(family, tiny_dir):
    """The row's cu_seq_lens are for the language model only: a vision tower given them would (with flash
    attention) attend over the text's boundaries, or fail on its own cu_seq_lens keyword."""
    model, proc = load_model(tiny_dir(family)), load_processor(tiny_dir(family))
    seen = []
    layout = get_family(family).layout
    text_keys = {"cu_seq_lens_q", "max_length_q"}
    for name, mod in model.named_modules():
        if any((name + ".").startswith(p) for p in layout.vision):
            mod.register_forward_pre_hook(lambda m, a, k: seen.append(bool(text_keys & set(k))), with_kwargs=True)
    batch = collate(_encs(family, proc), getattr(proc, "tokenizer", proc).pad_token_id, pack=True)
    assert "cu_seq_lens_q" in model_inputs(model, get_family(family), batch)
    with torch.no_grad():
        token_loss_sum(model, get_family(family), batch)
    assert seen and not any(seen)


@pytest.mark.parametrize("batched", [False, True], ids=["per-sample", "batched"])
def test_segment_attention_gradients_equal_block_mask(batched, tiny_dir, monkeypatch):
    """Training through per-sample sdpa gives the gradients of transformers' block-mask path."""
    monkeypatch.setattr(packing, "BATCHED_WORK_LIMIT", float("inf") if batched else 0.0)
    family = "qwen2.5-vl"
    fam = get_family(family)
    proc = load_processor(tiny_dir(family))
    batch = collate(_encs(family, proc), getattr(proc, "tokenizer", proc).pad_token_id, pack=True)
    grads = []
    for segments in (False, True):
        model = load_model(tiny_dir(family))
        if segments:
            packing.use_segment_attention(model)
        token_loss_sum(model, fam, batch).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_packed_inputs_carry_sample_boundaries(tiny_dir):
    family = "causal-lm"
    proc = load_processor(tiny_dir(family))
    model = load_model(tiny_dir(family))
    encs = _encs(family, proc)
    kw = model_inputs(model, get_family(family), collate(encs, proc.pad_token_id, pack=True))
    n = [len(e) for e in encs]
    assert kw["cu_seq_lens_q"].tolist() == [0, n[0], n[0] + n[1]] and kw["max_length_q"] == max(n)
    assert "cu_seq_lens_q" not in model_inputs(model, get_family(family), collate(encs, proc.pad_token_id))


def test_eager_models_keep_the_block_mask(tiny_dir):
    model = load_model(tiny_dir("causal-lm"), attn_implementation="eager")
    assert not packing.use_segment_attention(model)
    assert model.config._attn_implementation == "eager"


def test_auto_packs_where_attention_runs_per_sample():
    uneven = [20, 200] * 32
    pack, why = packing.resolve_packing("auto", "sdpa", uneven, 8)
    assert pack is True and why.startswith("data.packing auto -> packed: sdpa attends per sample")
    assert why.endswith(f"padded micro-batches would be {packing.padded_waste(uneven, 8):.0%} padding")
    assert packing.resolve_packing("auto", "flash_attention_2", uneven, 8)[0] is True
    pack, why = packing.resolve_packing("auto", "eager", uneven, 8)
    assert pack is False and "eager attention masks a packed row as a whole" in why
    assert packing.resolve_packing(True, "eager", uneven, 8) == (True, "data.packing: true")
    assert packing.resolve_packing(False, "sdpa", uneven, 8) == (False, "data.packing: false")


def test_padded_waste_of_the_planned_batches():
    assert packing.padded_waste([100] * 16, 8) == 0.0
    # every padded batch of 2 holds one 20- and one 200-token sample, or two of one kind: at most 45 % padding
    assert 0.0 < packing.padded_waste([20, 200] * 8, 2) <= 1 - 220 / 400 + 1e-9


def test_auto_packing_trains_and_says_which_in_the_header(tiny_dir, prepared_vqa, tmp_path):
    from medvl.engine.metrics import ListSink
    from medvl.engine.train import train

    from .test_train import recipe

    sink = ListSink()
    # sdpa: auto packs (and runs medvl_sdpa_segments); the header says so with the padding it avoids
    res = train(recipe(tiny_dir("qwen2.5-vl"), prepared_vqa, tmp_path / "run", "data.packing=auto",
                       "train.max_steps=4"), sinks=[sink])
    start = next(e for e in sink.events if e["kind"] == "start")
    assert start["packing"].startswith("data.packing auto -> packed: sdpa attends per sample")
    assert start["packing"].endswith("% padding")
    assert all(torch.isfinite(torch.tensor(res.losses)))
    train_events = [e for e in sink.events if e["kind"] == "train"]
    assert all(e["input_tokens_per_s"] > 0 and e["tokens_per_s"] > 0 for e in train_events)
    assert all("mfu" not in e for e in train_events)  # CPU: no known peak, no invented MFU


@pytest.mark.slow
def test_packed_rows_under_ddp_match_one_process(tiny_dir, prepared_vqa, tmp_path):
    """2 DDP processes on packed Qwen2.5-VL rows (per-sample sdpa, mRoPE positions through the DDP wrapper) follow
    one process with grad_accum 2 over the same rows."""
    import json

    from medvl.engine.launch import run_launched
    from medvl.engine.train import train

    from .test_train import recipe

    common = ["train.max_steps=3", "data.packing=true", "data.max_seq_len=128"]
    ref = train(recipe(tiny_dir("qwen2.5-vl"), prepared_vqa, tmp_path / "single", *common, "train.grad_accum=2"))
    r = recipe(tiny_dir("qwen2.5-vl"), prepared_vqa, tmp_path / "run", *common, "distributed.nproc=2",
               "distributed.strategy=ddp")
    assert run_launched(r, worker="medvl.commands.worker", timeout=600) == 0
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")
              if json.loads(line)["kind"] == "train"]
    assert losses == pytest.approx(ref.losses, abs=1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if get_family(f).mrope])
def test_packed_mrope_positions_equal_per_sample_ones(family, tiny_dir):
    """One rope-index call over the row, offsets removed, equals each sample's own positions stacked."""
    from medvl.data.collate import packed_mrope_position_ids

    model, proc = load_model(tiny_dir(family)), load_processor(tiny_dir(family))
    encs = _encs(family, proc)
    encs = [encs[2], encs[0], encs[3], encs[1]]  # image, text, two images, text: offsets after every kind
    pad = proc.tokenizer.pad_token_id
    got = packed_mrope_position_ids(model, collate(encs, pad, pack=True))
    want = []
    for e in encs:
        one = collate([e], pad)
        if e.n_images:
            pos, _ = model.model.get_rope_index(one["input_ids"], mm_token_type_ids=one["mm_token_type_ids"],
                                                image_grid_thw=one["image_grid_thw"],
                                                attention_mask=torch.ones_like(one["input_ids"]))
        else:
            pos = torch.arange(len(e)).view(1, 1, -1).expand(3, 1, -1)
        want.append(torch.cat([torch.arange(len(e)).view(1, 1, -1), pos.long()], dim=0))
    want = torch.cat(want, dim=2)
    assert got.shape == (4, 1, sum(len(e) for e in encs))
    assert torch.equal(got, want)
    assert int(want[1:].max()) < max(len(e) for e in encs)  # positions restart: never the row's length
