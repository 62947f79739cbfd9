"""Paper step (b), the per-feature part: requests from maps and contexts, answers into a table.

:func:`build_requests` turns each feature's highlighted top images (or, for a feature with no image
maps, its top text contexts) into chat messages; :func:`explain_features` sends them through an
:class:`~mmsae.explain.client.Explainer` and returns one row per feature with the schema
``explanations`` in docs/development.md, 'Table schemas': failures and unparseable answers are rows too.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import polars as pl
import pyarrow as pa

from mmsae.explain.client import Explainer
from mmsae.explain.prompts import PROMPT_VERSION, image_messages, parse_response, text_messages

EXPLANATION_SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("explainer_model", pa.string()),
        ("prompt_version", pa.string()),
        ("explanation", pa.string()),
        ("raw_response", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("latency_s", pa.float64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("kind", pa.string()),
        ("n_inputs", pa.int32()),
        ("cached", pa.bool_()),
        # what the explainer was shown: text, each context's sample and max-activating token;
        # image, each top image's sample with token_index -1 ("the whole image")
        ("shown_examples", pa.list_(pa.struct([("sample_id", pa.string()), ("token_index", pa.int32())]))),
    ]
)


def build_requests(features: list[int], maps: pl.DataFrame, contexts: pl.DataFrame, maps_dir: Path,
                   max_images: int = 5, text_dominant: set[int] | frozenset = frozenset()) -> list[tuple[int, str, int, list[dict]]]:
    """``(feature, kind, n_inputs, messages)`` per feature: ``image`` when it has highlighted top
    images, else ``text`` when it has top contexts; features with neither are left out. Features in
    ``text_dominant`` (active more often on text than on image tokens) use their contexts first."""
    out = []
    for f in features:
        fm = maps.filter(pl.col("feature") == f).sort("rank").head(max_images)
        if fm.height and not (f in text_dominant and contexts.filter(pl.col("feature") == f).height):
            pngs = [(maps_dir / p).read_bytes() for p in fm["highlight"].to_list()]
            out.append((f, "image", len(pngs), image_messages(pngs)))
            continue
        fc = contexts.filter(pl.col("feature") == f).sort("rank")
        if fc.height:
            ctx = list(zip(fc["tokens"].to_list(), fc["activations"].to_list()))
            out.append((f, "text", len(ctx), text_messages(ctx)))
    return out


def shown_examples(requests: list[tuple[int, str, int, list[dict]]], maps: pl.DataFrame, contexts: pl.DataFrame,
                   top: pl.DataFrame | None = None) -> dict[int, list[dict]]:
    """``{feature: [{"sample_id", "token_index"}]}``: what each request of :func:`build_requests`
    showed, in rank order - its first ``n_inputs`` maps (token_index -1: the whole highlighted image)
    or contexts (token_index: the context's focus, the sample's max-activating token, looked up in
    ``top``, the top-samples table: feature, rank, sample_id, modality, token_index; -1 without it)."""
    focus = {}
    if top is not None and top.height:
        t = top.filter(pl.col("modality") == "text")
        focus = {(f, r, s): i for f, r, s, i in zip(t["feature"].to_list(), t["rank"].to_list(),
                                                    t["sample_id"].to_list(), t["token_index"].to_list())}
    out = {}
    for f, kind, n, _ in requests:
        if kind == "image":
            sids = maps.filter(pl.col("feature") == f).sort("rank").head(n)["sample_id"].to_list()
            out[f] = [{"sample_id": s, "token_index": -1} for s in sids]
        else:
            fc = contexts.filter(pl.col("feature") == f).sort("rank").head(n)
            out[f] = [{"sample_id": s, "token_index": int(focus.get((f, r, s), -1))}
                      for r, s in zip(fc["rank"].to_list(), fc["sample_id"].to_list())]
    return out


def explain_features(requests: list[tuple[int, str, int, list[dict]]], explainer: Explainer,
                     shown: dict[int, list[dict]] | None = None) -> pa.Table:
    """Send every request (cached ones are not sent) and parse the answers into a table;
    ``shown`` (:func:`shown_examples`) fills the ``shown_examples`` column (null without it)."""
    answers = asyncio.run(explainer.complete_all([m for *_, m in requests], label="explain"))
    rows = []
    for (f, kind, n, _), ans in zip(requests, answers):
        if ans["error"] is not None:
            explanation, status = None, "failed"
        else:
            explanation, status = parse_response(ans["content"])
        rows.append({
            "feature": f, "explainer_model": explainer.cfg.model, "prompt_version": PROMPT_VERSION,
            "explanation": explanation, "raw_response": ans["content"], "status": status, "error": ans["error"],
            "latency_s": ans["latency_s"], "prompt_tokens": ans["prompt_tokens"],
            "completion_tokens": ans["completion_tokens"], "kind": kind, "n_inputs": n, "cached": ans["cached"],
            "shown_examples": (shown or {}).get(f),
        })
    return pa.Table.from_pylist(rows, schema=EXPLANATION_SCHEMA)
