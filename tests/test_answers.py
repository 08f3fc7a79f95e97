"""Answer extraction, option parsing, majority voting and the option reward."""

from __future__ import annotations

import pytest

from medssr_jax.answers import Vote, extract_answer, majority_vote, option_reward, parse_options

# --------------------------------------------------------------------------
# extract_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is B", "B"),
        ("The answer is B.", "B"),
        ("the answer is c", None),  # lower-case letters are not option letters
        ("THE ANSWER IS D", "D"),
        ("So the answer is: A", "A"),
        ("The answer is (E).", "E"),
        ("The answer is **C**", "C"),
        ("**The answer is C.**", "C"),
        ("The answer is: **(B)**", "B"),
        ("The answer is $\\boxed{D}$.", "D"),
        ("The answer is \\(A\\)", "A"),
        ("The answer is [C].", "C"),
        ("The final answer is option D", "D"),
        ("The correct answer is choice (A)", "A"),
        ("The answer is\nB", "B"),
        ("Therefore \\boxed{B}", "B"),
        ("Therefore $\\boxed{E}$", "E"),
        ("\\boxed{\\text{A}}", "A"),
        ("\\boxed{(C)}", "C"),
        ("\\boxed{ D. Metformin }", "D"),
        ("I pick [A]", "A"),
        ("[B]", "B"),
        # no letter actually stated
        ("The answer is Amoxicillin.", None),
        ("The answer is AB", None),
        ("The answer is B12 deficiency", None),
        ("\\boxed{Bacteria}", None),
        ("[AB]", None),
        ("The answer is unclear.", None),
        ("Option B looks right", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer_forms(text, expected):
    assert extract_answer(text) == expected


def test_last_match_wins_within_a_form():
    assert extract_answer("The answer is A. On reflection, the answer is C.") == "C"
    assert extract_answer("\\boxed{A} ... \\boxed{D}") == "D"
    assert extract_answer("[E] then [B]") == "B"


def test_last_match_wins_across_forms():
    assert extract_answer("The answer is A.\nFinal: \\boxed{B}") == "B"
    assert extract_answer("\\boxed{B}\nThe answer is A.") == "A"
    assert extract_answer("The answer is (D)\n[C]") == "C"
    assert extract_answer("[C] so the answer is **E**") == "E"
    # nested forms point at one letter
    assert extract_answer("The answer is [B]") == "B"
    assert extract_answer("The answer is \\boxed{C}") == "C"


def test_reasoning_then_answer():
    text = (
        "<think>\nOption A is wrong, maybe [B]? The answer is not obvious.\n</think>\n\n"
        "Hypokalemia causes U waves. The answer is C."
    )
    assert extract_answer(text) == "C"


def test_letter_must_be_an_option():
    assert extract_answer("The answer is E", options="ABCD") is None
    assert extract_answer("The answer is D", options="ABCD") == "D"
    assert extract_answer("The answer is B", options="AB") == "B"
    assert extract_answer("The answer is C", options="AB") is None
    # the last candidate decides even when it is invalid
    assert extract_answer("The answer is B. Actually the answer is F.", options="ABCDE") is None
    assert extract_answer("The answer is B. Actually the answer is F.", options="ABCDEF") == "F"
    assert extract_answer("The answer is B", options=["A", "B"]) == "B"


def test_bad_options_argument():
    with pytest.raises(ValueError, match="at least one"):
        extract_answer("The answer is A", options="")
    with pytest.raises(ValueError, match="single upper-case"):
        extract_answer("The answer is A", options=["AB"])
    with pytest.raises(ValueError, match="single upper-case"):
        extract_answer("The answer is a", options="abc")
    with pytest.raises(ValueError, match="repeated"):
        extract_answer("The answer is A", options="AAB")


def test_option_reward():
    assert option_reward("The answer is B.", "B") == 1.0
    assert option_reward("The answer is B.", "C") == 0.0
    assert option_reward("no answer here", "A") == 0.0
    assert option_reward("The answer is E", "E", options="ABCD") == 0.0
    assert option_reward("\\boxed{D}", "D", options="ABCD") == 1.0
    assert isinstance(option_reward("The answer is A", "A"), float)


# --------------------------------------------------------------------------
# parse_options

STEM = "A 60-year-old woman has fatigue and a hemoglobin of 8 g/dL.\nWhat is the next step?"


@pytest.mark.parametrize("n", [2, 3, 4, 5, 10])
def test_parse_options_2_to_10(n):
    letters = "ABCDEFGHIJ"[:n]
    text = STEM + "\n" + "\n".join(f"{c}. choice {c.lower()}" for c in letters)
    stem, opts = parse_options(text)
    assert stem == STEM
    assert opts == {c: f"choice {c.lower()}" for c in letters}
    assert list(opts) == list(letters)


def test_parse_options_marker_styles_and_spacing():
    text = (
        "  " + STEM + "  \n\nOptions:\n"
        "A) Iron studies\n"
        "\n"
        "  B. Bone marrow biopsy  \n"
        "(C) Transfusion\n"
        "D: Observe\n"
    )
    stem, opts = parse_options(text)
    assert stem == STEM
    assert opts == {"A": "Iron studies", "B": "Bone marrow biopsy", "C": "Transfusion", "D": "Observe"}


def test_parse_options_stem_line_that_looks_like_an_option():
    text = "A. baumannii was cultured.\nWhich drug?\nA. Colistin\nB. Penicillin"
    stem, opts = parse_options(text)
    assert stem == "A. baumannii was cultured.\nWhich drug?"
    assert opts == {"A": "Colistin", "B": "Penicillin"}


def test_parse_options_option_text_keeps_punctuation():
    _, opts = parse_options("Q?\nA. 5 mg/kg (IV), q8h.\nB) None of the above")
    assert opts == {"A": "5 mg/kg (IV), q8h.", "B": "None of the above"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("What is it?", "no options found"),
        ("What is it?\nB. x\nC. y", "no options found"),
        ("What is it?\nA. only one", "found 1"),
        (STEM + "\n" + "\n".join(f"{c}. {c.lower()}" for c in "ABCDEFGHIJK"), r"found 11 \(A\.\.K\)"),
        (STEM + "\nA. a\nC. c", "expected 'B'.*got 'C'"),
        (STEM + "\nA. a\nB. b\nB. b again", "expected 'C'.*got 'B'"),
        (STEM + "\nA. a\nB. b\nAnswer with the letter.", "not an option line: 'Answer with the letter.'"),
        (STEM + "\nA. a\nB.\nC. c", "option B on line 4 has no text"),
        ("A. a\nB. b", "no stem"),
        ("Options:\nA. a\nB. b", "no stem"),
    ],
)
def test_parse_options_malformed(text, message):
    with pytest.raises(ValueError, match=message):
        parse_options(text)


