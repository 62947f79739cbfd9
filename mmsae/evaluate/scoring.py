"""Explanation scoring by detection and fuzzing, after EleutherAI delphi (arXiv 2410.13928), on our
OpenAI-compatible client and response cache.

For each explained feature and each method, the scorer is shown the explanation and the feature's
held-out examples (:mod:`~mmsae.evaluate.scoring_examples`: activating ones drawn across activation
quantiles, never one the explainer saw, and as many non-activating ones), shuffled and cut into
requests (:mod:`~mmsae.evaluate.scoring_prompts`):

* ``batch`` mode: ``n_examples`` examples per request, the answer a list of 0/1;
* ``logprob`` mode: one example per request, a one-token ``1``/``0`` answer with ``top_logprobs``;
  the prediction's score is P("1") normalised over {"0", "1"} (delphi's log-prob scoring), its
  prediction ``P >= 0.5``; AUROC is reported beside balanced accuracy. With a local scorer the
  probability is read off the model's own logits (:mod:`~mmsae.evaluate.forced_choice`).

Balanced accuracy is (TPR + TNR) / 2 (delphi ``compute_classification_metrics``), reported two ways
(:func:`summarise`): pooled (confusion counts summed over every feature's requests, as delphi) and
per feature (each feature's counts over its requests, then the mean over features). The baseline
scores each feature, on the same examples in the same order, with another feature's explanation: a
seeded derangement of the scored features (:func:`derangement`).

Failures are rows, never dropped: ``failed`` (the endpoint gave no answer after the client's retries;
not cached, so a rerun asks again), ``malformed`` (no usable answer; cached, as any answer) and
``no_examples``. They count neither as correct nor as wrong (delphi drops examples without a
prediction from the confusion counts); the summary gives the number of failures beside each score.
In logprob mode an answer without logprobs (e.g. ``transformers serve``, which ignores the field)
whose text is ``1``/``0`` is status ``no_logprobs``: counted in balanced accuracy, not in AUROC.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from mmsae.evaluate.accuracy import auroc, balanced_accuracy, balanced_from_counts, confusion  # noqa: F401 (public here too)
from mmsae.evaluate.scoring_examples import METHODS, Example
from mmsae.explain.cache import request_key
from mmsae.evaluate.scoring_prompts import (SCORING_VERSION, image_messages, parse_predictions, parse_single,
                                           probability_of_one, text_messages)

KINDS = ("real", "shuffled")
SCORING_SCHEMA = pa.schema([
    ("feature", pa.int32()),
    ("modality", pa.string()),
    ("category", pa.string()),
    ("method", pa.string()),
    ("explanation_kind", pa.string()),
    ("explanation", pa.string()),
    ("explanation_of", pa.int32()),
    ("mode", pa.string()),
    ("batch", pa.int32()),
    ("examples", pa.list_(pa.struct([("sample_id", pa.string()), ("token_index", pa.int32()), ("activating", pa.bool_())]))),
    ("n_examples", pa.int32()),
    ("n_activating", pa.int32()),
    ("n_predicted", pa.int32()),
    ("balanced_accuracy", pa.float64()),
    ("labels", pa.list_(pa.int8())),
    ("predictions", pa.list_(pa.int8())),
    ("probabilities", pa.list_(pa.float64())),
    ("status", pa.string()),
    ("error", pa.string()),
    ("raw_response", pa.string()),
    ("cached", pa.bool_()),
    ("latency_s", pa.float64()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("scorer_model", pa.string()),
    ("prompt_version", pa.string()),
    ("prompts", pa.string()),
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
    """One scorer request: some of a feature's examples (shuffled, with labels) under one explanation."""

    feature: int
    modality: str
    method: str
    kind: str
    explanation: str
    explanation_of: int
    batch: int
    examples: list[Example]
    messages: list[dict] | None  # None: no examples to show
    mode: str = "batch"
    prompts: str = "ours"

    @property
    def labels(self) -> list[int]:
        return [e.label for e in self.examples]


