"""medvl.detokenize: streamed pieces add up to the decode of all tokens, at a cost per token that stays flat."""

from __future__ import annotations

import random

import pytest

from medvl.detokenize import IncrementalDetokenizer

# Multi-byte text: the tiny byte-level BPE has learned no merge for these, so each character is 2-4 byte tokens.
MULTIBYTE = ["肺部CT显示磨玻璃影。", "Befund: Pleuraerguss, Röntgen ↑ 😷🫁 naïve café", "🧑‍⚕️ Ödem — ≥ 5 mm, ½"]


@pytest.fixture(scope="module")
def tok():
    from medvl.families import get_family
    from medvl.tiny import build_tokenizer

    return build_tokenizer(get_family("qwen2.5-vl"))


def pieces(tok, ids, **kw) -> tuple[list[str], IncrementalDetokenizer]:
    d = IncrementalDetokenizer(tok, **kw)
    out = [d.add(t) for t in ids]
    out.append(d.finish())
    return out, d


def test_multibyte_characters_split_across_tokens_come_out_whole(tok):
    for text in MULTIBYTE:
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) > len(text)  # really split: several tokens per character
        got, _ = pieces(tok, ids)
        assert "".join(got) == tok.decode(ids, skip_special_tokens=True) == text
        assert all("\ufffd" not in p for p in got)  # never half a character on the wire
        assert len([p for p in got if p]) > 3  # and streamed, not held back to the end


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_sequences_add_up_to_the_whole_decode(tok, skip):
    """Property: for random ids (byte tokens that form partial, complete and invalid UTF-8, merged tokens,
    special tokens) the joined pieces equal tokenizer.decode(all ids), at every length."""
    rng = random.Random(1234)
    vocab = len(tok)
    specials = tok.all_special_ids
    byte_ids = [i for i in tok.encode("".join(MULTIBYTE), add_special_tokens=False)]
    for trial in range(300):
        n = rng.randint(1, 60)
        ids = []
        while len(ids) < n:
            r = rng.random()
            if r < 0.4:  # a run of the bytes of real multi-byte characters, possibly cut anywhere
                start = rng.randrange(len(byte_ids))
                ids += byte_ids[start:start + rng.randint(1, 6)]
            elif r < 0.45:
                ids.append(rng.choice(specials))
            else:
                ids.append(rng.randrange(vocab))
        got, d = pieces(tok, ids, skip_special_tokens=skip)
        want = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(got) == want == d.text, (trial, ids)


def test_skipped_ids_never_show(tok):
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode("Hello there", add_special_tokens=False) + [eos]
    got, _ = pieces(tok, ids, skip_special_tokens=False, skip_ids={eos})
    assert "".join(got) == "Hello there"


def test_cost_per_token_does_not_grow_with_the_answer(tok):
    """Count what is decoded, not time: the whole-answer decode at every token decoded n(n+1)/2 tokens."""
    calls: list[int] = []

    class Counting:
        def decode(self, ids, **kw):
            calls.append(len(ids))
            return tok.decode(ids, **kw)

    block = " ".join(["The chest radiograph shows a small left pleural effusion.", *MULTIBYTE])
    text = "\n".join([block] * 30)  # the same mix throughout: early and late tokens are alike
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 1500
    got, d = pieces(Counting(), ids)
    assert "".join(got) == text
    assert max(calls) <= 8  # the window: the last piece plus the tokens of one unfinished character
    assert d.decoded_tokens == sum(calls) <= 6 * len(ids)  # linear; the quadratic way: ~n^2/2 > 1,000,000
    third = len(calls) // 3
    first, last = calls[:third], calls[-third:]
    assert sum(last) <= sum(first) * 1.1  # the last third of the answer cost what the first did


def test_the_servers_rows_stream_multibyte_answers_whole_and_stop_on_end_of_turn(tok):
    """medvl.server.batching._Row streams through the detokenizer: Chinese and emoji split over byte tokens come
    out whole, the end-of-turn token ends the row and never shows, and the final text is the full decode."""
    from types import SimpleNamespace

    from medvl.server.batching import Job, _Row

    eos = tok.convert_tokens_to_ids("<|im_end|>")
    text = " ".join(MULTIBYTE)
    ids = tok.encode(text, add_special_tokens=False)
    events = []
    row = _Row(Job(request=None, emit=events.append), limit=len(ids) + 5,
               bot=SimpleNamespace(tokenizer=tok, eos=[eos]), prompt_tokens=7)
    for t in ids + [eos, 123]:  # a token after the end of turn is padding
        row.add(t)
    deltas = [e.delta for e in events if not e.done]
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas) and len(deltas) > 10
    final = events[-1]
    assert final.done and final.finish_reason == "stop" and final.text == text.strip()
    assert final.completion_tokens == len(ids) + 1


def test_chatbot_streams_through_it(tiny_dir):
    """Chatbot.stream (medvl chat) decodes a few tokens per generated token, not the answer so far; only the
    final answer text is decoded whole, once."""
    from medvl import Chatbot
    from medvl.inference import GenerationOptions

    bot = Chatbot(tiny_dir("causal-lm"), device="cpu", options=GenerationOptions(max_new_tokens=48))
    calls: list[int] = []
    decode = bot.tokenizer.decode

    def counting(ids, **kw):
        calls.append(len(ids))
        return decode(ids, **kw)

    bot.tokenizer.decode = counting
    pieces = list(bot.stream("Describe the findings."))
    n = bot.last.tokens
    assert n > 20 and "".join(pieces).strip() == bot.last.text
    streaming = calls[:-1]  # the last call is the reply's text, decoded whole once
    assert calls[-1] >= n - 1 and len(streaming) >= n - 1 and max(streaming) <= 8
