"""Explanation scoring by detection and fuzzing (EleutherAI delphi, arXiv 2410.13928), on our
OpenAI-compatible client and response cache.

For each explained feature and each method, one request shows a scorer model the explanation and a
shuffled batch of activating and non-activating examples (:mod:`~mmsae.evaluate.scoring_examples`)
and asks for a 0/1 per example (:mod:`~mmsae.evaluate.scoring_prompts`). The score is the balanced
accuracy of those answers against the true labels (delphi ``log/result_analysis.py``
``compute_classification_metrics``: (TPR + TNR) / 2). The baseline scores each feature, on the same
examples in the same order, with another feature's explanation: a seeded derangement of the scored
features (:func:`derangement`).

Failures are rows, never dropped: ``failed`` (the endpoint gave no answer after the client's retries;
not cached, so a rerun asks again), ``malformed`` (no list of exactly one 0/1 per example; cached,
as any answer) and ``no_examples``. Their balanced accuracy is null: as in delphi (which drops
examples without a prediction from the confusion counts) a failure counts neither as correct nor as
wrong, and the summary gives the number of failures beside each mean.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from mmsae.evaluate.scoring_examples import METHODS
from mmsae.explain.cache import request_key
from mmsae.evaluate.scoring_prompts import SCORING_VERSION, image_messages, parse_predictions, text_messages

KINDS = ("real", "shuffled")
SCORING_SCHEMA = pa.schema([
    ("feature", pa.int32()),
    ("modality", pa.string()),
    ("category", pa.string()),
    ("method", pa.string()),
    ("explanation_kind", pa.string()),
    ("explanation", pa.string()),
    ("explanation_of", pa.int32()),
    ("n_examples", pa.int32()),
    ("n_activating", pa.int32()),
    ("n_predicted", pa.int32()),
    ("balanced_accuracy", pa.float64()),
    ("labels", pa.list_(pa.int8())),
    ("predictions", pa.list_(pa.int8())),
    ("status", pa.string()),
    ("error", pa.string()),
    ("raw_response", pa.string()),
    ("cached", pa.bool_()),
    ("latency_s", pa.float64()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("scorer_model", pa.string()),
    ("prompt_version", pa.string()),
])


def derangement(n: int, seed: int) -> list[int]:
    """A permutation of ``range(n)`` with no fixed point, uniform over derangements (rejection
    sampling from ``numpy.random.default_rng(seed)``); ``[]`` for n = 0.

    Raises:
        ValueError: n = 1 (no derangement exists).
    """
    if n == 1:
        raise ValueError("a derangement needs at least 2 items; 1 explained feature cannot be shuffled")
    rng = np.random.default_rng(seed)
    while True:  # P(derangement) -> 1/e, so a few tries on average
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm.tolist()


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


def explained_features(explanations: pl.DataFrame, include_untagged: bool, max_features: int | None) -> list[tuple[int, str, str]]:
    """``(feature, modality, explanation)`` of the features to score: those with an explanation
    (status ``ok``, and ``untagged`` when ``include_untagged``), by feature id, at most
    ``max_features`` (None: all). The modality is the explanation's ``kind``: what the explainer saw."""
    ok = ["ok", "untagged"] if include_untagged else ["ok"]
    rows = (explanations.filter(pl.col("status").is_in(ok) & pl.col("explanation").is_not_null())
            .sort("feature").select("feature", "kind", "explanation"))
    if max_features is not None:
        rows = rows.head(max_features)
    return [(int(f), k, e) for f, k, e in rows.iter_rows()]


@dataclass
class Task:
    """One scorer request: a feature's examples (shuffled, with labels) under one explanation."""

    feature: int
    modality: str
    method: str
    kind: str
    explanation: str
    explanation_of: int
    labels: list[int]
    messages: list[dict] | None  # None: no examples to show


def build_tasks(explained: list[tuple[int, str, str]], examples: dict[tuple[int, str], list[tuple]], seed: int) -> list[Task]:
    """Requests for every (feature, method) with the real explanation and with the shuffled one.

    Args:
        explained: ``(feature, modality, explanation)`` of the features to score; modality ``text``
            or ``image`` (what the explainer was shown).
        examples: ``{(feature, method): [(text or png bytes, label)]}``.
        seed: seeds the example order (per feature and method) and the derangement.

    A feature's examples appear in the same order under both explanations, so the shuffled
    baseline differs from the real score only by the explanation. With fewer than 2 features there
    is no shuffled baseline.
    """
    perm = derangement(len(explained), seed) if len(explained) >= 2 else None
    tasks = []
    for i, (f, modality, explanation) in enumerate(explained):
        choices = [("real", explanation, f)]
        if perm is not None:
            j = perm[i]
            choices.append(("shuffled", explained[j][2], explained[j][0]))
        for m, method in enumerate(METHODS):
            ex = list(examples.get((f, method), []))
            order = np.random.default_rng([seed, f, m]).permutation(len(ex)).tolist()
            ex = [ex[k] for k in order]
            labels = [y for _, y in ex]
            for kind, text, of in choices:
                msgs = None
                if ex:
                    make = text_messages if modality == "text" else image_messages
                    msgs = make(method, text, [x for x, _ in ex])
                tasks.append(Task(f, modality, method, kind, text, of, labels, msgs))
    return tasks


