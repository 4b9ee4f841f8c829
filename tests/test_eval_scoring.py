"""medvl.evaluate.scoring and .report: golden cases for the published scorer's rules, fallbacks, aggregation."""

from __future__ import annotations

import json
import random
import re

import pytest

from medvl.errors import MedvlError
from medvl.evaluate import (
    comparison_rows,
    letter_rule,
    parse_output,
    results_dict,
    score,
    upstream_result,
    write_predictions,
    write_results,
)
from medvl.evaluate.suites import EvalItem, EvalSet

# The published pattern, verbatim from the reference notes (scorer.py `match_choice3`): the oracle only.
PUBLISHED_PATTERN = r"(is |是|\*|\W|\ |\(|为|^|'|\"|#)(?![aA] )([abcdefghijklmnABCDEFGHIJKLMN])(\W|$)"

YES_NO = ("Yes", "No")
FOUR = ("Pneumonia", "Pleural effusion", "Cardiomegaly", "Normal")


def item(test_id, options=FOUR, answer="Pleural effusion", dataset="VQA-RAD_test", subset="", qtype=None):
    return EvalItem(test_id, dataset, subset, f"q{test_id}", tuple(options), answer, (), qtype)


@pytest.mark.parametrize(
    ("output", "letter"),
    [
        ("A", "A"),
        ("B. Pneumonia", "B"),
        ("The answer is C", "C"),
        ("Answer: D", "D"),
        ("(C)", "C"),
        ("**B**", "B"),
        ("I think it's b.", "I"),  # "I" at the start is a stand-alone letter
        ("E.g. the mass", "E"),
        ("b) cyst", "b"),  # lowercase kept
        ("c", "c"),
        ("答案是B", "B"),  # 是 is a word character to `re`, listed explicitly upstream
        ("A lesion in the lung, B", "B"),  # "A " is skipped (the article)
        ("a. cyst", "a"),  # "a" not followed by a space is a letter
        ("#D\n", "D"),
        ("'K'", "K"),
        ("Option L", "L"),  # the rule reads up to N though the prompt letters stop at K
        ("Yes", None),
        ("Pleural effusion", None),
        ("", None),
        ("Option O", None),
    ],
)
def test_letter_rule_golden_cases(output, letter):
    assert letter_rule(output) == letter


def test_letter_rule_equals_the_published_pattern_on_random_strings():
    published = re.compile(PUBLISHED_PATTERN, re.S)
    rng = random.Random(0)
    alphabet = list("aAbBcCiInNkKlLmMoOzZ  ..::,()*'\"#\n-_1是为") + ["is ", "Is "]
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
        match = published.search(text)
        assert letter_rule(text) == (match.group(2) if match else None), repr(text)


def test_fallback_option_text_then_similarity_then_none():
    assert parse_output("Yes", YES_NO) == parse_output("yes, clearly", YES_NO)
    assert parse_output("Yes", YES_NO).letter == "A" and parse_output("Yes", YES_NO).method == "option_text"
    assert (parse_output("Pleural effusion", FOUR).letter, parse_output("Pleural effusion", FOUR).method) == (
        "B", "option_text",
    )  # fmt: skip
    # the option whose text occurs last wins: "no" in "not" is after "yes"
    assert parse_output("Yes, it is not normal", YES_NO).letter == "B"
    assert parse_output("cardiomegaly rather than pneumonia", FOUR).letter == "A"
    # same last position: the earlier option wins (upstream's stable reverse sort)
    assert parse_output("left lung", ("left lung", "left")).letter == "A"
    assert parse_output("left lung", ("left", "left lung")).letter == "A"
    # no standalone letter, no option text: most similar option
    parsed = parse_output("pleural efusion", FOUR)
    assert (parsed.letter, parsed.method) == ("B", "similarity")
    # equal similarity: the later option
    assert (parse_output("xz", ("xq", "qz")).letter, parse_output("xz", ("xq", "qz")).method) == ("B", "similarity")
    # nothing in common (empty output included): none, never "the last option"
    assert parse_output("", YES_NO).method == "none" and parse_output("", YES_NO).letter is None
    assert parse_output("qqq", YES_NO) == parse_output("", YES_NO)


