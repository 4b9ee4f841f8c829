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
from medvl.evaluate.scoring import Unscorable
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


def test_three_verdicts_side_by_side():
    outputs = {1: "B", 2: "b) cyst", 3: "Pleural effusion", 4: "I think it's b.", 5: "", 6: "The answer is C",
               7: "A or B", 8: "(b)"}
    scores = score((item(i), out) for i, out in outputs.items())  # gold is B everywhere
    rows = {s.item.test_id: (s.letter, s.method, s.reading, s.verdicts["huatuo"], s.verdicts["reader"],
                             s.verdicts["strict"]) for s in scores.items}
    assert rows == {
        1: ("B", "letter", "B", True, True, True),
        2: ("b", "letter", "B", False, True, False),  # published: a lowercase hit is always wrong
        3: ("B", "option_text", "B", True, True, True),  # the exact option text is that option
        4: ("I", "letter", "B", False, True, False),
        5: (None, "none", None, False, False, False),
        6: ("C", "letter", "C", False, False, False),
        7: ("B", "letter", None, True, False, False),  # published reads the last letter; a reader, two options
        8: ("b", "letter", "B", False, True, False),
    }
    results = {name: (r.overall.correct, r.overall.n) for name, r in scores.results.items()}
    assert results == {"huatuo": (3, 8), "reader": (5, 8), "strict": (2, 8)}
    # no letter: 3 and 5; strict names no option: 2 and 8 (lowercase), 4 ("I" with 4 options), 5. In 7 the
    # letter rule skips "A " (the article) and reads B; strict names B but the reader reads two options: wrong.
    assert scores.counts["no_letter"] == 2
    assert [s.item.test_id for s in scores.items if not s.names_option] == [2, 4, 5, 8]
    assert (scores.counts["reader_ambiguous"], scores.counts["reader_none"]) == (1, 1)
    assert scores.counts["parsed_letter"] == 6 and scores.counts["parsed_option_text"] == 1


@pytest.mark.parametrize(
    ("output", "options", "answer", "strict"),
    [
        # another option's text that contains the gold letter: the letter rule reads the gold, strict must not
        ("B-cell lymphoma", ("B-cell lymphoma", "T-cell lymphoma", "Hodgkin lymphoma"), "T-cell lymphoma", False),
        ("Vitamin C deficiency", ("Iron deficiency", "Folate deficiency", "Vitamin B12 deficiency",
                                  "Vitamin C deficiency"), "Vitamin B12 deficiency", False),
        ("vitamin c deficiency.", ("Iron deficiency", "Folate deficiency", "Vitamin B12 deficiency",
                                   "Vitamin C deficiency"), "Vitamin C deficiency", True),
        ("B-cell lymphoma", ("B-cell lymphoma", "T-cell lymphoma"), "B-cell lymphoma", True),
        ("B", ("B-cell lymphoma", "T-cell lymphoma"), "T-cell lymphoma", True),
        ("Hepatitis B", ("Hepatitis A", "Hepatitis B", "Cirrhosis"), "Hepatitis B", True),
        ("Hepatitis A", ("Hepatitis A", "Hepatitis B", "Cirrhosis"), "Hepatitis B", False),
    ],
)
def test_strict_an_exact_option_text_is_that_option(output, options, answer, strict):
    scored = score([(item(1, options=options, answer=answer), output)]).items[0]
    assert scored.verdicts["strict"] is strict
    assert scored.verdicts["reader"] is strict  # the reader agrees on these


def test_strict_fix_cases_from_the_issue_were_credited_by_the_letter_rule():
    """The two cases of issue 13: the published letter rule reads the gold letter out of the wrong option."""
    lymph = item(1, options=("B-cell lymphoma", "T-cell lymphoma"), answer="T-cell lymphoma")
    vitamin = item(2, options=("Iron", "Folate", "Vitamin C deficiency", "Vitamin C deficiency (scurvy)"),
                   answer="Vitamin C deficiency (scurvy)")
    gold_c = item(3, options=("Iron deficiency", "Folate deficiency", "Vitamin B12 deficiency",
                              "Vitamin C deficiency"), answer="Vitamin B12 deficiency")
    scores = score([(lymph, "B-cell lymphoma"), (vitamin, "Vitamin C deficiency"), (gold_c, "Vitamin C deficiency")])
    assert [s.letter for s in scores.items] == ["B", "C", "C"]
    assert [s.verdicts["huatuo"] for s in scores.items] == [True, False, True]
    assert [s.verdicts["strict"] for s in scores.items] == [False, False, False]
    assert [s.strict_letter for s in scores.items] == ["A", "C", "D"]


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


