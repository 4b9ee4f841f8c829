"""Chat template -> text + trained character spans, for any template, derived by rendering.

Nothing here knows a family's format. Everything is read off the checkpoint's own chat template:

- **Where an assistant turn starts**: the conversation up to turn i rendered with `add_generation_prompt=True`
  is a prefix of the full rendering; the assistant's trained span starts where that prefix ends (so what the
  template puts after its generation prompt, e.g. GLM-4's newline after `<|assistant|>`, is trained too: the
  model has to produce it).
- **How it ends**: the first special token of the tokenizer that directly follows the assistant's text
  (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, `<|user|>` between GLM-4 turns). Templates that end an
  assistant turn with no special token at all (llava-1.5-hf renders `ASSISTANT: text USER: ...`, HuatuoGPT-Vision
  `<|assistant|>\\ntext \\n`, GLM-4's last turn) get the tokenizer's eos inserted right after the text, as their
  own training code did (LLaVA's `</s>` separator, GLM-4's final eos); without it the model never learns to stop.
- **BOS**: a tokenizer that puts a bos in front of what it tokenizes (llava-1.5's `<s>`) under a template that
  does not write one gets it in front of the rendering, as the model's own processor call gives it; medvl
  tokenizes rendered text without special tokens everywhere, so this is where the bos comes from.
- **Image placeholders**: templates whose image block already ends in a newline (`<image>\\n` for LLaVA,
  `<IMG_CONTEXT>\\n` for InternVL) get the normalized `<image>\\nQ` as image + `Q`, so the prompt is the official
  one (`<image>\\nQ`) and not `<image>\\n\\nQ`.

A template for which none of this can be found (no template, a prefix that is not a prefix, an assistant text
the rendering does not contain, no terminator and no eos) is a `TemplateError`; `check_template` turns it into
a MedvlError once per processor, before any sample is measured or trained.
"""

from __future__ import annotations

from dataclasses import dataclass

from medvl.errors import MedvlError
from medvl.data.schema import IMAGE_PLACEHOLDER

_PROBE_Q, _PROBE_A = "medvl probe question", "medvl probe answer"


class TemplateError(ValueError):
    """The chat template does not let the trained spans be found for this conversation."""


@dataclass(frozen=True)
class TurnFormat:
    image_newline: bool  # the template's image block already ends in "\n"
    specials: tuple[str, ...]  # the tokenizer's special tokens, longest first
    eos: str | None  # inserted after assistant text that no special token follows
    added: tuple[str, ...] = ()  # every added token, special or not (Qwen3's <think> is not special)
    bos: str | None = None  # put in front when the tokenizer adds it and the template does not (llava-1.5's <s>)


def _tokenizer(owner):
    return getattr(owner, "tokenizer", owner)


def turn_format(owner, vision: bool) -> TurnFormat:
    """The template facts of a processor (or tokenizer), computed once and kept on the object."""
    cached = getattr(owner, "_medvl_turn_format", None)
    if cached is not None:
        return cached
    tok = _tokenizer(owner)
    specials = set(getattr(tok, "all_special_tokens", []) or [])
    added = set()
    for token in getattr(tok, "added_tokens_decoder", {}).values():
        added.add(token.content)
        if getattr(token, "special", False):
            specials.add(token.content)
    image_newline = False
    if vision and getattr(owner, "chat_template", None):
        probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _PROBE_Q}]}]
        try:
            text = owner.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template that cannot render one image turn fails in check_template
            raise TemplateError(f"the chat template cannot render an image turn ({exc})") from None
        at = text.find(_PROBE_Q)
        image_newline = at > 0 and text[at - 1] == "\n"
    longest_first = lambda xs: tuple(sorted((x for x in xs if x), key=len, reverse=True))  # noqa: E731
    # llava-1.5-hf's template has no <s>, its tokenizer adds one (add_bos_token): the model was trained with it
    bos = tok.bos_token if getattr(tok, "bos_token", None) and _adds_bos(tok) else None
    fmt = TurnFormat(image_newline, longest_first(specials), getattr(tok, "eos_token", None),
                     longest_first(added | specials), bos)
    try:
        owner._medvl_turn_format = fmt
    except AttributeError:
        pass
    return fmt