def test_verdicts_case_sensitive_and_strict_beside_huatuo():
    outputs = {1: "B", 2: "b) cyst", 3: "Pleural effusion", 4: "I think it's b.", 5: "", 6: "The answer is C"}
    scores = score((item(i), out) for i, out in outputs.items())  # gold is B everywhere
    rows = {s.item.test_id: (s.letter, s.method, s.verdicts["huatuo"], s.verdicts["strict"]) for s in scores.items}
    assert rows == {
        1: ("B", "letter", True, True),
        2: ("b", "letter", False, False),  # a lowercase hit is always wrong
        3: ("B", "option_text", True, False),  # where the published scorer crashes
        4: ("I", "letter", False, False),
        5: (None, "none", False, False),
        6: ("C", "letter", False, False),
    }
    huatuo, strict = scores.results["huatuo"], scores.results["strict"]
    assert (huatuo.overall.correct, huatuo.overall.n) == (2, 6)
    assert (strict.overall.correct, strict.overall.n) == (1, 6)
    # no letter: 3 and 5; no option letter named: 2 (lowercase), 3, 4 ("I" with 4 options), 5
    assert scores.counts["no_letter"] == 2 and scores.counts["no_option"] == 4
    assert scores.counts["parsed_letter"] == 4 and scores.counts["parsed_option_text"] == 1


def test_filters_in_upstream_order_duplicates_first_wins():
    predictions = [
        (item(1), "B"),
        (item(1), "A"),  # accelerate padding duplicate: dropped, first output kept
        (item(2, qtype="open"), "B"),
        (item(3, options=()), "B"),
        (item(3), "A"),  # upstream marks an id seen only when kept, so this one counts
        (item(4, answer="?"), "B"),  # "?" gold: counted, always wrong
    ]
    scores = score(predictions)
    assert [(s.item.test_id, s.output) for s in scores.items] == [(1, "B"), (3, "A"), (4, "B")]
    assert {k: scores.counts[k] for k in ("duplicates", "open_skipped", "empty_options", "gold_unknown")} == {
        "duplicates": 1, "open_skipped": 1, "empty_options": 1, "gold_unknown": 1,
    }  # fmt: skip
    assert scores.results["huatuo"].overall.as_dict() == {"acc": 1 / 3, "n": 3, "correct": 1}


def test_gold_not_among_options_is_a_clear_error_naming_test_id_and_dataset():
    with pytest.raises(MedvlError) as exc:
        score([(item(1), "A"), (item(7, answer="pleural effusion", dataset="SLAKE_test"), "B")])
    message = exc.value.render()
    assert "1 item cannot be scored" in message
    assert "test_id 7 (SLAKE_test): gold answer 'pleural effusion' is not among the options" in message
    assert "did you mean 'Pleural effusion'?" in message
    opts = tuple(f"o{i}" for i in range(12))  # gold past K: upstream IndexError, here a named error
    with pytest.raises(MedvlError, match="test_id 2 .* option 12, past the 11 letters"):
        score([(item(2, options=opts, answer="o11"), "A")])
    assert score([(item(3, options=opts, answer="o1"), "B")]).results["huatuo"].overall.correct == 1


def mixed_scores():
    predictions = []
    # VQA-RAD 2/4 (strict 1/4), OmniMedVQA 6/6 over two subsets: micro overall 8/10 = 0.8 (macro would be 0.75)
    for i, out in enumerate(["B", "A", "Pleural effusion", "Cardiomegaly"], 1):
        predictions.append((item(i), out))
    for i in range(6):
        subset = "CT(Computed Tomography)" if i < 4 else "X-Ray"
        predictions.append((item(10 + i, dataset="OmniMedVQA", subset=subset), "Answer: B"))
    return score(predictions)


