"""Scoring: model outputs -> verdicts and accuracies: the published way (`huatuo`), as a careful reader would
(`reader`, see reader.py), and strictly (`strict`).

`huatuo` gives the published verdict (HuatuoGPT-Vision `scorer.py`, `score_mix_llava` + `match_choice3`) on every
output the published scorer can score, i.e. every output with a stand-alone letter. On the others the
published code crashes the whole run (its fallback is handed the whole record instead of the options and
calls `.lower()` on a list), so `huatuo` does what that code intended: the option whose text occurs last in
the lower-cased output, else the most similar option text (difflib ratio, ties -> the later option).
`reader` credits what a careful human reader takes the answer to name, and nothing when the answer names no
option or two different ones. `strict` is the lower bound: the letter rule alone (exact case), except that an
output which is exactly an option's text is that option ("B-cell lymphoma" is option A's text, not the letter
B), and only where the reader reads the same option ("A or B" names two: wrong). No letter naming one of the
item's options means wrong, and is counted.

Filtering is upstream's, in upstream's order: open questions, then a `test_id` already kept (first wins; that
removes accelerate's padding duplicates), then empty option lists. The overall accuracy is micro:
sum(correct) / sum(n) over datasets, so OmniMedVQA's 11,124 of 17,298 items weigh 64%.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from medvl.errors import MedvlError
from medvl.evaluate.reader import exact_option, read_answer
from medvl.evaluate.suites import LETTERS, UNKNOWN_GOLD, EvalItem, gold_problem

SCORERS = ("huatuo", "reader", "strict")
METHODS = ("letter", "option_text", "similarity", "none")

# The published stand-alone letter rule. The first match in the text wins: a letter A-N of either case, after
# the start, a non-word character, "is ", or the CJK 是/为 (which are word characters to `re`, hence listed),
# and before a non-word character or the end; "a"/"A" followed by a space is skipped (the article).
# Upstream also lists * ( ' " # and space, all already non-word characters; a test checks this pattern against
# the published one on thousands of random strings. Letters go to N although the prompt stops at K.
_LETTER_RULE = re.compile(r"(?:is |是|为|\W|^)(?![aA] )([A-Na-n])(?:\W|$)", re.S)


def letter_rule(output: str) -> str | None:
    """The letter the published rule reads from `output`, case kept ("b) cyst" -> "b", which is never correct)."""
    match = _LETTER_RULE.search(output)
    return match.group(1) if match else None


@dataclass(frozen=True)
class Parsed:
    letter: str | None
    method: str  # one of METHODS


def parse_output(output: str, options: Sequence[str]) -> Parsed:
    """The `huatuo` chain: letter rule, then option text (last occurrence), then string similarity."""
    letter = letter_rule(output)
    if letter is not None:
        return Parsed(letter, "letter")
    lettered = list(zip(LETTERS, (o.lower() for o in options)))
    text = output.lower()
    # Option text found in the output: the one whose last occurrence starts latest; on a tie the earlier
    # option (upstream's stable reverse sort). Empty option texts are skipped: "" occurs everywhere.
    best, best_at = None, -1
    for letter, option in lettered:
        if option and option in text and text.rindex(option) > best_at:
            best, best_at = letter, text.rindex(option)
    if best is not None:
        return Parsed(best, "option_text")
    # Most similar option; `>=` so a tie goes to the later option, as upstream. Decision: a best ratio of 0
    # (empty output, or no character in common) is "none", not the last option: on the yes/no sets
    # (PathVQA 3,362 items, options ["yes", "no"]) that would score empty answers as "no" for free.
    # Note difflib's autojunk (on by default, as upstream): with an output of 200+ characters, every character
    # seen more than len/100 + 1 times is junk, so long rambling outputs mostly score 0 here, hence "none".
    best, best_ratio = None, 0.0
    for letter, option in lettered:
        ratio = difflib.SequenceMatcher(None, option, text).ratio()
        if ratio >= best_ratio and ratio > 0:
            best, best_ratio = letter, ratio
    return Parsed(best, "similarity") if best else Parsed(None, "none")


@dataclass(frozen=True)
class ScoredItem:
    item: EvalItem
    output: str
    gold: str | None  # gold letter; None when the gold answer is "?" (always wrong, as upstream)
    letter: str | None  # parsed by the huatuo chain
    method: str  # how: letter | option_text | similarity | none
    verdicts: dict[str, bool]  # scorer name -> correct
    strict_letter: str | None = None  # the exact option text's letter, else the letter rule's (case kept)
    reading: str | None = None  # the option a careful reader takes the answer to name (reader.py)
    reading_rule: str = "none"  # which scope decided: reader.RULES

    @property
    def names_option(self) -> bool:
        """`strict` found one of this item's option letters (exact case, or the exact option text)."""
        return self.strict_letter is not None and self.strict_letter in LETTERS[: len(self.item.options)]


