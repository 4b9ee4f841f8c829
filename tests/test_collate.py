"""Chat template + loss mask, image-safe truncation, packing equals padding (the training data path)."""

import pytest
import torch
from PIL import Image

from medvl.data.collate import IGNORE, Encoded, Rejected, collate, encode_record, model_inputs, padding_waste
from medvl.families import get_family
from medvl.models import load_model, load_processor

from .conftest import FAMILIES

TEXT = {"id": "t", "messages": [
    {"role": "user", "content": "is there a pleural effusion?"}, {"role": "assistant", "content": "no"},
    {"role": "user", "content": "and a mass?"}, {"role": "assistant", "content": "yes, a small mass"}]}
ONE = {"id": "i1", "messages": [
    {"role": "system", "content": "You are a radiologist."},
    {"role": "user", "content": "<image>what is the blue shape?"}, {"role": "assistant", "content": "circle"}]}
TWO = {"id": "i2", "messages": [
    {"role": "user", "content": "<image>compare with <image> please"},
    {"role": "assistant", "content": "the second is larger"}]}


def _images(n):
    return [Image.new("RGB", (64, 64), "blue"), Image.new("RGB", (120, 64), "green")][:n]


def _trained_text(enc, processor):
    tok = getattr(processor, "tokenizer", processor)
    return tok.decode([t for t in enc.labels if t != IGNORE])


@pytest.fixture(scope="module")
def qwen(tiny_dir):
    path = tiny_dir("qwen2.5-vl")
    return load_model(path).eval(), load_processor(path), get_family("qwen2.5-vl")


def test_mask_all_trains_every_answer_and_end_of_turn_only(qwen):
    _, proc, fam = qwen
    enc = encode_record(TEXT, [], proc, fam, loss_mask="all")
    assert _trained_text(enc, proc) == "no<|im_end|>yes, a small mass<|im_end|>"
    # role prefix and the newline after <|im_end|> are never trained
    tok = proc.tokenizer
    im_start, nl = tok.convert_tokens_to_ids("<|im_start|>"), tok("\n")["input_ids"][0]
    trained = [t for t in enc.labels if t != IGNORE]
    assert im_start not in trained and nl not in trained


def test_mask_last_trains_only_last_answer(qwen):
    _, proc, fam = qwen
    enc = encode_record(TEXT, [], proc, fam, loss_mask="last")
    assert _trained_text(enc, proc) == "yes, a small mass<|im_end|>"


def test_untrainable_turns_are_context(qwen):
    _, proc, fam = qwen
    rec = {"id": "o", "messages": [dict(m) for m in TEXT["messages"]]}
    rec["messages"][3]["train"] = False  # Ovis ignored_gpt
    assert _trained_text(encode_record(rec, [], proc, fam), proc) == "no<|im_end|>"
    rec["messages"][1]["train"] = False
    out = encode_record(rec, [], proc, fam)
    assert isinstance(out, Rejected) and out.reason == "no_supervised_tokens"


def test_image_tokens_expanded_and_never_trained(qwen):
    _, proc, fam = qwen
    enc = encode_record(TWO, _images(2), proc, fam)
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # 64x64 -> 2x2 merged tokens; 120x64 -> smart_resize 112x56 -> 4x2 patches of 28 = 8 merged tokens
    assert enc.input_ids.count(pad) == 4 + 8
    assert all(l == IGNORE for t, l in zip(enc.input_ids, enc.labels) if t == pad)
    assert enc.vision["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8]]


def test_truncation_drops_trailing_turns_not_image_tokens(qwen):
    _, proc, fam = qwen
    rec = {"id": "m", "messages": [
        {"role": "user", "content": "<image>what is the blue shape?"}, {"role": "assistant", "content": "circle"},
        {"role": "user", "content": "<image>and this one? describe it in detail"},
        {"role": "assistant", "content": "a green rectangle " * 20}]}
    full = encode_record(rec, _images(2), proc, fam)
    first = encode_record({"id": "m", "messages": rec["messages"][:2]}, _images(1), proc, fam)
    cut = encode_record(rec, _images(2), proc, fam, max_seq_len=len(full) - 1)
    assert isinstance(cut, Encoded) and cut.dropped_turns == 2 and cut.n_images == 1
    assert cut.input_ids == first.input_ids  # whole turns (and the second image) dropped, nothing cut inside
    too_short = encode_record(rec, _images(2), proc, fam, max_seq_len=len(first) - 1)
    assert isinstance(too_short, Rejected) and too_short.reason == "too_long" and "max_seq_len" in too_short.message


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_loss_equals_unpacked(family, tiny_dir):
    """Text-only, single-image and multi-image samples packed in one row give the same summed loss."""
    fam = get_family(family)
    model, proc = load_model(tiny_dir(family)).eval(), load_processor(tiny_dir(family))
    tok = getattr(proc, "tokenizer", proc)
    pairs = [(TEXT, []), (dict(TEXT, id="t2"), [])] + ([(ONE, _images(1)), (TWO, _images(2))] if fam.is_vision else [])
    encs = [encode_record(r, i, proc, fam) for r, i in pairs]

    def loss_sum(batch):
        logits = model(**model_inputs(model, fam, batch)).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=IGNORE, reduction="sum")

    with torch.no_grad():
        single = sum(float(loss_sum(collate([e], tok.pad_token_id))) for e in encs)
        packed = float(loss_sum(collate(encs, tok.pad_token_id, pack=True)))
        padded = float(loss_sum(collate(encs, tok.pad_token_id)))
    assert packed == pytest.approx(single, rel=1e-5)
    assert padded == pytest.approx(single, rel=1e-5)
    # a broken mask (samples attending to each other) moves the sum by ~0.1 on this model: 1e-5 catches it