def build_tasks(explained: list[tuple[int, str, str]], examples: dict[tuple[int, str], list[Example]], seed: int,
                batch_size: int = 6, mode: str = "batch", prompts: str = "ours", delphi: dict | None = None) -> list[Task]:
    """Requests for every (feature, method, batch) with the real explanation and with the shuffled one.

    Args:
        explained: ``(feature, modality, explanation)`` of the features to score; modality ``text``
            or ``image`` (what the explainer was shown).
        examples: ``{(feature, method): [Example]}`` (:func:`~mmsae.evaluate.scoring_examples.collect_examples`).
        seed: seeds the example order (per feature and method) and the derangement.
        batch_size: examples per request in batch mode (logprob mode: 1).
        mode, prompts, delphi: see :func:`~mmsae.evaluate.scoring_prompts.text_messages`.

    A feature's examples appear in the same order and batches under both explanations, so the
    shuffled baseline differs from the real score only by the explanation. With fewer than 2
    features there is no shuffled baseline. A feature without examples gets one task per method
    and kind with no messages (status ``no_examples``).
    """
    size = 1 if mode == "logprob" else batch_size
    if size < 1:
        raise ValueError(f"scoring.n_examples must be >= 1, got {batch_size}")
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
            batches = [ex[k:k + size] for k in range(0, len(ex), size)] or [[]]
            for b, chunk in enumerate(batches):
                for kind, text, of in choices:
                    msgs = None
                    if chunk:
                        payloads = [e.payload for e in chunk]
                        msgs = (text_messages(method, text, payloads, mode, prompts, delphi) if modality == "text"
                                else image_messages(method, text, payloads, mode))
                    tasks.append(Task(f, modality, method, kind, text, of, b, chunk, msgs, mode, prompts))
    return tasks


def _read_answer(t: Task, ans: dict | None) -> tuple[list | None, list | None, str]:
    """(predictions, probabilities, status) of one task's answer."""
    if ans is None:
        return None, None, "no_examples"
    if ans["error"] is not None:
        return None, None, "failed"
    if t.mode == "batch":
        preds, status = parse_predictions(ans["content"], len(t.examples))
        return preds, None, status
    prob = probability_of_one(ans.get("logprobs"))
    if prob is not None:
        return [int(prob >= 0.5)], [prob], "ok"
    single = parse_single(ans["content"])
    return ([single], None, "no_logprobs") if single is not None else (None, None, "malformed")


def score_tasks(tasks: list[Task], explainer, categories: dict[int, str] | None = None) -> pa.Table:
    """Send every task's request (cached answers are not sent again) and score the answers.

    Args:
        explainer: an :class:`~mmsae.explain.Explainer` for the scorer endpoint (None when no task
            has examples: nothing is sent); in logprob mode its config must ask for ``logprobs``
            (:func:`logprob_sampling`).
        categories: ``{feature: concept category}`` from the evaluation, when there is one.

    Returns:
        One row per task (:data:`SCORING_SCHEMA`).
    """
    todo = [t for t in tasks if t.messages is not None]
    answers = dict(zip(map(id, todo), asyncio.run(explainer.complete_all([t.messages for t in todo], label="score")) if todo else []))
    model = explainer.cfg.model if explainer is not None else None
    rows = []
    for t in tasks:
        ans = answers.get(id(t))
        preds, probs, status = _read_answer(t, ans)
        ba = balanced_accuracy(t.labels, preds) if preds is not None else None
        rows.append({
            "feature": t.feature, "modality": t.modality, "category": (categories or {}).get(t.feature),
            "method": t.method, "explanation_kind": t.kind, "explanation": t.explanation,
            "explanation_of": t.explanation_of, "mode": t.mode, "batch": t.batch,
            "examples": [{"sample_id": e.sample_id, "token_index": e.token_index, "activating": bool(e.label)} for e in t.examples],
            "n_examples": len(t.labels), "n_activating": sum(t.labels),
            "n_predicted": len(preds) if preds is not None else 0, "balanced_accuracy": ba, "labels": t.labels,
            "predictions": preds, "probabilities": probs, "status": status, "error": ans["error"] if ans else None,
            "raw_response": ans["content"] if ans else None, "cached": bool(ans and ans["cached"]),
            **{k: ans[k] if ans else None for k in ("latency_s", "prompt_tokens", "completion_tokens")},
            "scorer_model": model, "prompt_version": SCORING_VERSION, "prompts": t.prompts,
        })
    return pa.Table.from_pylist(rows, schema=SCORING_SCHEMA)


def logprob_sampling(top_logprobs: int = 5) -> dict:
    """The request fields of logprob mode (OpenAI chat completions): a one-token answer with the
    ``top_logprobs`` most likely first tokens; merge into the endpoint's ``extra_body`` and set
    ``max_tokens`` 1."""
    return {"logprobs": True, "top_logprobs": int(top_logprobs)}


