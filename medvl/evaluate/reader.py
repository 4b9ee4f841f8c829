"""The `reader` verdict: which option a careful human reader takes a model's answer to name, or none.

The published scorer reads the first stand-alone letter of either case and compares it case-sensitively, so
"I think it's b" is read as I and "b" is always wrong; `reader` reads answers as a person grading them would.
Rules, in the order they are applied (README "Evaluation" has one example per rule):

1. Normalise: NFKC (full-width "Ｂ" -> "B", "（ｂ）" -> "(b)", "：" -> ":"), markdown emphasis and code marks
   removed ("**B**" -> "B"), `\\boxed{B}` unwrapped, tags such as `<answer>` dropped.
2. Mentions of an option, found in a scope of the text:
   - its letter, either case, stand-alone or wrapped ("b", "(b)", "[B]", "'B'", "B.", "b)", "答案是b");
     only letters of this item's options count (with 4 options, "E" names nothing);
   - its text, case-insensitive, on word boundaries, longest option first ("left lung" before "left"),
     so the letter inside an option's text ("Vitamin C deficiency", "B-cell lymphoma") is not a letter;
   - its number after a cue ("Option 2", "choice (3)", "the 2nd option", "第2个", "选项2"; also "Answer: 2"
     unless some option text is itself a number, where "2" is then the value, not the position).
   Not mentions: the article "a"/"A" and the pronoun "I" before a word ("a cyst", "A 45-year-old", "I think"),
   letters in abbreviations or names ("e.g.", "vitamin D", "hepatitis B", "type A", "B cells", "B-mode",
   "I'd"), the determiner "no" before a word ("no evidence of ..." is not the answer "No"), negated mentions
   ("not A", "rather than pneumonia", "preferred over warfarin", "A is incorrect", "pneumonia is unlikely")
   and mentions only discussed ("looking at option A").
3. Scopes, first that mentions anything decides: the clauses after an answer cue ("the answer is", "Answer:",
   "I would choose", "答案是", "选", a sentence opening "So"/"Therefore"), each up to where its reason starts
   ("because", "since", "which"), together with mentions followed by a cue ("heparin is the answer", "B is
   correct"); then the first sentence; then the whole answer. Without a cue, lines that list options back
   ("A. Pneumonia" then "B. Pleural effusion") are not part of the answer.
4. The deciding scope must mention exactly one option; two different options ("A or B", "B. Pneumonia" when
   Pneumonia is option A) or none is no answer, which is wrong.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from medvl.evaluate.suites import LETTERS

RULES = ("answer cue", "first sentence", "whole answer", "none")


@dataclass(frozen=True)
class Reading:
    letter: str | None  # the one option read, None when the deciding scope names none or several
    named: tuple[str, ...]  # every option letter the deciding scope names, in letter order
    rule: str  # one of RULES: which scope decided

    @property
    def ambiguous(self) -> bool:
        return len(self.named) > 1


_MARKS = re.compile(r"[*`]+|__|~~")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_TAGS = re.compile(r"</?[A-Za-z_]+>")

# A letter not glued to a word, digit, hyphen compound ("B-cell"), path, or contraction ("I'd", "it's").
_LETTER = re.compile(
    r"(?<![A-Za-z0-9\-_/\\.])(?<![A-Za-z]['’])([A-Ka-k])(?![A-Za-z0-9\-_/\\])(?!['’][A-Za-z])(?!\.[A-Za-z])"
)
# Words after which "a"/"A" and "i"/"I" are still a choice ("A or B", "A is correct"), not an article/pronoun.
_CHOICE_NEXT = frozenset(
    "or and nor is was seems appears would could might should because since as then vs versus over instead rather "
    "but fits matches looks best correct being".split()
)
# Names in which a letter is part of a term: "vitamin D", "hepatitis B", "type A", "figure C", "lead I".
_NAME_BEFORE = frozenset(
    "type types grade class stage group hepatitis vitamin zone phase level category lead factor figure fig image "
    "panel plan hemophilia haemophilia influenza protein complex cluster part section step point site region "
    "strain size".split()
)
_NAME_AFTER = re.compile(r"\s*(?:cells?|lymphocytes?|waves?|mode|scans?|rays?|lines?|coli)\b")
# Negation before a mention ("not A", "rather than pneumonia", "no evidence of effusion"), or a mention that is
# only discussed ("looking at option A, ..."), or negation after it ("A is incorrect").
_NEG_BEFORE = re.compile(
    r"(?:\bnot|n't|\bno|\bnor|\bneither|\brather than|\binstead of|\bunlike|\brule out|\bruled out|\bexclud\w*"
    r"|\bexcept|\bother than|\bthan|\bover|\bagainst|\bwithout|\blooking at|\bconsider(?:ing)?|\bregarding"
    r"|\bas for)\s+"
    r"(?:(?:the|a|an|option|choice|answer|evidence of|sign of|signs of|features of)\s+)*[(\[\"']*$"
)
_NEG_AFTER = re.compile(
    r"[)\]\"'.:]*\s*(?:(?:is|are|was|seems|appears|would be|can be|could be|has been|have been)\s+)?"
    r"(?:not\b|incorrect|wrong|unlikely|less likely|ruled out|excluded|false\b|contraindicated)"
)
# A position after a cue ("Option 2", "the 2nd choice", "第2个"); after "answer" only when no option is a number.
_POSITION = re.compile(
    r"\b(?:option|choice)\s*(?:number|no\.?|#)?\s*[(\[]?(\d{1,2})\b(?![.,]\d)"
    r"|\b(\d{1,2})(?:st|nd|rd|th)\s+(?:option|choice)\b|第\s*(\d{1,2})\s*(?:个|项)|选项\s*(\d{1,2})"
)
_ANSWER_NUMBER = re.compile(r"\banswer\s*(?:is|:)?\s*[(\[]?(\d{1,2})\b(?![.,]\d)")
_CUE = re.compile(
    r"\b(?:answer|option|choice|diagnosis|response)\s*(?:is|would be|should be|will be|=|:)"
    r"|(?:^|[.;\n]\s*)(?:so|therefore|thus|hence|in conclusion|in summary)\b,?"
    r"|\bi(?:'d| would| will|'ll)?\s+(?:choose|pick|select|go with|say)\b"
    r"|答案\s*(?:是|为|:)|应选|选择|选"
)
_LISTED = re.compile(r"^[ \t]*\(?([A-Ka-k])[.):][ \t]+\S.*$", re.M)
# A cue after the mention: "heparin is the answer", "B is correct", "B is more likely".
_CUE_AFTER = re.compile(
    r"[)\]\"'.]*\s*(?:\([^()]{1,40}\)\s*)?(?:is|would be|seems|appears)\s+(?:to be\s+)?(?:the\s+)?"
    r"(?:(?:correct|right|best|most likely|more likely|most appropriate)\b|answer\b)"
)
# Where the reason starts, the answer clause ends: "The answer is D, because option A ..." answers D.
_REASON = re.compile(r"\b(?:because|since|whereas|while|which|as opposed to|given that)\b", re.I)
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_NUMBER_WORD = re.compile(r"\b(?:" + "|".join(_NUMBER_WORDS) + r")\b")
_ABBREVIATION = re.compile(r"(?:^|[\s(])(?:e\.g|i\.e|vs|etc|dr|fig|approx|cf)$")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = _BOXED.sub(r"\1", text)
    text = _TAGS.sub(" ", text)
    return _MARKS.sub("", text).strip()


def _option_texts(options: Sequence[str]) -> list[str]:
    return list(_texts_of(tuple(options[: len(LETTERS)])))


@functools.lru_cache(maxsize=8192)  # the bundle repeats option lists (["yes", "no"] on 4k items)
def _texts_of(options: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(normalize(o).lower().rstrip(".").strip() for o in options)


@functools.lru_cache(maxsize=8192)
def _text_pattern(text: str) -> re.Pattern:
    return re.compile(r"(?<![0-9a-z])" + re.escape(text) + r"(?![0-9a-z])")


def _text_spans(low: str, texts: list[str]) -> list[tuple[int, int, int]]:
    """(start, end, option index) of option texts in `low`, longest option first, never overlapping."""
    taken = [False] * len(low)
    spans = []
    for index in sorted(range(len(texts)), key=lambda i: -len(texts[i])):
        text = texts[index]
        if not text or texts.index(text) != index:  # a repeated option text is the first one (options.index)
            continue
        for m in _text_pattern(text).finditer(low):
            if any(taken[m.start() : m.end()]):
                continue
            if text == "no" and re.match(r"\s+[a-z]", low[m.end() :]):
                continue  # the determiner: "there is no evidence of ..." does not answer "No"
            taken[m.start() : m.end()] = [True] * (m.end() - m.start())
            spans.append((m.start(), m.end(), index))
    return spans


def _negated(low: str, start: int, end: int) -> bool:
    return bool(_NEG_BEFORE.search(low[max(0, start - 40) : start]) or _NEG_AFTER.match(low[end : end + 40]))


def _letter_is_word(low: str, start: int, end: int) -> bool:
    """The letter is part of the prose: an article, a pronoun, or a name such as "vitamin D" or "B cells"."""
    following = re.match(r"\s+([a-z0-9]+)", low[end:])  # "a cyst", "A 45-year-old man", "I think"
    if low[start] in "ai" and following and following.group(1) not in _CHOICE_NEXT:
        return True
    before = re.search(r"([a-z]+)\s*$", low[:start])
    return bool(before and before.group(1) in _NAME_BEFORE) or bool(_NAME_AFTER.match(low[end:]))


def _mentions(scope: str, texts: list[str]) -> list[tuple[int, int, int]]:
    """(start, end, option index) of each option `scope` (normalised) mentions, given the options' normalised
    texts; negated and incidental mentions left out, in no particular order."""
    n = len(texts)
    low = scope.lower()
    if any(t.isdigit() for t in texts):  # "two nodules" answers the option "2"
        low = _NUMBER_WORD.sub(lambda m: f"{_NUMBER_WORDS.index(m.group()):<{len(m.group())}}", low)
    found = []
    masked = list(scope)
    for start, end, index in _text_spans(low, texts):
        masked[start:end] = " " * (end - start)
        found.append((start, end, index))
    for m in _LETTER.finditer("".join(masked)):
        index = LETTERS.index(m.group(1).upper())
        if index < n and not _letter_is_word(low, m.start(), m.end()):
            found.append((m.start(), m.end(), index))
    patterns = [_POSITION] if any(t.isdigit() for t in texts) else [_POSITION, _ANSWER_NUMBER]
    for pattern in patterns:
        for m in pattern.finditer(low):
            number = int(next(g for g in m.groups() if g))
            if 1 <= number <= n:
                found.append((m.start(), m.end(), number - 1))
    return [(start, end, index) for start, end, index in found if not _negated(low, start, end)]


def named_options(scope: str, options: Sequence[str]) -> set[int]:
    """Indices of the options `scope` mentions (module doc, rule 2)."""
    return _named(normalize(scope), _option_texts(options))


def _named(scope: str, texts: list[str]) -> set[int]:
    return {index for _, _, index in _mentions(scope, texts)}


def _first_sentence(text: str, texts: list[str]) -> str:
    """Up to the first line break or sentence end. A full stop after a lone letter ends the sentence unless an
    option text follows it and ends there ("B. Pleural effusion" is one unit), or after an abbreviation."""
    text = text.lstrip()
    texts = [t for t in texts if t]
    for m in re.finditer(r"\n|[!?;。！？](?=\s|$)|\.(?=\s|$)", text):
        if m.group() == ".":
            head = text[: m.start()].lower()
            if _ABBREVIATION.search(head):
                continue
            if re.search(r"(?:^|[^a-z0-9])[a-k]$", head):
                rest = text[m.end() :].lstrip(" \t").lower()
                if any(re.match(re.escape(t) + r"(?:[\s.,;:!?)]|$)", rest) and
                       not re.match(re.escape(t) + r"\s+[a-z]", rest) for t in texts):
                    continue
        return text[: m.start() + (m.group() != "\n")]
    return text


def read_answer(output: str, options: Sequence[str]) -> Reading:
    """The option a careful reader takes `output` to answer, with the scope that decided (see module doc)."""
    text = normalize(output)
    texts = _option_texts(options)
    low = text.lower()
    cued: set[int] = set()
    for m in _CUE.finditer(low):
        clause = _REASON.split(_first_sentence(text[m.end() :], texts), maxsplit=1)[0]
        cued |= _named(clause, texts)
    cued |= {index for _, end, index in _mentions(text, texts) if _CUE_AFTER.match(low[end : end + 60])}
    if cued:
        return _decide(cued, "answer cue")
    listed = {m.group(1).upper() for m in _LISTED.finditer(text)}
    if len(listed) > 1:  # the options listed back ("A. Pneumonia\nB. Pleural effusion") are not an answer
        text = _LISTED.sub("", text).strip()
    first = _named(_first_sentence(text, texts), texts)
    if first:
        return _decide(first, "first sentence")
    whole = _named(text, texts)
    return _decide(whole, "whole answer") if whole else Reading(None, (), "none")


def _decide(named: set[int], rule: str) -> Reading:
    letters = tuple(LETTERS[i] for i in sorted(named))
    return Reading(letters[0] if len(letters) == 1 else None, letters, rule)


def exact_option(output: str, options: Sequence[str]) -> str | None:
    """The letter of the option whose text the whole output is (case, spaces and a final full stop aside)."""
    answer = normalize(output).lower().rstrip(".").strip()
    texts = _option_texts(options)
    return LETTERS[texts.index(answer)] if answer and answer in texts else None
