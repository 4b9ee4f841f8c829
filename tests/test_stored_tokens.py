"""Text tokens stored by prepare-data: the loader's samples are identical with and without them, they are really
used (the template is not rendered again), and they are ignored when the encoding they were made under differs."""

import json

import pytest
import torch
from PIL import Image

from medvl.data import collate as collate_mod
from medvl.data.collate import encode_record, measure
from medvl.data.dataset import EncodedDataset, index_prepared
from medvl.data.prepare import prepare
from medvl.data.stored_tokens import from_stored, text_encoding_key, to_stored
from medvl.engine.batches import load_image, text_tokens_note
from medvl.families import get_family
from medvl.models import load_processor

from .conftest import FAMILIES

MULTI = {"id": "m", "messages": [
    {"role": "system", "content": "You are a radiologist."},
    {"role": "user", "content": "<image>\nwhat organ is this?"}, {"role": "assistant", "content": "the liver",
                                                                   "train": False},
    {"role": "user", "content": "and this one? <image>"}, {"role": "assistant", "content": "a kidney, left side\n"},
    {"role": "user", "content": "thanks"}]}  # ends on a user turn: the trainable prefix drops it
TEXT = {"id": "t", "messages": [{"role": "user", "content": "fever for 3 days, what next?"},
                                {"role": "assistant", "content": "see a doctor today"},
                                {"role": "user", "content": "and if it passes?"},
                                {"role": "assistant", "content": "rest and fluids"}]}
ONE = {"id": "o", "messages": [{"role": "user", "content": "<image>\nwhat colour?"},
                               {"role": "assistant", "content": "blue"}]}


def _images(n):
    return [Image.new("RGB", (64, 64), "blue"), Image.new("RGB", (150, 70), "green")][:n]


def _same(a, b):
    if not hasattr(a, "input_ids") or not hasattr(b, "input_ids"):  # a Rejected: the same verdict
        assert a == b
        return
    assert (a.input_ids, a.labels, a.mm_token_type_ids, a.n_images, a.dropped_turns) == \
           (b.input_ids, b.labels, b.mm_token_type_ids, b.n_images, b.dropped_turns)
    assert sorted(a.vision) == sorted(b.vision)
    for k in a.vision:
        assert torch.equal(a.vision[k], b.vision[k]), k


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("loss_mask", ["all", "last"])
def test_stored_text_gives_the_same_sample_as_encoding_afresh(family, loss_mask, tiny_dir, monkeypatch):
    fam = get_family(family)
    proc = load_processor(tiny_dir(family))
    key = text_encoding_key(proc, fam, loss_mask)
    if family in ("llava", "internvl"):
        assert key is None  # their processors tokenize the text themselves: nothing to store
        return
    assert key
    pairs = [(TEXT, [])] + ([(ONE, _images(1)), (MULTI, _images(2))] if fam.is_vision else [])
    for rec, imgs in pairs:
        kept, n, visual, text = measure(rec, [im.size for im in imgs], proc, fam, loss_mask=loss_mask)
        prepared = {**rec, "messages": kept}
        stored = from_stored(json.loads(json.dumps(to_stored(*text))))  # through JSON, as a shard holds it
        assert stored == tuple(text)
        with monkeypatch.context() as m:  # afresh and through the processor itself (no Qwen expansion rule)
            m.setattr(collate_mod, "_expand_qwen_images", lambda *a: None)
            fresh = encode_record(prepared, imgs[:len(visual)], proc, fam, loss_mask=loss_mask)
        with monkeypatch.context() as m:  # the stored ids are used: no template rendering, no tokenizer call
            m.setattr(collate_mod, "encode_text", lambda *a, **k: pytest.fail("re-encoded the text"))
            fast = encode_record(prepared, imgs[:len(visual)], proc, fam, loss_mask=loss_mask, stored=stored)
        _same(fast, fresh)
        assert len(fast) == n
        # cut shorter at training time than at prepare time: re-encoded, same as without stored ids
        if len(kept) > 2:
            limit = n - 1
            assert rec is not TEXT or hasattr(encode_record(prepared, [], proc, fam, max_seq_len=limit), "input_ids")
            _same(encode_record(prepared, imgs[:len(visual)], proc, fam, loss_mask=loss_mask, max_seq_len=limit,
                                stored=stored),
                  encode_record(prepared, imgs[:len(visual)], proc, fam, loss_mask=loss_mask, max_seq_len=limit))


def test_key_changes_with_template_loss_mask_and_tokenizer(tiny_dir):
    fam = get_family("qwen2.5-vl")
    proc = load_processor(tiny_dir("qwen2.5-vl"))
    key = text_encoding_key(proc, fam, "all")
    assert key == text_encoding_key(load_processor(tiny_dir("qwen2.5-vl")), fam, "all")  # stable across loads
    assert key != text_encoding_key(proc, fam, "last")
    proc.chat_template = proc.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert key != text_encoding_key(proc, fam, "all")
    proc = load_processor(tiny_dir("qwen2.5-vl"))
    proc.tokenizer.add_tokens(["<finding>"])
    assert key != text_encoding_key(proc, fam, "all")
    proc = load_processor(tiny_dir("qwen2.5-vl"))
    proc.tokenizer.split_special_tokens = True  # <|im_start|> would tokenize as its pieces
    assert key != text_encoding_key(proc, fam, "all")


