"""medvl.evaluate.reader: golden cases, each a realistic model output with what a careful human reader takes it
to answer (a letter, or None for no answer: none named, two different options named, or a letter past the
options). The `reader` verdict must agree on >= 98 % and never read an option where the human reads none or
another one (that would credit an answer a reader calls wrong for some gold)."""

from __future__ import annotations

from collections import Counter

import pytest

from medvl.evaluate.reader import Reading, exact_option, normalize, read_answer

YN = ("Yes", "No")
yn = ("yes", "no")
FOUR = ("Pneumonia", "Pleural effusion", "Cardiomegaly", "Normal")
MOD = ("CT", "MRI", "X-ray", "Ultrasound")
LYMPH = ("B-cell lymphoma", "T-cell lymphoma", "Hodgkin lymphoma", "Metastatic carcinoma")
DEF = ("Iron deficiency", "Folate deficiency", "Vitamin B12 deficiency", "Vitamin C deficiency")
HEP = ("Hepatitis A", "Hepatitis B", "Hepatitis C", "Cirrhosis")
LR = ("Left", "Right")
CYST = ("Cyst", "Mass")
COUNT = ("0", "1", "2", "3")
DRUG = ("Aspirin", "Heparin", "Warfarin", "Clopidogrel", "Alteplase")
NINE = ("Stage 0", "Stage 1", "Stage 2", "Stage 3", "Stage 4", "Stage 5", "Stage 6", "Stage 7", "Stage 8")

