"""Answer metrics: SQuAD-style normalisation, exact match and token F1; fidelity measures."""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: list[str]) -> float:
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(g) for g in golds))


def answer_contains(prediction: str, golds: list[str]) -> float:
    """1.0 when a normalised gold answer appears, word-aligned, in the normalised prediction."""
    norm = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(g)} " in norm for g in golds if normalize_answer(g)))


def _f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: list[str]) -> float:
    return max((_f1(prediction, g) for g in golds), default=0.0)


def prefix_agreement(tokens: list[int], reference: list[int], length: int) -> float:
    """1.0 when the first ``length`` tokens equal the reference's (shorter must match whole)."""
    return float(tokens[:length] == reference[:length])


def mean_nll(logprobs: list[float]) -> float:
    return -sum(logprobs) / max(1, len(logprobs))


def gap_closed(method_nll: float, reuse_nll: float, prefill_nll: float) -> float:
    """Share of full reuse's NLL gap to full prefill that a method closes."""
    gap = reuse_nll - prefill_nll
    if gap <= 0:
        return float("nan")
    return (reuse_nll - method_nll) / gap