def test_report_mode_scores_the_rest_and_lists_the_unscorable():
    opts = tuple(f"o{i}" for i in range(12))
    rejected = [Unscorable(9, "PMC-VQA_test", "missing field 'options'")]
    scores = score([(item(1), "B"), (item(7, answer="pleural effusion", dataset="SLAKE_test"), "B"),
                    (item(7, dataset="SLAKE_test"), "B"),  # a padding duplicate of 7: still dropped, first wins
                    (item(2, options=opts, answer="o11"), "A"), (item(3), "A")],
                   unscorable="report", rejected=rejected)
    assert [s.item.test_id for s in scores.items] == [1, 3]
    assert [(u.test_id, u.dataset) for u in scores.unscorable] == [(9, "PMC-VQA_test"), (7, "SLAKE_test"),
                                                                    (2, "VQA-RAD_test")]
    assert "not among the options" in scores.unscorable[1].reason and "past the 11" in scores.unscorable[2].reason
    assert scores.counts["unscorable"] == 3 and scores.counts["duplicates"] == 1
    assert scores.results["huatuo"].overall.as_dict() == {"acc": 0.5, "n": 2, "correct": 1}
    assert "SLAKE_test" not in scores.results["reader"].datasets
    results = results_dict(scores)
    assert results["unscorable"][0] == {"test_id": 9, "dataset": "PMC-VQA_test",
                                        "reason": "missing field 'options'"}
    assert results["counts"]["unscorable"] == 3


def mixed_scores():
    predictions = []
    # VQA-RAD 2/4 (strict, reader 2/4), OmniMedVQA 6/6 over two subsets: micro overall 8/10 = 0.8 (macro: 0.75)
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
    assert list(results["scorers"]) == ["huatuo", "reader", "strict"]
    # "Pleural effusion" is now option B exactly for strict; "A" and "Cardiomegaly" stay wrong
    assert results["scorers"]["strict"]["datasets"]["VQA-RAD_test"] == {"acc": 0.5, "n": 4, "correct": 2}
    assert results["scorers"]["reader"]["datasets"]["VQA-RAD_test"] == {"acc": 0.5, "n": 4, "correct": 2}
    assert results["scorer_gap"] == {"overall": 0.0, "datasets": {"VQA-RAD_test": 0.0, "OmniMedVQA": 0.0}}
    assert results["unscorable"] == []
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
        "method": "option_text", "strict_letter": "C", "reading": "C", "reading_rule": "first sentence",
        "verdicts": {"huatuo": False, "reader": False, "strict": False},
    }  # fmt: skip


def test_comparison_rows_carry_published_numbers_and_the_mmmu_caveat():
    predictions = [(item(1), "B"), (item(2, dataset="MMMU_Medical_Validation"), "B"), (item(3, dataset="Mine"), "A")]
    rows = {r.suite: r for r in comparison_rows(score(predictions))}
    assert list(rows) == ["vqa-rad", "mmmu-medical", "Mine"]
    rad = rows["vqa-rad"]
    assert (rad.ours, rad.n, rad.huatuo_7b, rad.huatuo_34b, rad.rerun_7b) == (
        {"huatuo": 100.0, "reader": 100.0, "strict": 100.0}, 1, 63.7, 68.1, 61.35,
    )  # fmt: skip
    assert rad.baselines["LLaVA-Med-7B"] == 51.4 and len(rad.baselines) == 11 and rad.comparable
    mmmu = rows["mmmu-medical"]
    assert (mmmu.huatuo_7b, mmmu.huatuo_34b, mmmu.comparable) == (50.6, 54.4, False)
    assert "TEST" in mmmu.note and "VALIDATION" in mmmu.note
    assert rows["Mine"].huatuo_7b is None and not rows["Mine"].comparable and rows["Mine"].ours["huatuo"] == 0.0