@dataclass(frozen=True)
class Accuracy:
    correct: int
    n: int

    @property
    def acc(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def as_dict(self) -> dict:
        return {"acc": self.acc, "n": self.n, "correct": self.correct}


@dataclass(frozen=True)
class ScorerResult:
    overall: Accuracy
    datasets: dict[str, Accuracy]  # first-appearance order
    subsets: dict[str, dict[str, Accuracy]]  # dataset -> subset -> accuracy; only non-empty subsets

    def as_dict(self) -> dict:
        return {
            "overall": self.overall.as_dict(),
            "datasets": {k: v.as_dict() for k, v in self.datasets.items()},
            "subsets": {d: {s: a.as_dict() for s, a in subs.items()} for d, subs in self.subsets.items()},
        }


@dataclass(frozen=True)
class Unscorable:
    """A record left out of every accuracy, and why (re-scoring lists these instead of refusing the batch)."""

    test_id: int | None
    dataset: str
    reason: str

    def as_dict(self) -> dict:
        return {"test_id": self.test_id, "dataset": self.dataset, "reason": self.reason}


@dataclass(frozen=True)
class Scores:
    items: list[ScoredItem]
    results: dict[str, ScorerResult]  # scorer name -> result, in SCORERS order
    counts: dict[str, int] = field(default_factory=dict)
    unscorable: list[Unscorable] = field(default_factory=list)


def score(predictions: Iterable[tuple[EvalItem, str]], *, unscorable: str = "raise",
          rejected: Sequence[Unscorable] = ()) -> Scores:
    """Score (item, raw model output) pairs with every scorer in SCORERS.

    A kept item whose gold answer is not among its options (upstream dies on the first with `assert False`):
    with unscorable="raise" (the eval path, which already refused such records before generating) a
    MedvlError lists them all; with "report" (re-scoring) they are left out, listed in `Scores.unscorable`
    after the `rejected` records the caller could not even parse (their test_ids count as seen, so a later
    padding duplicate is dropped, as upstream), and the rest is scored.
    Counts: open_skipped, duplicates, empty_options, gold_unknown ("?" golds), unscorable, no_letter (outputs
    where the published scorer crashes), no_option (strict found no option: no letter at all, a lowercase one,
    or one past the item's options), reader_ambiguous (the answer names two options), reader_none (it names
    none), and parsed_<method> for each method.
    """
    if unscorable not in ("raise", "report"):
        raise ValueError(f"unscorable must be 'raise' or 'report', got {unscorable!r}")
    counts = dict.fromkeys(("open_skipped", "duplicates", "empty_options", "gold_unknown"), 0)
    kept: list[tuple[EvalItem, str]] = []
    # First occurrence wins even when it could not be parsed: its padding duplicates are not scored instead.
    seen: set[int] = {u.test_id for u in rejected if u.test_id is not None}
    for item, output in predictions:
        if item.question_type == "open":
            counts["open_skipped"] += 1
        elif item.test_id in seen:
            counts["duplicates"] += 1
        elif not item.options:
            counts["empty_options"] += 1  # upstream does not mark the id as seen here, so neither do we
        else:
            seen.add(item.test_id)
            kept.append((item, output))
    problems = {item.test_id: (item, p) for item, _ in kept if (p := gold_problem(item))}
    if problems and unscorable == "raise":
        lines = [p for _, p in problems.values()]
        more = f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else ""
        raise MedvlError(
            f"{len(lines)} item{'s' if len(lines) > 1 else ''} cannot be scored:\n  " + "\n  ".join(lines[:10]) + more,
            fix="'answer' must equal one of the option texts exactly; fix the evaluation file",
        )
    left_out = [*rejected, *(Unscorable(t, item.dataset, p.removeprefix(f"test_id {t} ({item.dataset}): "))
                             for t, (item, p) in problems.items())]
    scored = [_score_one(item, output) for item, output in kept if item.test_id not in problems]
    counts["gold_unknown"] = sum(s.gold is None for s in scored)
    counts["unscorable"] = len(left_out)
    counts["no_letter"] = sum(s.method != "letter" for s in scored)
    counts["no_option"] = sum(not s.names_option for s in scored)
    counts["reader_ambiguous"] = sum(s.reading is None and s.reading_rule != "none" for s in scored)
    counts["reader_none"] = sum(s.reading_rule == "none" for s in scored)
    for method in METHODS:
        counts[f"parsed_{method}"] = sum(s.method == method for s in scored)
    return Scores(scored, {name: _aggregate(scored, name) for name in SCORERS}, counts, left_out)


def _score_one(item: EvalItem, output: str) -> ScoredItem:
    gold = None if item.answer == UNKNOWN_GOLD else item.gold_letter
    parsed = parse_output(output, item.options)
    huatuo = gold is not None and parsed.letter == gold  # case-sensitive: "b" never equals "B"
    strict_letter = exact_option(output, item.options) or (parsed.letter if parsed.method == "letter" else None)
    reading = read_answer(output, item.options)
    verdicts = {"huatuo": huatuo, "reader": gold is not None and reading.letter == gold,
                "strict": gold is not None and strict_letter == gold == reading.letter}
    return ScoredItem(item, output, gold, parsed.letter, parsed.method, verdicts, strict_letter, reading.letter,
                      reading.rule)


def _aggregate(scored: Sequence[ScoredItem], scorer: str) -> ScorerResult:
    datasets: dict[str, list[int]] = {}
    subsets: dict[str, dict[str, list[int]]] = {}
    for s in scored:
        hit = int(s.verdicts[scorer])
        tally = datasets.setdefault(s.item.dataset, [0, 0])
        tally[0] += hit
        tally[1] += 1
        if s.item.subset:  # upstream keys these f"{dataset}_{subset}"; report.py rebuilds that form
            sub = subsets.setdefault(s.item.dataset, {}).setdefault(s.item.subset, [0, 0])
            sub[0] += hit
            sub[1] += 1
    overall = Accuracy(sum(c for c, _ in datasets.values()), sum(n for _, n in datasets.values()))
    return ScorerResult(
        overall,
        {d: Accuracy(c, n) for d, (c, n) in datasets.items()},
        {d: {k: Accuracy(c, n) for k, (c, n) in subs.items()} for d, subs in subsets.items()},
    )