# (kind, output, options, what a careful reader takes the answer to be)
GOLDEN = [
    # a letter, any case, bare or wrapped
    ("letter", "B", FOUR, "B"),
    ("letter", "b", FOUR, "B"),
    ("letter", " c \n", FOUR, "C"),
    ("letter", "D.", FOUR, "D"),
    ("letter", "a.", FOUR, "A"),
    ("letter", "a", FOUR, "A"),
    ("letter", "C)", FOUR, "C"),
    ("letter", "(b)", FOUR, "B"),
    ("letter", "(B)", FOUR, "B"),
    ("letter", "[C]", FOUR, "C"),
    ("letter", "**B**", FOUR, "B"),
    ("letter", "*d*", FOUR, "D"),
    ("letter", "'B'", FOUR, "B"),
    ('letter', '"c"', FOUR, "C"),
    ("letter", "B:", FOUR, "B"),
    ("letter", "`A`", FOUR, "A"),
    ("letter", "\\boxed{B}", FOUR, "B"),
    ("letter", "$\\boxed{c}$", FOUR, "C"),
    ("letter", "<answer>D</answer>", FOUR, "D"),
    ("letter", "Answer: b", FOUR, "B"),
    ("letter", "Answer: (C)", FOUR, "C"),
    ("letter", "ANSWER: A", FOUR, "A"),
    ("letter", "The answer is b.", FOUR, "B"),
    ("letter", "The answer is (B).", FOUR, "B"),
    ("letter", "The correct answer is **C**.", FOUR, "C"),
    ("letter", "The correct option is D.", FOUR, "D"),
    ("letter", "Option B", FOUR, "B"),
    ("letter", "option c", FOUR, "C"),
    ("letter", "I think it's b.", FOUR, "B"),
    ("letter", "I think it's B.", FOUR, "B"),
    ("letter", "I'd go with C.", FOUR, "C"),
    ("letter", "I would choose b", FOUR, "B"),
    ("letter", "My answer is C", FOUR, "C"),
    ("letter", "B is the correct answer.", FOUR, "B"),
    ("letter", "b is correct", FOUR, "B"),
    ("letter", "A", YN, "A"),
    ("letter", "b", yn, "B"),
    ("letter", "(a)", MOD, "A"),
    ("letter", "E", DRUG, "E"),
    ("letter", "e)", DRUG, "E"),
    ("letter", "Answer: B\n", MOD, "B"),
    ("letter", "### Answer\nB", FOUR, "B"),
    ("letter", "I believe B.", FOUR, "B"),
    ("letter", "Final answer: c", FOUR, "C"),
    ("letter", "Answer - B", FOUR, "B"),
    ("letter", "answer:b", FOUR, "B"),
    ("letter", "I", NINE, "I"),
    ("letter", "i", NINE, "I"),
    ("letter", "The answer is I.", NINE, "I"),
    # full-width letters and punctuation
    ("full-width", "Ｂ", FOUR, "B"),
    ("full-width", "ｃ", FOUR, "C"),
    ("full-width", "（Ｂ）", FOUR, "B"),
    ("full-width", "答案：Ｃ", FOUR, "C"),
    ("full-width", "Ａ．", MOD, "A"),
    ("full-width", "选Ｄ", FOUR, "D"),
    # Chinese answer cues
    ("cjk", "答案是b", FOUR, "B"),
    ("cjk", "答案是B", FOUR, "B"),
    ("cjk", "答案为C。", FOUR, "C"),
    ("cjk", "选B", FOUR, "B"),
    ("cjk", "正确答案是D", FOUR, "D"),
    ("cjk", "应选A", FOUR, "A"),
    ("cjk", "答案是B，因为肋膈角变钝。", FOUR, "B"),
    ("cjk", "B。", FOUR, "B"),
    ("cjk", "答案：（c）", MOD, "C"),
    # letter with its own option text
    ("letter+text", "B. Pleural effusion", FOUR, "B"),
    ("letter+text", "b) Pleural effusion", FOUR, "B"),
    ("letter+text", "(B) Pleural effusion", FOUR, "B"),
    ("letter+text", "B - Pleural effusion", FOUR, "B"),
    ("letter+text", "B: pleural effusion.", FOUR, "B"),
    ("letter+text", "C. Cardiomegaly\n", FOUR, "C"),
    ("letter+text", "Answer: D. Normal", FOUR, "D"),
    ("letter+text", "The answer is B (MRI).", MOD, "B"),
    ("letter+text", "C. Hepatitis C", HEP, "C"),
    ("letter+text", "A. B-cell lymphoma", LYMPH, "A"),
    ("letter+text", "D. Vitamin C deficiency", DEF, "D"),
    ("letter+text", "**B. Heparin**", DRUG, "B"),
    ("letter+text", "Correct answer: (D) Normal", FOUR, "D"),
    ("letter+text", "The correct answer is A, Pneumonia.", FOUR, "A"),
    ("letter+text", "Pleural effusion (B)", FOUR, "B"),
    ("letter+text", "Option B: Pleural effusion", FOUR, "B"),
    ("letter+text", "The answer is c) Cardiomegaly", FOUR, "C"),
    # option text alone
    ("text", "Pleural effusion", FOUR, "B"),
    ("text", "pleural effusion", FOUR, "B"),
    ("text", "Pleural effusion.", FOUR, "B"),
    ("text", "CARDIOMEGALY", FOUR, "C"),
    ("text", "Yes", YN, "A"),
    ("text", "no", YN, "B"),
    ("text", "No.", yn, "B"),
    ("text", "YES", yn, "A"),
    ("text", "MRI", MOD, "B"),
    ("text", "Ultrasound", MOD, "D"),
    ("text", "X-ray", MOD, "C"),
    ("text", "Heparin", DRUG, "B"),
    ("text", "Right", LR, "B"),
    ("text", "left", LR, "A"),
    ("text", "B-cell lymphoma", LYMPH, "A"),
    ("text", "Vitamin C deficiency", DEF, "D"),
    ("text", "Vitamin B12 deficiency", DEF, "C"),
    ("text", "Hepatitis B", HEP, "B"),
    ("text", "2", COUNT, "C"),
    ("text", "Ｍetastatic carcinoma", LYMPH, "D"),
    ("text", "Stage 3", NINE, "D"),
    ("text", "Vitamin C", DEF, "D"),  # a reader completes the option; `reader` needs its whole text
    ("text", "Hodgkin", LYMPH, "C"),  # likewise
    # option text inside a sentence
    ("text-in-sentence", "The image shows a pleural effusion.", FOUR, "B"),
    ("text-in-sentence", "This is most consistent with cardiomegaly.", FOUR, "C"),
    ("text-in-sentence", "The heart size is normal.", FOUR, "D"),
    ("text-in-sentence", "Yes, there is a pleural effusion.", YN, "A"),
    ("text-in-sentence", "No, the heart is not enlarged.", YN, "B"),
    ("text-in-sentence", "Yes, there is no evidence of malignancy.", yn, "A"),
    ("text-in-sentence", "No, no fracture is seen.", YN, "B"),
    ("text-in-sentence", "The answer is yes.", yn, "A"),
    ("text-in-sentence", "This is an MRI scan of the brain.", MOD, "B"),
    ("text-in-sentence", "The modality is CT.", MOD, "A"),
    ("text-in-sentence", "The lesion is in the right lobe.", LR, "B"),
    ("text-in-sentence", "A lesion is seen in the right lung.", LR, "B"),
    ("text-in-sentence", "The most likely diagnosis is B-cell lymphoma.", LYMPH, "A"),
    ("text-in-sentence", "The patient most likely has vitamin C deficiency.", DEF, "D"),
    ("text-in-sentence", "Heparin would be the drug of choice here.", DRUG, "B"),
    ("text-in-sentence", "There are 3 nodules in the image.", COUNT, "D"),
    ("text-in-sentence", "The findings suggest a T-cell lymphoma rather than a B-cell lymphoma.", LYMPH, "B"),
    ("text-in-sentence", "Pleural effusion, not pneumonia.", FOUR, "B"),
    ("text-in-sentence", "It is not pneumonia; it is a pleural effusion.", FOUR, "B"),
    ("text-in-sentence", "Rather than cardiomegaly, this shows a pleural effusion.", FOUR, "B"),
    ("text-in-sentence", "Pneumonia is unlikely; the best answer is pleural effusion.", FOUR, "B"),
    ("text-in-sentence", "The serology pattern indicates hepatitis C infection.", HEP, "C"),
    ("text-in-sentence", "This is a stage 3 tumour; I think the staging is clear.", NINE, "D"),
    ("text-in-sentence", "The answer is yes, there is an effusion.", yn, "A"),
    ("text-in-sentence", "Yes, this is an MRI.", YN, "A"),
    ("text-in-sentence", "The image shows a normal chest.", FOUR, "D"),
    ("text-in-sentence", "Right side", LR, "B"),
    ("text-in-sentence", "I believe it is stage 4.", NINE, "E"),
    # explanations after the answer
    ("explained", "B. Pleural effusion is seen as blunting of the costophrenic angle.", FOUR, "B"),
    ("explained", "The answer is B. Pneumonia would show consolidation, which is absent here.", FOUR, "B"),
    ("explained", "Answer: C\nExplanation: the cardiac silhouette is enlarged, unlike a normal film.", FOUR, "C"),
    ("explained", "Cardiomegaly. The cardiothoracic ratio exceeds 0.5, so this is not normal.", FOUR, "C"),
    ("explained", "Let's analyze the image. The chest X-ray shows blunting of the left costophrenic angle with a "
                  "meniscus sign. This is characteristic of a pleural effusion. Therefore, the answer is B.",
     FOUR, "B"),
    ("explained", "Looking at the options: A. Pneumonia - no consolidation. B. Pleural effusion - meniscus sign "
                  "present. So the answer is B.", FOUR, "B"),
    ("explained", "Yes. The image demonstrates granulomatous inflammation with multinucleated giant cells.", yn,
     "A"),
    ("explained", "No. The nuclei are uniform and there is no invasion.", yn, "B"),
    ("explained", "The image is a T2-weighted MRI of the knee, so the answer is MRI.", MOD, "B"),
    ("explained", "A is incorrect; the answer is C.", FOUR, "C"),
    ("explained", "The answer is not A, it's B.", FOUR, "B"),
    ("explained", "B is more likely than A.", FOUR, "B"),
    ("explained", "Question: Which finding?\nA. Pneumonia\nB. Pleural effusion\nC. Cardiomegaly\nD. Normal\n"
                  "Answer: B", FOUR, "B"),
    ("explained", "Between A and C, I'd pick C.", FOUR, "C"),
    ("explained", "I think the answer is C, stage 2.", NINE, "C"),
    ("explained", "E.g. the mass is large, so the answer is b.", FOUR, "B"),
    ("explained", "Given the hyperechoic focus, this is an ultrasound image (D).", MOD, "D"),
    ("explained", "The drug that inhibits vitamin K epoxide reductase is warfarin.", DRUG, "C"),
    ("explained", "This T-wave pattern suggests a normal ECG.", FOUR, "D"),
    ("explained", "The answer is: B) Pleural effusion", FOUR, "B"),
    ("explained", "Based on the image, I would say the answer is C. Cardiomegaly.", FOUR, "C"),
    ("explained", "The answer is B, pleural effusion, because the angle is blunted.", FOUR, "B"),
    ("explained", "The image shows consolidation in the right lower lobe consistent with pneumonia. Answer: A",
     FOUR, "A"),
    ("explained", "No. A normal liver would be homogeneous.", yn, "B"),
    ("explained", "After careful review, option C (cardiomegaly) fits best.", FOUR, "C"),
    ("explained", "B cells dominate the infiltrate; this is a B-cell lymphoma.", LYMPH, "A"),
    # an option by its number
    ("number", "Option 2", FOUR, "B"),
    ("number", "option (3)", FOUR, "C"),
    ("number", "Choice 1", FOUR, "A"),
    ("number", "The answer is option 4.", FOUR, "D"),
    ("number", "The 2nd option.", FOUR, "B"),
    ("number", "第2个", FOUR, "B"),
    ("number", "选项3", MOD, "C"),
    ("number", "Answer: 2", FOUR, "B"),
    ("number", "Answer: 2", COUNT, "C"),  # options are numbers: "2" is the value
    ("number", "Option 2", COUNT, None),  # position 2 is "1", value 2 is "2": two readings
    ("number", "Option 5", FOUR, None),  # there is no fifth option
    # two different options
    ("two", "A or B", FOUR, None),
    ("two", "B or C", FOUR, None),
    ("two", "Either A or C.", FOUR, None),
    ("two", "A and B", FOUR, None),
    ("two", "B, C", FOUR, None),
    ("two", "The answer is B or C.", FOUR, None),
    ("two", "Both A and C are possible.", FOUR, None),
    ("two", "Pneumonia or pleural effusion", FOUR, None),
    ("two", "It could be pneumonia or cardiomegaly.", FOUR, None),
    ("two", "yes or no", yn, None),
    ("two", "Yes/No", YN, None),
    ("two", "MRI or CT", MOD, None),
    ("two", "B. Pneumonia", FOUR, None),  # B's letter with A's text
    ("two", "b) cyst", CYST, None),
    ("two", "A. Hepatitis B", HEP, None),
    ("two", "答案是A或B", FOUR, None),
    ("two", "A, B and C", FOUR, None),
    ("two", "A. Pneumonia\nB. Pleural effusion", FOUR, None),  # the options listed back
    ("two", "CT and MRI both show the lesion.", MOD, None),
    ("two", "A & B", FOUR, None),
    # nothing named
    ("none", "", FOUR, None),
    ("none", "I don't know.", FOUR, None),
    ("none", "I cannot determine this from the image.", FOUR, None),
    ("none", "The image is unclear.", YN, None),
    ("none", "E", FOUR, None),  # no option E
    ("none", "The answer is F.", DRUG, None),
    ("none", "None of the above", FOUR, None),
    ("none", "It is a chest radiograph.", FOUR, None),
    ("none", "Sorry, I can't help with that.", yn, None),
    ("none", "Not A.", FOUR, None),
    ("none", "Not pneumonia.", FOUR, None),
    ("none", "E.g. the mass", FOUR, None),
    ("none", "Not sure.", yn, None),
    ("none", "The vitamin D level is low.", FOUR, None),
    ("none", "Hepatitis B serology is needed.", FOUR, None),
    ("none", "A T1-weighted image.", FOUR, None),
    ("none", "I'm not certain.", NINE, None),
    ("none", "Please provide the image.", MOD, None),
    ("none", "A T2 hyperintense lesion", MOD, None),
    ("none", "The options do not match the image.", FOUR, None),
    # inferred: the reader of a description infers the answer; `reader` reads only named options (says none)
    ("inferred", "There is no pleural effusion.", YN, "B"),
]
# Written without looking at the rules, after the cases above passed: 51 of the first 57 and 33 of the next 34
# agreed, with 2 over-credits ("Warfarin is contraindicated ...; heparin is the answer" read as warfarin;
# "Looking at option A, ... So C." read as A). The negation, "over", answer-after, "So"/"Therefore" and
# number-word rules came from these; the 3 "inferred" cases stay as they are.
BLIND = [
    ("explained", "The answer is B. Pleural effusion.", FOUR, "B"),
    ("explained", "Answer: B. Pleural effusion\n\nThe chest X-ray shows a meniscus sign.", FOUR, "B"),
    ("explained", "Based on the image, the correct answer is:\n\nB. Pleural effusion", FOUR, "B"),
    ("letter", "**Answer:** B", FOUR, "B"),
    ("letter+text", "**B. Pleural effusion**\n\nExplanation: blunted costophrenic angle.", FOUR, "B"),
    ("letter+text", "The correct answer is (B) Pleural effusion.", FOUR, "B"),
    ("text-in-sentence", "Pleural effusion is the most likely diagnosis.", FOUR, "B"),
    ("text-in-sentence", "The most likely diagnosis is pleural effusion (option B).", FOUR, "B"),
    ("text-in-sentence", "It appears to be a CT scan.", MOD, "A"),
    ("text-in-sentence", "This appears to be an X-ray image.", MOD, "C"),
    ("text-in-sentence", "This is a computed tomography (CT) image.", MOD, "A"),
    ("text-in-sentence", "The image is an ultrasound.", MOD, "D"),
    ("text-in-sentence", "Based on the appearance, this is most likely an MRI, not a CT.", MOD, "B"),
    ("text-in-sentence", "Yes, the image shows evidence of pneumonia.", yn, "A"),
    ("inferred", "No evidence of malignancy.", yn, "B"),
    ("inferred", "There is a fracture of the distal radius.", YN, "A"),
    ("letter+text", "A. Pneumonia", FOUR, "A"),
    ("letter", "The answer is A", FOUR, "A"),
    ("letter+text", "a) Pneumonia", FOUR, "A"),
    ("explained", "Among the options, B (pleural effusion) is correct.", FOUR, "B"),
    ("explained", "Options A and C are incorrect. The answer is B.", FOUR, "B"),
    ("none", "C is wrong.", FOUR, None),
    ("letter", "I'm not sure, but I think it's C.", FOUR, "C"),
    ("cjk", "答案：B\n解析：胸腔积液表现为肋膈角变钝。", FOUR, "B"),
    ("letter", "B\n\nThe image shows a meniscus.", FOUR, "B"),
    ("letter", "B.", DRUG, "B"),
    ("text-in-sentence", "The correct choice is Heparin.", DRUG, "B"),
    ("explained", "Heparin (B) is preferred over warfarin in pregnancy.", DRUG, "B"),
    ("explained", "Warfarin is contraindicated in pregnancy; heparin is the answer.", DRUG, "B"),
    ("explained", "Both A and B could be correct, but B is more likely.", FOUR, "B"),
    ("explained", "Not C. The answer is D.", FOUR, "D"),
    ("letter+text", "The answer is D) Normal", FOUR, "D"),
    ("text", "Normal.", FOUR, "D"),
    ("text-in-sentence", "The chest X-ray appears normal.", FOUR, "D"),
    ("text-in-sentence", "No abnormality detected; the study is normal.", FOUR, "D"),
    ("text", "yes.", yn, "A"),
    ("text-in-sentence", "The lesion is located in the left kidney.", LR, "A"),
    ("two", "Left and right", LR, None),
    ("none", "Bilateral", LR, None),
    ("text", "1", COUNT, "B"),
    ("text-in-sentence", "There are two nodules.", COUNT, "C"),
    ("letter", "Option C is correct.", FOUR, "C"),
    ("letter", "The best answer is Option C.", FOUR, "C"),
    ("letter+text", "(C) Cardiomegaly", FOUR, "C"),
    ("letter+text", "C - cardiomegaly", FOUR, "C"),
    ("text", "Answer: Cardiomegaly", FOUR, "C"),
    ("text-in-sentence", "The image shows a well-defined hypoechoic lesion, consistent with a cyst.", CYST, "A"),
    ("text-in-sentence", "It's a mass, not a cyst.", CYST, "B"),
    ("text", "Cystic mass", CYST, "B"),
    ("none", "The answer is E. None of the above.", FOUR, None),
    ("letter", "D", DRUG, "D"),
    ("text-in-sentence", "Alteplase is used for acute ischemic stroke within 4.5 hours.", DRUG, "E"),
    ("text-in-sentence", "The answer is aspirin.", DRUG, "A"),
    ("two", "Aspirin and clopidogrel (dual antiplatelet therapy)", DRUG, None),
    ("letter+text", "The answer is: **C. Warfarin**", DRUG, "C"),
    ("letter+text", "C: Warfarin, a vitamin K antagonist.", DRUG, "C"),
    ("letter", "The correct answer is A because the consolidation is lobar.", FOUR, "A"),
    ("explained", "Step 1: The image is a frontal chest radiograph.\nStep 2: The costophrenic angle is blunted.\n"
                  "Step 3: This indicates fluid.\nTherefore, the correct option is B.", FOUR, "B"),
    ("explained", "So the answer is **B**.", FOUR, "B"),
    ("letter", "### Final Answer\n\\boxed{B}", FOUR, "B"),
    ("letter", "I can't be certain, but it looks like B.", FOUR, "B"),
    ("explained", "The heart is enlarged (cardiothoracic ratio > 0.5). Answer: C", FOUR, "C"),
    ("explained", "Looking at option A, pneumonia would show consolidation. Option B, pleural effusion, would blunt "
                  "the angle. Option C, cardiomegaly, is seen here. So C.", FOUR, "C"),
    ("text-in-sentence", "Findings are consistent with cardiomegaly; no pleural effusion.", FOUR, "C"),
    ("text-in-sentence", "This MRI shows a lesion; a CT would be needed to confirm calcification.", MOD, "B"),
    ("text-in-sentence", "The patient's lab values suggest iron deficiency anemia.", DEF, "A"),
    ("text-in-sentence", "Microcytic anemia points to iron deficiency rather than folate deficiency.", DEF, "A"),
    ("two", "Iron deficiency or vitamin B12 deficiency", DEF, None),
    ("letter", "The answer is (d)", DEF, "D"),
    ("letter", "Answer：Ｂ", DEF, "B"),
    ("text", "hepatitis c", HEP, "C"),
    ("text-in-sentence", "HCV infection, i.e. hepatitis C, is the cause.", HEP, "C"),
    ("two", "Hepatitis B or C", HEP, None),
    ("text-in-sentence", "The biopsy shows a T-cell lymphoma.", LYMPH, "B"),
    ("text-in-sentence", "Reed-Sternberg cells indicate Hodgkin lymphoma.", LYMPH, "C"),
    ("text", "yes, it is", yn, "A"),
    ("text", "No, it isn't.", yn, "B"),
    ("none", "It is difficult to say.", yn, None),
    ("text-in-sentence", "Yes — granulomas are present.", yn, "A"),
    ("text", "Right.", LR, "B"),
    ("text-in-sentence", "The mass is on the patient's left side.", LR, "A"),
    ("text", "3 nodules", COUNT, "D"),
    ("letter", "D) 3", COUNT, "D"),
    ("two", "C) 3", COUNT, None),
    ("letter", "E. Alteplase", DRUG, "E"),
    ("text-in-sentence", "For a STEMI within the window, alteplase is the thrombolytic of choice.", DRUG, "E"),
    ("number", "I choose option 3.", DRUG, "C"),
    ("none", "I choose option 7.", DRUG, None),
    ("letter", "答案:b", DRUG, "B"),
    ("letter", "選B", DRUG, "B"),
    ("text-in-sentence", "Normal study, no cardiomegaly.", FOUR, "D"),
]
# Found on review, after the blind batches: a vignette echoed back ("A 45-year-old man ...") was read as A, and
# an answer clause with its reason ("The answer is D, because option A ...") as two options; both fixed.
REVIEW = [
    ("none", "A 45-year-old man presents with chest pain.", FOUR, None),
    ("explained", "The answer is D, because option A would show consolidation.", FOUR, "D"),
    ("explained", "The answer is B since A is unlikely.", FOUR, "B"),
    ("explained", "The image is from a CT, so the answer is A.", MOD, "A"),
    ("letter", "The answer is a.", FOUR, "A"),
    ("text-in-sentence", "It is a B-cell lymphoma.", LYMPH, "A"),
    ("none", "Grade C", FOUR, None),
    ("text", "Type B aortic dissection", ("Type A aortic dissection", "Type B aortic dissection"), "B"),
    ("explained", "Option A is correct, not option B.", FOUR, "A"),
    ("none", "Neither A nor B.", FOUR, None),
    ("two", "Answer: A\nAnswer: B", FOUR, None),
    ("two", "Answer: A, B", FOUR, None),
    ("two", "The answer is B, or possibly C.", FOUR, None),
]
GOLDEN += BLIND + REVIEW


