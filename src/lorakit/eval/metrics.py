"""Task metrics for ``lorakit eval``: exact match, token F1, BLEU, ROUGE-L, contains.

All metrics are pure Python (BLEU delegates to sacrebleu). Text is normalised
SQuAD-style; Chinese, Japanese and Korean text is scored at character level for
F1, ROUGE-L and BLEU. GSM8K-style references (``... #### 42``) are scored on the
final numeric answer for exact match, F1 and contains.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

__all__ = [
    "METRICS",
    "contains_answer",
    "corpus_bleu",
    "exact_match",
    "extract_predicted_number",
    "extract_reference_answer",
    "is_cjk",
    "normalize_answer",
    "rouge_l",
    "score_all",
    "token_f1",
    "tokens",
]

METRICS = ("exact_match", "f1", "bleu", "rouge_l", "contains")

CJK_SHARE = 0.3

_CJK_RANGES = (
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x3040, 0x309F),  # Hiragana
    (0x30A0, 0x30FF),  # Katakana
    (0x3130, 0x318F),  # Hangul Compatibility Jamo
    (0x31F0, 0x31FF),  # Katakana Phonetic Extensions
    (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xAC00, 0xD7AF),  # Hangul Syllables
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0x20000, 0x2FA1F),  # CJK Extensions B-F and Compatibility Supplement
)

_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# An optional sign, digits with optional thousands separators, optional decimals.
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?")
_GSM8K_MARK = "####"


def _is_cjk_char(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def is_cjk(text: str) -> bool:
    """True when CJK characters make up at least 30% of the non-space characters."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return False
    return sum(_is_cjk_char(c) for c in chars) / len(chars) >= CJK_SHARE


def normalize_answer(text: str) -> str:
    """Lowercase, strip ASCII/CJK punctuation, drop a/an/the, collapse whitespace."""
    text = str(text).lower()
    text = "".join(" " if _is_punct(c) else c for c in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _normalize_number(raw: str) -> str:
    """'1,234' -> '1234', '5.0' -> '5', '0.50' -> '0.5', '-0' -> '0'."""
    s = raw.replace(",", "").strip().rstrip(".")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def _is_gsm8k(reference: str) -> bool:
    return _GSM8K_MARK in reference


def extract_reference_answer(reference: str) -> str:
    """The number after ``####`` (normalised) for GSM8K references, else the reference."""
    if not _is_gsm8k(reference):
        return reference
    tail = reference.rsplit(_GSM8K_MARK, 1)[1].strip()
    match = _NUMBER.search(tail)
    if match:
        return _normalize_number(match.group())
    return tail


def extract_predicted_number(prediction: str) -> str | None:
    """The number after ``####`` if present, else the last number in the text."""
    if _is_gsm8k(prediction):
        match = _NUMBER.search(prediction.rsplit(_GSM8K_MARK, 1)[1])
        if match:
            return _normalize_number(match.group())
    numbers = _NUMBER.findall(prediction)
    return _normalize_number(numbers[-1]) if numbers else None


def tokens(text: str, cjk: bool | None = None) -> list[str]:
    """Characters (no spaces/punctuation) for CJK text, else normalised words.

    ``cjk`` forces the mode; by default it is ``is_cjk(text)``.
    """
    text = str(text)
    if cjk is None:
        cjk = is_cjk(text)
    if cjk:
        return [c for c in text.lower() if not c.isspace() and not _is_punct(c)]
    return normalize_answer(text).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised texts (or GSM8K final numbers) are equal, else 0.0."""
    if _is_gsm8k(reference):
        predicted = extract_predicted_number(prediction)
        return float(predicted is not None and predicted == extract_reference_answer(reference))
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _f1(pred_toks: list[str], ref_toks: list[str]) -> float:
    if not pred_toks and not ref_toks:
        return 1.0
    if not pred_toks or not ref_toks:
        return 0.0
    overlap = sum((Counter(pred_toks) & Counter(ref_toks)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_toks)
    recall = overlap / len(ref_toks)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD bag-of-tokens F1; character level when the reference is CJK."""
    if _is_gsm8k(reference):
        ref_answer = extract_reference_answer(reference)
        pred_answer = extract_predicted_number(prediction) or ""
        if _NUMBER.fullmatch(ref_answer) and _NUMBER.fullmatch(pred_answer):
            return float(pred_answer == ref_answer)
        prediction, reference = pred_answer, ref_answer
    cjk = is_cjk(reference)
    return _f1(tokens(prediction, cjk), tokens(reference, cjk))


def contains_answer(prediction: str, reference: str) -> float:
    """1.0 when the normalised reference answer occurs in the normalised prediction.

    GSM8K answers must appear as a whole number ("18" does not match "118"); other
    answers must appear on word boundaries (on characters for CJK).
    """
    if _is_gsm8k(reference):
        answer = extract_reference_answer(reference)
        found = {_normalize_number(n) for n in _NUMBER.findall(prediction)}
        return float(answer in found)
    if is_cjk(reference):
        ref = "".join(tokens(reference, cjk=True))
        pred = "".join(tokens(prediction, cjk=True))
        return float(ref in pred) if ref else float(not pred)
    ref = normalize_answer(reference)
    pred = normalize_answer(prediction)
    if not ref:
        return float(not pred)
    return float(f" {ref} " in f" {pred} ")


def _lcs_length(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta=1) from the longest common subsequence of ``tokens()``."""
    cjk = is_cjk(reference)
    pred_toks, ref_toks = tokens(prediction, cjk), tokens(reference, cjk)
    if not pred_toks and not ref_toks:
        return 1.0
    lcs = _lcs_length(pred_toks, ref_toks)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred_toks), lcs / len(ref_toks)
    return 2 * precision * recall / (precision + recall)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (0-100): tokenizer "zh" for CJK references, else "13a".

    sacrebleu's "zh" tokenizer puts spaces around every Chinese character (other
    text is tokenised like 13a), so CJK is scored at character level.
    """
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return 0.0
    import sacrebleu

    tokenize = "zh" if is_cjk("".join(references)) else "13a"
    result = sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize)
    return float(result.score)


_PER_SAMPLE = {
    "exact_match": exact_match,
    "f1": token_f1,
    "rouge_l": rouge_l,
    "contains": contains_answer,
}


def score_all(
    predictions: Sequence[str],
    references: Sequence[str],
    metrics: Sequence[str] | None = None,
) -> dict[str, float]:
    """Mean per-sample metrics and corpus BLEU, all as percentages (0-100)."""
    names = list(METRICS if metrics is None else metrics)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(map(repr, unknown))}; known metrics: {', '.join(METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    scores: dict[str, float] = {}
    for name in names:
        if name == "bleu":
            scores[name] = corpus_bleu(predictions, references)
        elif not predictions:
            scores[name] = 0.0
        else:
            fn = _PER_SAMPLE[name]
            total = sum(fn(p, r) for p, r in zip(predictions, references))
            scores[name] = 100.0 * total / len(predictions)
    return scores