def test_per_dataset_per_subset_and_micro_overall_each_with_n():
    result = mixed_scores().results["huatuo"]
    assert result.datasets["VQA-RAD_test"].as_dict() == {"acc": 0.5, "n": 4, "correct": 2}
    assert result.datasets["OmniMedVQA"].as_dict() == {"acc": 1.0, "n": 6, "correct": 6}
    assert result.overall.as_dict() == {"acc": 0.8, "n": 10, "correct": 8}
    assert {k: (v.correct, v.n) for k, v in result.subsets["OmniMedVQA"].items()} == {
        "CT(Computed Tomography)": (4, 4), "X-Ray": (2, 2),
    }  # fmt: skip
    assert "VQA-RAD_test" not in result.subsets  # empty subset: no subset key, as upstream


def test_report_files_and_upstream_shape(tmp_path):
    scores = mixed_scores()
    eval_set = EvalSet([], tmp_path / "data.json", ("VQA-RAD_test", "OmniMedVQA"), 13, open_skipped=2)
    results = results_dict(scores, eval_set, meta={"model": "tiny"})
    assert list(results["scorers"]) == ["huatuo", "strict"]
    assert results["scorers"]["strict"]["datasets"]["VQA-RAD_test"] == {"acc": 0.25, "n": 4, "correct": 1}
    assert results["counts"]["open_skipped"] == 2 and results["counts"]["no_letter"] == 2
    assert results["data"]["records_in_file"] == 13 and results["meta"] == {"model": "tiny"}
    assert upstream_result(scores) == {
        "VQA-RAD_test": 0.5, "OmniMedVQA": 1.0, "The total score for multiple-choice questions": 0.8,
        "OmniMedVQA_CT(Computed Tomography)": 1.0, "OmniMedVQA_X-Ray": 1.0,
    }  # fmt: skip
    written = json.loads(write_results(tmp_path / "out" / "results.json", scores, eval_set).read_text())
    assert written["scorers"]["huatuo"]["overall"] == {"acc": 0.8, "n": 10, "correct": 8}
    lines = write_predictions(tmp_path / "out" / "predictions.jsonl", scores).read_text().splitlines()
    row = json.loads(lines[3])
    assert len(lines) == 10 and not list((tmp_path / "out").glob("*.tmp"))
    assert row == {
        "test_id": 4, "dataset": "VQA-RAD_test", "subset": "", "question": "q4", "options": list(FOUR),
        "gold": "Pleural effusion", "gold_letter": "B", "images": [], "output": "Cardiomegaly", "letter": "C",
        "method": "option_text", "verdicts": {"huatuo": False, "strict": False},
    }  # fmt: skip


def test_comparison_rows_carry_published_numbers_and_the_mmmu_caveat():
    predictions = [(item(1), "B"), (item(2, dataset="MMMU_Medical_Validation"), "B"), (item(3, dataset="Mine"), "A")]
    rows = {r.suite: r for r in comparison_rows(score(predictions))}
    assert list(rows) == ["vqa-rad", "mmmu-medical", "Mine"]
    rad = rows["vqa-rad"]
    assert (rad.ours, rad.n, rad.huatuo_7b, rad.huatuo_34b, rad.rerun_7b) == (
        {"huatuo": 100.0, "strict": 100.0}, 1, 63.7, 68.1, 61.35,
    )  # fmt: skip
    assert rad.baselines["LLaVA-Med-7B"] == 51.4 and len(rad.baselines) == 11 and rad.comparable
    mmmu = rows["mmmu-medical"]
    assert (mmmu.huatuo_7b, mmmu.huatuo_34b, mmmu.comparable) == (50.6, 54.4, False)
    assert "TEST" in mmmu.note and "VALIDATION" in mmmu.note
    assert rows["Mine"].huatuo_7b is None and not rows["Mine"].comparable and rows["Mine"].ours["huatuo"] == 0.0