OUT_OF_SCOPE = {"inferred"}  # answers a reader infers from a description: `reader` must say none, never guess


def test_there_are_enough_golden_cases_of_every_kind():
    kinds = Counter(kind for kind, *_ in GOLDEN)
    assert len(GOLDEN) >= 300
    assert all(count >= 5 for kind, count in kinds.items() if kind not in OUT_OF_SCOPE), kinds
    assert len(kinds) == 11


def test_reader_agrees_with_the_human_reading_on_at_least_98_percent():
    disagree = [(out, want, read_answer(out, opts)) for _, out, opts, want in GOLDEN
                if read_answer(out, opts).letter != want]
    assert len(disagree) <= 0.02 * len(GOLDEN), "\n".join(map(repr, disagree))


def test_reader_never_reads_an_answer_the_human_does_not():
    """Reading X where the human reads None or Y would credit a wrong answer whenever the gold is X."""
    credited_wrongly = [(out, want, read_answer(out, opts).letter) for _, out, opts, want in GOLDEN
                        if read_answer(out, opts).letter not in (want, None)]
    assert credited_wrongly == []


@pytest.mark.parametrize("kind", sorted({k for k, *_ in GOLDEN} - OUT_OF_SCOPE))
def test_every_kind_is_read(kind):
    cases = [(out, opts, want) for k, out, opts, want in GOLDEN if k == kind]
    right = sum(read_answer(out, opts).letter == want for out, opts, want in cases)
    assert right >= 0.9 * len(cases), kind


