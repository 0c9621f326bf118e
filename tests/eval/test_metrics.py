"""Hand-computed cases for lorakit.eval.metrics."""

import math

import pytest
import sacrebleu

from lorakit.eval.metrics import (
    METRICS,
    contains_answer,
    corpus_bleu,
    exact_match,
    extract_predicted_number,
    extract_reference_answer,
    is_cjk,
    normalize_answer,
    rouge_l,
    score_all,
    token_f1,
    tokens,
)

GSM_REF = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 18"


def test_is_cjk():
    assert is_cjk("我爱北京")
    assert is_cjk("こんにちは") and is_cjk("カタカナ") and is_cjk("안녕하세요")
    assert is_cjk("Beijing 是首都")  # 3 of 10 non-space chars
    assert not is_cjk("hello world")
    assert not is_cjk("the answer is 北")  # 1 of 13 non-space chars
    assert not is_cjk("")


def test_normalize_answer():
    assert normalize_answer("The  Cat, sat!  on a MAT.") == "cat sat on mat"
    assert normalize_answer("An apple") == "apple"
    assert normalize_answer("theory") == "theory"  # articles only as whole words
    assert normalize_answer("北京，是首都。") == "北京 是首都"


def test_tokens():
    assert tokens("the cat sat on the mat") == ["cat", "sat", "on", "mat"]
    assert tokens("我爱 北京！") == ["我", "爱", "北", "京"]


@pytest.mark.parametrize(
    ("reference", "expected"),
    [("...\n#### 18", "18"), ("#### 1,234", "1234"), ("#### 5.0", "5"), ("#### -3", "-3"), ("no marker", "no marker")],
)
def test_extract_reference_answer(reference, expected):
    assert extract_reference_answer(reference) == expected


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("so the answer is $18.", "18"),
        ("costs 1,234 dollars", "1234"),
        ("first 3 then 7.50", "7.5"),
        ("it drops to -4", "-4"),
        ("#### 12 (checked with 99)", "12"),
        ("no number here", None),
    ],
)
def test_extract_predicted_number(prediction, expected):
    assert extract_predicted_number(prediction) == expected


def test_exact_match():
    assert exact_match("The cat!", "cat") == 1.0
    assert exact_match("a dog", "cat") == 0.0
    assert exact_match("48 / 2 = 24, 24 - 6 = 18, so the answer is 18.", GSM_REF) == 1.0
    assert exact_match("the answer is 17", GSM_REF) == 0.0
    assert exact_match("I don't know", GSM_REF) == 0.0
    assert exact_match("The total is 1234", "steps\n#### 1,234") == 1.0


def test_token_f1():
    # [cat, sat, on, mat] vs [cat, sat]: P = 2/4, R = 2/2, F1 = 2*0.5*1/1.5
    assert token_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    # counts matter: [cat, cat] vs [cat]: overlap 1, P = 1/2, R = 1
    assert token_f1("cat cat", "cat") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0
    assert token_f1("cat", "") == 0.0
    assert token_f1("dog", "cat") == 0.0
    # CJK at character level: 我爱北京 vs 我爱上海, overlap 2, P = R = 0.5
    assert token_f1("我爱北京", "我爱上海") == pytest.approx(0.5)
    # GSM8K: scored on the extracted answers
    assert token_f1("so it is 18", GSM_REF) == 1.0
    assert token_f1("so it is 19", GSM_REF) == 0.0


def test_contains_answer():
    assert contains_answer("I think it is Paris, France.", "paris") == 1.0
    assert contains_answer("a category", "cat") == 0.0
    assert contains_answer("答案是北京。", "北京") == 1.0
    assert contains_answer("8 + 10 = 18 apples", GSM_REF) == 1.0
    assert contains_answer("118 apples", "#### 18") == 0.0
    assert contains_answer("1,234 apples", "#### 1234") == 1.0


def test_rouge_l():
    # [w, x, y, z] vs [w, y, q, z, v]: LCS = w y z = 3, P = 3/4, R = 3/5
    p, r = 3 / 4, 3 / 5
    assert rouge_l("w x y z", "w y q z v") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l("the cat sat", "cat sat") == 1.0
    assert rouge_l("dog", "cat") == 0.0
    # Chinese, characters: 我爱北京天安门 vs 我在北京: LCS = 我北京 = 3, P = 3/7, R = 3/4
    p, r = 3 / 7, 3 / 4
    assert rouge_l("我爱北京天安门", "我在北京") == pytest.approx(2 * p * r / (p + r))


def test_corpus_bleu_english():
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    assert corpus_bleu(["xyz qqq"], ["the cat sat on the mat"]) == pytest.approx(0, abs=1e-6)
    assert corpus_bleu([], []) == 0.0
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [])


def test_corpus_bleu_chinese_is_character_level():
    assert corpus_bleu(["我爱北京天安门"], ["我爱北京天安门"]) == pytest.approx(100)
    # chars: 1-gram 4/7, 2-gram 3/6, 3-gram 2/5, 4-gram 1/4; hypothesis longer so BP = 1
    expected = 100 * math.prod([4 / 7, 3 / 6, 2 / 5, 1 / 4]) ** 0.25
    score = corpus_bleu(["我爱北京天安门"], ["我爱北京故宫"])
    assert score == pytest.approx(expected)
    assert score > 0
    # 13a would treat each unspaced sentence as one token and give nothing
    word_level = sacrebleu.corpus_bleu(["我爱北京天安门"], [["我爱北京故宫"]], tokenize="13a").score
    assert word_level == 0.0 < score


def test_score_all_percentages():
    preds = ["the cat sat", "so the answer is 18.", "dog"]
    refs = ["cat sat", GSM_REF, "a cat"]
    scores = score_all(preds, refs)
    assert set(scores) == set(METRICS)
    assert scores["exact_match"] == pytest.approx(200 / 3)
    assert scores["f1"] == pytest.approx(200 / 3)
    assert scores["contains"] == pytest.approx(200 / 3)
    assert all(0 <= v <= 100 for v in scores.values())
    assert score_all(preds, refs, metrics=["f1"]) == {"f1": pytest.approx(200 / 3)}


def test_score_all_unknown_metric():
    with pytest.raises(ValueError, match="known metrics: exact_match, f1, bleu, rouge_l, contains"):
        score_all(["a"], ["a"], metrics=["f1", "meteor"])