def test_parse_options_type_error():
    with pytest.raises(TypeError):
        parse_options(None)


# --------------------------------------------------------------------------
# majority_vote


def test_majority_vote_basic():
    v = majority_vote(["B", "A", "B", None, "B", "C"])
    assert v == Vote(
        label="B", confidence=0.5, counts={"A": 1, "B": 3, "C": 1, "D": 0, "E": 0}, n=6, n_unparseable=1
    )


def test_majority_vote_tie_broken_by_first_occurrence():
    v = majority_vote(["C", "A", "A", "C"])
    assert v.label == "C" and v.confidence == 0.5
    v = majority_vote([None, "A", "C", "C", "A"])
    assert v.label == "A" and v.confidence == pytest.approx(0.4)
    assert majority_vote(["D", "B"]).label == "D"
    assert majority_vote(["B", "D"]).label == "B"


def test_majority_vote_all_unparseable():
    v = majority_vote([None, None, None])
    assert v == Vote(label=None, confidence=0.0, counts={"A": 0, "B": 0, "C": 0, "D": 0, "E": 0}, n=3, n_unparseable=3)
    empty = majority_vote([])
    assert empty.label is None and empty.confidence == 0.0 and empty.n == 0 and empty.n_unparseable == 0


def test_majority_vote_out_of_option_answers_are_unparseable():
    v = majority_vote(["E", "A", "E", "X", "", "AB"], options="ABCD")
    assert v.label == "A"
    assert v.confidence == pytest.approx(1 / 6)
    assert v.counts == {"A": 1, "B": 0, "C": 0, "D": 0}
    assert v.n == 6 and v.n_unparseable == 5


def test_majority_vote_unanimous_and_two_options():
    v = majority_vote(["B"] * 8, options="AB")
    assert v == Vote(label="B", confidence=1.0, counts={"A": 0, "B": 8}, n=8, n_unparseable=0)


def test_majority_vote_from_extracted_completions():
    completions = [
        "The answer is B.",
        "After review, \\boxed{B}",
        "I think [A]",
        "not sure",
        "The answer is B. Wait, the answer is C.",
    ]
    v = majority_vote([extract_answer(c, "ABCD") for c in completions], options="ABCD")
    assert v.label == "B" and v.confidence == pytest.approx(0.4)
    assert v.counts == {"A": 1, "B": 2, "C": 1, "D": 0} and v.n_unparseable == 1


def test_vote_is_frozen():
    v = majority_vote(["A"])
    with pytest.raises(AttributeError):
        v.label = "B"


@pytest.mark.parametrize("text,strict,lenient", [
    ("C. Elastosis perforans serpiginosa is the answer", None, "C"),
    ("(B) Infantile Refsum disease", None, "B"),
    (" D) Warty dyskeratoma", None, "D"),
    ("B: the second one", None, "B"),
    ("C.", None, "C"),
    ("A patient with ...", None, None),        # a word, not a letter
    ("E. not an option here", None, None),     # leading letter outside the options
    ("A. first thought. The answer is B", "B", "B"),  # a strict form wins over the opening
    ("I think C. is right", None, None),       # only the opening counts
])
def test_lenient_reads_a_leading_option_letter(text, strict, lenient):
    assert extract_answer(text, "ABCD") == strict
    assert extract_answer(text, "ABCD", lenient=True) == lenient
    assert option_reward(text, "C", "ABCD", lenient=True) == (1.0 if lenient == "C" else 0.0)