def test_key_ignores_the_padding_a_call_leaves_and_follows_the_libraries(tiny_dir, monkeypatch):
    """A batched, padded or truncating call leaves its settings on the tokenizer's backend (and save_pretrained
    writes them out): the same tokenizer must keep its key. Another transformers or tokenizers must not."""
    import medvl.versions

    fam = get_family("qwen2.5-vl")
    proc = load_processor(tiny_dir("qwen2.5-vl"))
    key = text_encoding_key(proc, fam, "all")
    proc.tokenizer(["a", "bbb ccc ddd"], padding=True)
    proc.tokenizer(["a" * 50], truncation=True, max_length=4)
    assert proc.tokenizer.backend_tokenizer.truncation or proc.tokenizer.backend_tokenizer.padding
    assert text_encoding_key(proc, fam, "all") == key
    real = medvl.versions.library_versions
    monkeypatch.setattr(medvl.versions, "library_versions",
                        lambda pkgs=(): {**real(pkgs), "tokenizers": "0.0.1"})
    assert text_encoding_key(proc, fam, "all") != key


def test_stored_form_round_trips_and_is_compact():
    ids, labels = [5, 151_643, 7, 16_777_215, 9, 0], [-100, 151_643, 7, -100, 9, 0]
    stored = to_stored(ids, labels)
    assert stored["train"] == [[1, 3], [4, 6]] and len(stored["ids"]) == 4 * len(ids)  # 4 characters a token
    assert from_stored(json.loads(json.dumps(stored))) == (ids, labels)
    assert from_stored(to_stored([], [])) == ([], [])
    assert to_stored([1 << 24], [-100]) is None  # not representable: left to the loader


@pytest.fixture
def raw(tmp_path):
    d = tmp_path / "raw"
    (d / "images").mkdir(parents=True)
    rows = []
    for i in range(5):
        Image.new("RGB", (60 + 20 * i, 64), (50 * i, 80, 160)).save(d / "images" / f"{i}.png")
        rows.append({"id": i, "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": f"square {i}"},
            {"from": "human", "value": "Anything else?"}, {"from": "gpt", "value": "no" + " more" * i}]})
    rows.append({"id": "text", "conversations": [{"from": "human", "value": "a cough?"},
                                                 {"from": "gpt", "value": "how long has it lasted?"}]})
    (d / "llava.json").write_text(json.dumps(rows))
    return d


def _dataset(path, proc, fam, **kw):
    return EncodedDataset(index_prepared([path]), proc, fam, loss_mask=kw.get("loss_mask", "all"),
                          max_seq_len=kw.get("max_seq_len", 4096), load_image=load_image)


def test_prepared_records_carry_tokens_and_the_loader_uses_them(raw, tmp_path, tiny_dir):
    model = tiny_dir("qwen2.5-vl")
    fam = get_family("qwen2.5-vl")
    prepare([raw / "llava.json"], tmp_path / "with", model=str(model))
    prepare([raw / "llava.json"], tmp_path / "without")
    manifest = json.loads((tmp_path / "with" / "manifest.json").read_text())
    proc = load_processor(model)
    assert manifest["text_encoding_key"] == text_encoding_key(proc, fam, "all")
    assert json.loads((tmp_path / "without" / "manifest.json").read_text())["text_encoding_key"] is None
    records = [json.loads(line) for line in open(tmp_path / "with" / "data-00000.jsonl")]
    assert len(records) == 6 and all(r["meta"]["tokens"]["train"] for r in records)

    stored, plain = _dataset(tmp_path / "with", proc, fam), _dataset(tmp_path / "without", proc, fam)
    assert stored.stored_count(range(6)) == 6 and plain.stored_count(range(6)) == 0
    assert text_tokens_note(stored, list(range(6))) == "text tokens: stored by prepare-data for all 6 samples"
    assert "prepared without --model" in text_tokens_note(plain, list(range(6)))
    assert "the manifest names no text encoding" in text_tokens_note(plain, list(range(6)))
    for i in range(6):
        _same(stored[i], plain[i])
    short = _dataset(tmp_path / "with", proc, fam, max_seq_len=len(stored[4]) - 1)
    assert short[4].dropped_turns == 2 and len(short[4]) < len(stored[4])  # cut at training time, re-encoded

    # the same data under another loss mask or template: the stored ids are ignored, and the header says why
    last = _dataset(tmp_path / "with", proc, fam, loss_mask="last")
    assert last.stored_count(range(6)) == 0
    assert "another tokenizer, chat template, loss mask or library versions" in text_tokens_note(last, list(range(6)))
    assert last[0].labels != stored[0].labels  # "last" trains only the second answer: really re-encoded
    other = load_processor(model)
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert _dataset(tmp_path / "with", other, fam).stored_count(range(6)) == 0


def test_llava_data_is_encoded_in_the_loader_and_says_so(raw, tmp_path, tiny_dir):
    model = tiny_dir("llava")
    prepare([raw / "llava.json"], tmp_path / "out", model=str(model))
    records = [json.loads(line) for line in open(tmp_path / "out" / "data-00000.jsonl")]
    assert not any("tokens" in r["meta"] for r in records)
    ds = _dataset(tmp_path / "out", load_processor(model), get_family("llava"))
    assert "processor tokenizes the text itself" in text_tokens_note(ds, list(range(6)))