def all_cached(tasks: list[Task], cache, cfg) -> bool:
    """Whether every task with examples has its answer in ``cache`` (a
    :class:`~mmsae.explain.cache.ResponseCache`) for the endpoint ``cfg`` (an
    :class:`~mmsae.explain.EndpointConfig`): then no endpoint (nor local server) is needed."""
    return all(cache.get(request_key(cfg.model, t.messages, cfg.sampling())) is not None
               for t in tasks if t.messages is not None)


def _scores(rows: list[dict]) -> dict:
    """Pooled and per-feature balanced accuracy and AUROC of some rows (see :func:`summarise`)."""
    per_f: dict[int, list[dict]] = {}
    for r in rows:
        per_f.setdefault(r["feature"], []).append(r)
    pooled = [0, 0, 0, 0]
    feat_ba, feat_auc, all_y, all_p = [], [], [], []
    for g in per_f.values():
        counts = [0, 0, 0, 0]
        ys, ps = [], []
        for r in g:
            c = confusion(r["labels"], r["predictions"])
            counts = [a + b for a, b in zip(counts, c)]
            if r["probabilities"]:
                ys += r["labels"]
                ps += r["probabilities"]
        pooled = [a + b for a, b in zip(pooled, counts)]
        ba = balanced_from_counts(*counts)
        if ba is not None:
            feat_ba.append(ba)
        a = auroc(ys, ps) if ps else None
        if a is not None:
            feat_auc.append(a)
        all_y += ys
        all_p += ps
    return {"pooled_balanced_accuracy": balanced_from_counts(*pooled),
            "confusion": dict(zip(("tp", "fn", "tn", "fp"), pooled)),
            "mean_balanced_accuracy": float(np.mean(feat_ba)) if feat_ba else None,
            "n_features_scored": len(feat_ba),
            "pooled_auroc": auroc(all_y, all_p) if all_p else None,
            "mean_auroc": float(np.mean(feat_auc)) if feat_auc else None}


def _groups(rows: list[dict], by: tuple[str, ...]) -> list[dict]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in by), []).append(r)
    result = []
    for key in sorted(out, key=lambda k: tuple("" if v is None else str(v) for v in k)):
        g = out[key]
        result.append({**dict(zip(by, key)), "n_features": len({r["feature"] for r in g}),
                       "n_requests": len(g), "n_scored": sum(r["predictions"] is not None for r in g),
                       "n_failed": sum(r["status"] in ("failed", "malformed") for r in g), **_scores(g)})
    return result


def configured_scorer(endpoint: dict) -> str | None:
    """The scorer as the config names it: a local server's ``local_model`` as configured (e.g. the
    relative ``results/models/demo``, not the absolute path the server reports), else ``model``."""
    return endpoint.get("local_model") if endpoint.get("server") == "local" else endpoint.get("model")


def summarise(table: pa.Table, scorer_model: str | None = None) -> dict:
    """The summary per method and explanation kind (real, shuffled), overall, per modality and per
    category: balanced accuracy pooled (confusion counts summed over features, with the counts) and
    per feature (``mean_balanced_accuracy``: each feature's counts over its requests, mean over
    features), AUROC pooled and per-feature mean where probabilities exist (logprob mode), the
    number of features, requests, scored requests and failures (failed + malformed); and the
    status counts. ``scorer_model``: the scorer's name to store (:func:`configured_scorer`); None =
    the rows' ``scorer_model``."""
    rows = table.to_pylist()
    status: dict[str, int] = {}
    for r in rows:
        status[r["status"]] = status.get(r["status"], 0) + 1
    return {
        "prompt_version": SCORING_VERSION,
        "prompts": rows[0]["prompts"] if rows else None,
        "mode": rows[0]["mode"] if rows else None,
        "scorer_model": scorer_model if scorer_model is not None else rows[0]["scorer_model"] if rows else None,
        "n_features": len({r["feature"] for r in rows}),
        "status": status,
        "overall": _groups(rows, ("method", "explanation_kind")),
        "by_modality": _groups(rows, ("method", "modality", "explanation_kind")),
        "by_category": _groups([r for r in rows if r["category"] is not None], ("method", "category", "explanation_kind")),
    }