def test_mixed_text_and_image_batch_runs(qwen):
    model, proc, fam = qwen
    encs = [encode_record(TEXT, [], proc, fam), encode_record(ONE, _images(1), proc, fam)]
    batch = collate(encs, proc.tokenizer.pad_token_id)
    out = model(**model_inputs(model, fam, batch), labels=batch["labels"])
    assert torch.isfinite(out.loss)


def test_padding_waste():
    lengths = [10, 30, 10, 30]
    assert padding_waste(lengths, 2) == pytest.approx(1 - 80 / 120)
    assert padding_waste(lengths, 1, pack_budget=40) == pytest.approx(0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_measured_length_equals_encoded_length(family, tiny_dir):
    """prepare-data's pixel-free length is exactly the length the trainer will see."""
    from medvl.data.collate import measure

    fam = get_family(family)
    proc = load_processor(tiny_dir(family))
    pairs = [(TEXT, [])] + ([(ONE, _images(1)), (TWO, _images(2))] if fam.is_vision else [])
    for rec, imgs in pairs:
        kept, n, visual, _ = measure(rec, [im.size for im in imgs], proc, fam)
        assert n == len(encode_record(rec, imgs, proc, fam)), rec["id"]
    kept, n, _, _ = measure(TEXT, [], proc, fam, max_seq_len=n - 1 if not fam.is_vision else 10_000)
    if not fam.is_vision:
        assert len(kept) == 2  # trailing exchange dropped, as the trainer would


# Meta-Llama-3-8B-Instruct's chat template: header tokens, trimmed content, <|eot_id|> ends every turn.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")


def _text_tokenizer_with(template, specials, **roles):
    from medvl.tiny import build_tokenizer

    tok = build_tokenizer(get_family("causal-lm"))
    tok.add_special_tokens({"additional_special_tokens": specials})
    for role, value in roles.items():
        setattr(tok, role, value)
    tok.chat_template = template
    return tok


def test_llama3_headers_train_content_and_eot_only():
    tok = _text_tokenizer_with(LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                        "<|eot_id|>"], bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    enc = encode_record(TEXT, [], tok, get_family("causal-lm"))
    assert tok.decode([t for t in enc.labels if t != IGNORE]) == "no<|eot_id|>yes, a small mass<|eot_id|>"


def test_template_without_end_of_turn_token_gets_the_eos_trained():
    """A plain-text template (Vicuna style, no special token after the answer): without the inserted eos the
    model would never learn to stop."""
    template = ("{% for m in messages %}{% if m.role == 'user' %}USER: {{ m.content }} {% else %}ASSISTANT: "
                "{{ m.content }} {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    tok = _text_tokenizer_with(template, [], eos_token="<|endoftext|>")
    enc = encode_record(TEXT, [], tok, get_family("causal-lm"))
    assert tok.decode([t for t in enc.labels if t != IGNORE]) == " no<|endoftext|> yes, a small mass<|endoftext|>"
    assert tok.decode(enc.input_ids).startswith("USER: is there a pleural effusion? ASSISTANT: no<|endoftext|> USER:")


def test_template_that_drops_assistant_text_is_refused_and_rejected():
    from medvl.data.collate import check_template, measure
    from medvl.errors import MedvlError

    template = ("{% for m in messages %}{% if m.role == 'user' %}<|im_start|>user\n{{ m.content }}<|im_end|>\n"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = _text_tokenizer_with(template, [])
    fam = get_family("causal-lm")
    with pytest.raises(MedvlError, match="cannot find the assistant turns"):
        check_template(tok, False)
    with pytest.raises(MedvlError):  # prepare-data's length measurement stops before the first sample
        measure(TEXT, [], tok, fam)
    rejected = encode_record(TEXT, [], tok, fam)  # a sample encoded anyway is rejected, never trained at loss 0
    assert isinstance(rejected, Rejected) and rejected.reason == "template"


def test_no_chat_template_is_a_clear_error():
    from medvl.data.collate import check_template
    from medvl.errors import MedvlError

    tok = _text_tokenizer_with(None, [])
    with pytest.raises(MedvlError, match="no chat template"):
        check_template(tok, False, where="my-model")


def test_prepare_measures_the_inserted_eos():
    """prepare-data's exact length counts the eos inserted after each answer (the trainer sees it)."""
    from medvl.data.collate import measure

    template = ("{% for m in messages %}{% if m.role == 'user' %}USER: {{ m.content }} {% else %}ASSISTANT: "
                "{{ m.content }} {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    tok = _text_tokenizer_with(template, [], eos_token="<|endoftext|>")
    fam = get_family("causal-lm")
    _, n, _, _ = measure(TEXT, [], tok, fam)
    assert n == len(encode_record(TEXT, [], tok, fam))


def test_answer_ending_in_whitespace_keeps_the_templates_end_of_turn(qwen):
    """"yes\\n" renders "yes\\n<|im_end|>": the <|im_end|> is the turn's end, no eos is inserted."""
    _, proc, fam = qwen
    rec = {"id": "w", "messages": [{"role": "user", "content": "is it?"}, {"role": "assistant", "content": "yes\n"}]}
    enc = encode_record(rec, [], proc, fam)
    assert _trained_text(enc, proc) == "yes\n<|im_end|>"
    assert proc.tokenizer.decode(enc.input_ids).count("<|im_end|>") == 3  # system, user, assistant: none added


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_qwen_image_expansion_equals_the_processor(family, tiny_dir, monkeypatch):
    """The Qwen-VL encoding skips the processor's text pass (collate._expand_qwen_images): ids, labels, token
    types and pixel tensors must be exactly the processor's, for one and several images of different sizes,
    multi-turn samples (with truncation), an image inside an assistant turn, and a text-only sample."""
    import medvl.data.collate as collate_mod
    from medvl.models import apply_resolution

    fam = get_family(family)
    proc = load_processor(tiny_dir(family), fam)
    apply_resolution(proc, fam, 3136, 50176)
    big = Image.new("RGB", (300, 180), "white")
    late = {"id": "late", "messages": [
        {"role": "user", "content": "<image>first?"}, {"role": "assistant", "content": "a circle"},
        {"role": "user", "content": "and this <image>"}, {"role": "assistant", "content": "see <image> here"}]}
    cases = [(ONE, _images(1), None), (TWO, _images(2), None), (late, _images(2) + [big], None),
             (late, _images(2) + [big], 60), (TEXT, [], None)]
    fast_calls = []
    real = collate_mod._expand_qwen_images
    monkeypatch.setattr(collate_mod, "_expand_qwen_images", lambda *a: fast_calls.append(real(*a)) or fast_calls[-1])
    fast = [encode_record(r, imgs, proc, fam, max_seq_len=m) for r, imgs, m in cases]
    assert len(fast_calls) >= len(cases) and all(e is not None for e in fast_calls)  # the fast path ran, every time
    monkeypatch.setattr(collate_mod, "_expand_qwen_images", lambda *a: None)  # the processor's own path
    slow = [encode_record(r, imgs, proc, fam, max_seq_len=m) for r, imgs, m in cases]
    for a, b in zip(fast, slow):
        assert type(a) is type(b)
        if not hasattr(a, "input_ids"):
            assert (a.reason, a.message) == (b.reason, b.message)
            continue
        assert a.input_ids == b.input_ids and a.labels == b.labels
        assert a.mm_token_type_ids == b.mm_token_type_ids and a.n_images == b.n_images
        assert a.dropped_turns == b.dropped_turns and a.vision.keys() == b.vision.keys()
        assert all(torch.equal(a.vision[k], b.vision[k]) for k in a.vision)
    assert fast[3].dropped_turns == 2 and fast[2].n_images == 3  # truncation really cut, all images really ran
