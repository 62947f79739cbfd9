"""How well a scorer's predictions separate activating from non-activating examples: balanced
accuracy (delphi's ``accuracy``), confusion counts and their pooled balanced accuracy, and AUROC.
Pure functions of labels and predictions, shared by the scoring rule and the report."""

from __future__ import annotations

import numpy as np


def balanced_accuracy(labels: list[int], predictions: list[int | None]) -> float | None:
    """(TPR + TNR) / 2 over the examples with a prediction (delphi's ``accuracy``).

    Args:
        labels: 1 activating, 0 not; predictions: 1, 0 or None (no prediction), one per label.

    Returns:
        The balanced accuracy in [0, 1]; None when no activating or no non-activating example has a
        prediction (one of the two rates is undefined; delphi would count it as 0).
    """
    pairs = [(y, p) for y, p in zip(labels, predictions, strict=True) if p is not None]
    pos = [p for y, p in pairs if y == 1]
    neg = [p for y, p in pairs if y == 0]
    if not pos or not neg:
        return None
    return (sum(pos) / len(pos) + sum(1 - p for p in neg) / len(neg)) / 2


def confusion(labels: list[int], predictions: list[int | None] | None) -> tuple[int, int, int, int]:
    """``(TP, FN, TN, FP)`` over the examples with a prediction (None: none has one)."""
    tp = fn = tn = fp = 0
    for y, p in zip(labels, predictions or [None] * len(labels)):
        if p is None:
            continue
        tp += y == 1 and p == 1
        fn += y == 1 and p == 0
        tn += y == 0 and p == 0
        fp += y == 0 and p == 1
    return tp, fn, tn, fp


def balanced_from_counts(tp: int, fn: int, tn: int, fp: int) -> float | None:
    """(TPR + TNR) / 2 from confusion counts; None when there is no positive or no negative."""
    if tp + fn == 0 or tn + fp == 0:
        return None
    return (tp / (tp + fn) + tn / (tn + fp)) / 2


def auroc(labels: list[int], scores: list[float]) -> float | None:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties counted half:
    (sum of the positives' mid-ranks - n1 (n1 + 1) / 2) / (n1 n0). None without both classes."""
    y, x = np.asarray(labels, int), np.asarray(scores, float)
    n1, n0 = int((y == 1).sum()), int((y == 0).sum())
    if n1 == 0 or n0 == 0:
        return None
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(sx):  # mid-ranks of tied runs (1-based)
        j = i
        while j + 1 < len(sx) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