def test_answers_only_inferable_from_a_description_are_read_as_none():
    assert [read_answer(out, opts).letter for k, out, opts, _ in GOLDEN if k in OUT_OF_SCOPE] == [None] * 3


def test_reading_says_which_scope_decided_and_what_it_named():
    assert read_answer("A or B", FOUR) == Reading(None, ("A", "B"), "first sentence")
    assert read_answer("Pneumonia is ruled out. Pleural effusion.", FOUR) == Reading("B", ("B",), "whole answer")
    assert read_answer("The answer is B. Pneumonia would show consolidation.", FOUR) == Reading(
        "B", ("B",), "answer cue")
    assert read_answer("no idea", FOUR) == Reading(None, (), "none")
    assert read_answer("A or B", FOUR).ambiguous and not read_answer("B", FOUR).ambiguous


def test_normalize_and_exact_option():
    assert normalize("（Ｂ）") == "(B)" and normalize("**b**") == "b" and normalize("\\boxed{C}") == "C"
    assert exact_option("B-cell lymphoma", LYMPH) == "A"
    assert exact_option(" vitamin c deficiency. ", DEF) == "D"
    assert exact_option("The answer is B-cell lymphoma", LYMPH) is None
    assert exact_option("", LYMPH) is None


# The examples of the README's `reader` rules table, in its order: the documentation must stay true.
README_EXAMPLES = [
    ("b", FOUR, "B"), ("(b)", FOUR, "B"), ("**B**", FOUR, "B"), ("[C]", FOUR, "C"), ("'B'", FOUR, "B"),
    ("\\boxed{B}", FOUR, "B"), ("<answer>B</answer>", FOUR, "B"), ("Ｂ", FOUR, "B"), ("（ｂ）", FOUR, "B"),
    ("答案：Ｃ", FOUR, "C"), ("答案是b", FOUR, "B"), ("选B", FOUR, "B"), ("正确答案是D", FOUR, "D"), ("E", FOUR, None),
    ("B. Pleural effusion", FOUR, "B"), ("b) pleural effusion", FOUR, "B"), ("pleural effusion", FOUR, "B"),
    ("B-cell lymphoma", LYMPH, "A"), ("The image shows a pleural effusion.", FOUR, "B"), ("Option 2", FOUR, "B"),
    ("choice (3)", FOUR, "C"), ("the 2nd option", FOUR, "B"), ("第2个", FOUR, "B"), ("选项3", FOUR, "C"),
    ("Answer: 2", COUNT, "C"), ("There are two nodules.", COUNT, "C"),
    ("The answer is B. Pneumonia would show consolidation.", FOUR, "B"),
    ("Warfarin is contraindicated; heparin is the answer.", DRUG, "B"),
    ("Looking at option A, pneumonia would show consolidation. Option C, cardiomegaly, is seen. So C.", FOUR, "C"),
    ("Cardiomegaly. The ratio exceeds 0.5, so this is not normal.", FOUR, "C"),
    ("A lesion is seen.", FOUR, None), ("I think so.", FOUR, None), ("e.g.", FOUR, None), ("vitamin D", FOUR, None),
    ("hepatitis B", FOUR, None), ("B cells", FOUR, None), ("B-mode", FOUR, None),
    ("Yes, there is no evidence of malignancy.", yn, "A"), ("Pleural effusion, not pneumonia.", FOUR, "B"),
    ("B is more likely than A.", FOUR, "B"), ("Looking at option A, it would show consolidation.", FOUR, None),
    ("A. Pneumonia\nB. Pleural effusion", FOUR, None), ("A or B", FOUR, None), ("B. Pneumonia", FOUR, None),
    ("yes or no", yn, None), ("I cannot determine this from the image.", FOUR, None),
]  # fmt: skip


@pytest.mark.parametrize(("output", "options", "want"), README_EXAMPLES, ids=[o for o, *_ in README_EXAMPLES])
def test_readme_rule_examples(output, options, want):
    assert read_answer(output, options).letter == want


def test_reader_never_fails_and_only_reads_this_items_letters_on_random_text():
    import random

    rng = random.Random(0)
    alphabet = list("aAbBcCdDeEiInNoO  ..::,;()[]*'\"#\n-_/\\12是为答案选项第个ＢｂNo") + [
        "yes ", "no ", "not ", "option ", "answer is ", "Pneumonia", "normal", " or ", "So ", "because "]
    for _ in range(5_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        options = rng.choice([FOUR, yn, COUNT, DRUG, NINE])
        reading = read_answer(text, options)
        assert reading.letter is None or reading.letter in "ABCDEFGHI"[: len(options)], repr(text)
        assert (reading.letter is None) == (len(reading.named) != 1), repr(text)