def _adds_bos(tok) -> bool:
    """Whether tokenizing with special tokens puts the bos in front (read off its behaviour: a saved tokenizer's
    `add_bos_token` flag does not always survive a reload, its post-processor does)."""
    try:
        ids = tok("a", add_special_tokens=True)["input_ids"]
    except Exception:
        return False
    return bool(ids) and ids[0] == tok.bos_token_id


def to_template_messages(messages: list[dict], vision: bool, fmt: TurnFormat | None = None) -> list[dict]:
    """Normalized messages (content strings with <image>) -> the content-block form every chat template reads.
    With `fmt.image_newline`, the newline right after a placeholder is the template's own and is not repeated."""
    out = []
    for m in messages:
        if not vision:
            out.append({"role": m["role"], "content": m["content"]})
            continue
        blocks = []
        for i, part in enumerate(m["content"].split(IMAGE_PLACEHOLDER)):
            if i:
                blocks.append({"type": "image"})
                if fmt is not None and fmt.image_newline and part.startswith("\n"):
                    part = part[1:]
            if part:
                blocks.append({"type": "text", "text": part})
        out.append({"role": m["role"], "content": blocks})
    return out


def trained_turns(messages: list[dict], loss_mask: str) -> list[int]:
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True)]
    if loss_mask == "last":
        return idx[-1:]
    if loss_mask != "all":
        raise ValueError(f"loss_mask must be 'all' or 'last', not {loss_mask!r}")
    return idx


def _render(owner, tmsgs, fmt: TurnFormat, **kw) -> str:
    try:
        text = owner.apply_chat_template(tmsgs, tokenize=False, **kw)
    except Exception as exc:  # jinja errors, "no chat template", raise_exception() inside the template
        raise TemplateError(f"the chat template does not render this conversation ({exc})") from None
    return fmt.bos + text if fmt.bos and not text.startswith(fmt.bos) else text


def render_prompt(owner, messages: list[dict], vision: bool) -> str:
    """A generation prompt exactly as training renders the same turns (template, newline rule, bos)."""
    fmt = turn_format(owner, vision)
    return _render(owner, to_template_messages(messages, vision, fmt), fmt, add_generation_prompt=True)


def _special_at(text: str, pos: int, specials: tuple[str, ...]) -> str | None:
    for s in specials:  # longest first: <|im_end|> before a shorter token that prefixes it
        if text.startswith(s, pos):
            return s
    return None


def render_with_spans(owner, messages: list[dict], vision: bool, loss_mask: str = "all"):
    """(text, [(start, end) character spans to train]) for a conversation, read off the template alone.
    The text is the template's rendering plus the eos inserted where an assistant turn has no terminator."""
    fmt = turn_format(owner, vision)
    tmsgs = to_template_messages(messages, vision, fmt)
    text = _render(owner, tmsgs, fmt)
    spans, inserts = [], []
    for i in trained_turns(messages, loss_mask):
        prefix = _render(owner, tmsgs[:i], fmt, add_generation_prompt=True)
        if not text.startswith(prefix):
            raise TemplateError("the chat template renders the conversation before assistant turn "
                                f"{i} differently from the full conversation, so the turn's start cannot be found")
        start = len(prefix)
        core = messages[i]["content"].split(IMAGE_PLACEHOLDER)[-1].strip()
        at = text.find(core, start) if core else start
        if at < 0 or (core and text[start:at].strip() and IMAGE_PLACEHOLDER not in messages[i]["content"]
                      and not _template_gap(text[start:at], fmt)):
            raise TemplateError(f"the rendered template does not contain assistant turn {i}'s text right after "
                                "its generation prompt")
        end = at + len(core)
        # whitespace the answer itself ends with ("yes\n" renders "yes\n<|im_end|>") or the template puts before
        # its terminator (Llama-2's " </s>") belongs to the turn
        after = end + len(text[end:]) - len(text[end:].lstrip())
        term = _special_at(text, after, fmt.specials)
        if term is not None:
            spans.append((start, after + len(term)))
            continue
        if not fmt.eos:
            raise TemplateError(f"assistant turn {i} ends with no special token in the chat template and the "
                                "tokenizer has no eos token to end it with")
        spans.append((start, end))
        inserts.append(end)
    # Insert the eos after the texts that lack a terminator; later spans shift right.
    for pos in sorted(inserts, reverse=True):
        text = text[:pos] + fmt.eos + text[pos:]
        spans = [(s + (len(fmt.eos) if s > pos else 0), e + (len(fmt.eos) if e >= pos else 0)) for s, e in spans]
    return text, spans


