"""Paper step (b), the per-feature part: requests from maps and contexts, answers into a table.

:func:`build_requests` turns each feature's highlighted top images (or, for a feature with no image
maps, its top text contexts) into chat messages; :func:`explain_features` sends them through an
:class:`~mmsae.explain.client.Explainer` and returns one row per feature with the schema
``explanations`` of ``shared/DESIGN.md``: failures and unparseable answers are rows too.
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


def explain_features(requests: list[tuple[int, str, int, list[dict]]], explainer: Explainer) -> pa.Table:
    """Send every request (cached ones are not sent) and parse the answers into a table."""
    answers = asyncio.run(explainer.complete_all([m for *_, m in requests]))
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
        })
    return pa.Table.from_pylist(rows, schema=EXPLANATION_SCHEMA)