def score_tasks(tasks: list[Task], explainer, categories: dict[int, str] | None = None) -> pa.Table:
    """Send every task's request (cached answers are not sent again) and score the answers.

    Args:
        explainer: an :class:`~mmsae.explain.Explainer` for the scorer endpoint (None when no task
            has examples: nothing is sent).
        categories: ``{feature: concept category}`` from the evaluation, when there is one.

    Returns:
        One row per task (:data:`SCORING_SCHEMA`).
    """
    todo = [t for t in tasks if t.messages is not None]
    answers = dict(zip(map(id, todo), asyncio.run(explainer.complete_all([t.messages for t in todo])) if todo else []))
    model = explainer.cfg.model if explainer is not None else None
    rows = []
    for t in tasks:
        ans = answers.get(id(t))
        preds, status = None, "no_examples"
        if ans is not None and ans["error"] is not None:
            status = "failed"
        elif ans is not None:
            preds, status = parse_predictions(ans["content"], len(t.labels))
        ba = balanced_accuracy(t.labels, preds) if preds is not None else None
        rows.append({
            "feature": t.feature, "modality": t.modality, "category": (categories or {}).get(t.feature),
            "method": t.method, "explanation_kind": t.kind, "explanation": t.explanation,
            "explanation_of": t.explanation_of, "n_examples": len(t.labels), "n_activating": sum(t.labels),
            "n_predicted": len(preds) if preds is not None else 0, "balanced_accuracy": ba, "labels": t.labels,
            "predictions": preds, "status": status, "error": ans["error"] if ans else None,
            "raw_response": ans["content"] if ans else None, "cached": bool(ans and ans["cached"]),
            **{k: ans[k] if ans else None for k in ("latency_s", "prompt_tokens", "completion_tokens")},
            "scorer_model": model, "prompt_version": SCORING_VERSION,
        })
    return pa.Table.from_pylist(rows, schema=SCORING_SCHEMA)


def all_cached(tasks: list[Task], cache, cfg) -> bool:
    """Whether every task with examples has its answer in ``cache`` (a
    :class:`~mmsae.explain.cache.ResponseCache`) for the endpoint ``cfg`` (an
    :class:`~mmsae.explain.EndpointConfig`): then no endpoint (nor local server) is needed."""
    return all(cache.get(request_key(cfg.model, t.messages, cfg.sampling())) is not None
               for t in tasks if t.messages is not None)


def _groups(rows: list[dict], by: tuple[str, ...]) -> list[dict]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in by), []).append(r)
    result = []
    for key in sorted(out, key=lambda k: tuple("" if v is None else str(v) for v in k)):
        g = out[key]
        scores = [r["balanced_accuracy"] for r in g if r["balanced_accuracy"] is not None]
        result.append({**dict(zip(by, key)), "n_features": len({r["feature"] for r in g}), "n_scored": len(scores),
                       "n_failed": sum(r["status"] in ("failed", "malformed") for r in g),
                       "mean_balanced_accuracy": float(np.mean(scores)) if scores else None})
    return result


def summarise(table: pa.Table) -> dict:
    """The summary: mean balanced accuracy per method and explanation kind (real, shuffled),
    overall, per modality and per category, with the number of features, of scored rows and of
    failures (failed + malformed) in each group; and the status counts."""
    rows = table.to_pylist()
    status: dict[str, int] = {}
    for r in rows:
        status[r["status"]] = status.get(r["status"], 0) + 1
    return {
        "prompt_version": SCORING_VERSION,
        "scorer_model": rows[0]["scorer_model"] if rows else None,
        "n_features": len({r["feature"] for r in rows}),
        "status": status,
        "overall": _groups(rows, ("method", "explanation_kind")),
        "by_modality": _groups(rows, ("method", "modality", "explanation_kind")),
        "by_category": _groups([r for r in rows if r["category"] is not None], ("method", "category", "explanation_kind")),
    }