def _template_gap(gap: str, fmt: TurnFormat) -> bool:
    """Text a template may put between its generation prompt and the assistant's words (Qwen3's empty
    `<think>\\n\\n</think>\\n\\n` block): added tokens and whitespace only."""
    rest = gap
    for s in fmt.added:
        rest = rest.replace(s, "")
    return not rest.strip()


def check_template(owner, vision: bool, where: str = "") -> TurnFormat:
    """Refuse, once per processor, a chat template whose assistant spans cannot be found; returns its format."""
    if getattr(owner, "_medvl_template_checked", False):
        return turn_format(owner, vision)
    name = getattr(_tokenizer(owner), "name_or_path", "") or "the model"
    where = where or f"{name} (its chat template)"
    if not getattr(owner, "chat_template", None) and not getattr(_tokenizer(owner), "chat_template", None):
        raise MedvlError("the model has no chat template, so the assistant turns to train cannot be found",
                         where=where, fix="use a checkpoint that ships chat_template.json (or a `chat_template` in "
                                          "tokenizer_config.json), or add one there")
    first = f"{IMAGE_PLACEHOLDER}\n{_PROBE_Q}" if vision else _PROBE_Q
    probe = [{"role": "user", "content": first}, {"role": "assistant", "content": _PROBE_A + " one"},
             {"role": "user", "content": _PROBE_Q + " two"}, {"role": "assistant", "content": _PROBE_A + " two"}]
    try:
        text, spans = render_with_spans(owner, probe, vision, "all")
    except TemplateError as exc:
        raise MedvlError(f"cannot find the assistant turns in the chat template: {exc}", where=where,
                         fix="medvl trains the assistant text and its end-of-turn token as the template renders "
                             "them; fix or replace the checkpoint's chat template") from None
    trained = [text[s:e] for s, e in spans]
    if len(trained) != 2 or not all(_PROBE_A in t for t in trained):
        raise MedvlError("the chat template's assistant spans do not hold the assistant text "
                         f"(found {trained!r})", where=where, fix="fix or replace the checkpoint's chat template")
    try:
        owner._medvl_template_checked = True
    except AttributeError:
        pass
    return turn_format(owner, vision)


def end_of_turn(owner, vision: bool) -> str | None:
    """The token that ends an assistant turn under this template (the special token after the text, or the eos
    medvl inserts): what generation must stop on."""
    check_template(owner, vision)
    probe = [{"role": "user", "content": _PROBE_Q}, {"role": "assistant", "content": _PROBE_A},
             {"role": "user", "content": _PROBE_Q}]
    text, spans = render_with_spans(owner, probe, vision, "all")
    s, e = spans[0]
    body = text[s:e]
    return body[body.rfind(_PROBE_A) + len(_PROBE_A):] or None


def stop_token_ids(model, owner, vision: bool) -> list[int]:
    """What generation stops on: the checkpoint's generation_config eos ids, the tokenizer's eos and the end of turn
    its own chat template writes (GLM-4: <|user|>; LLaVA-1.5: </s>). Chat, eval and the server all stop here."""
    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    tok = _tokenizer(owner)
    vocab = tok.get_vocab()
    for token in (tok.eos_token, end_of_turn(owner, vision)):
        if token in vocab:
            eos.append(vocab[token])
    return sorted(set(eos))
