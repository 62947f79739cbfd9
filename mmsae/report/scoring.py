"""The report's explanation-scoring section (detection and fuzzing after EleutherAI delphi, on held-out examples):
plain data for ``templates/scoring.html.j2`` from ``scoring_summary.json`` and ``scoring.parquet``
(:mod:`mmsae.evaluate.scoring`)."""

from __future__ import annotations

import polars as pl

from mmsae.evaluate.accuracy import balanced_from_counts, confusion

METHODS = ("detection", "fuzzing")


def _pairs(groups: list[dict], by: str | None) -> list[dict]:
    """Real and shuffled side by side: one row per (method[, ``by``]) of the summary's groups."""
    rows: dict[tuple, dict] = {}
    for g in groups:
        key = (g["method"], g.get(by) if by else None)
        row = rows.setdefault(key, {"method": g["method"], "group": key[1]})
        row[g["explanation_kind"]] = {"mean": g.get("mean_balanced_accuracy"), "pooled": g.get("pooled_balanced_accuracy"),
                                      "auroc": g.get("pooled_auroc"), "n_scored": g.get("n_scored"),
                                      "n_failed": g.get("n_failed"), "n_features": g.get("n_features"),
                                      "n_features_scored": g.get("n_features_scored")}
    return [rows[k] for k in sorted(rows, key=lambda k: (k[1] or "", METHODS.index(k[0]) if k[0] in METHODS else 9))]


def scoring_view(summary: dict, table: pl.DataFrame | None = None) -> dict:
    """The section's data: balanced accuracy real vs shuffled per method overall, per modality and
    per category - pooled over features and mean per feature side by side, AUROC where there is one,
    with scored/failed counts - and one row per feature with its explanation and both methods' real
    and shuffled scores (from the feature's confusion counts over its requests; None where none was
    scored)."""
    features = []
    if table is not None and table.height:
        for (f,), g in table.sort("feature").group_by(["feature"], maintain_order=True):
            real = g.filter(pl.col("explanation_kind") == "real")
            cells = {}
            for method in METHODS:
                for kind in ("real", "shuffled"):
                    r = g.filter((pl.col("method") == method) & (pl.col("explanation_kind") == kind))
                    if r.is_empty():
                        cells[f"{method}_{kind}"] = None
                        continue
                    counts = [0, 0, 0, 0]  # the feature's confusion counts over its requests
                    for labels, preds in zip(r["labels"].to_list(), r["predictions"].to_list()):
                        counts = [a + b for a, b in zip(counts, confusion(labels, preds))]
                    bad = [st for st in r["status"].to_list() if st not in ("ok", "no_logprobs")]
                    cells[f"{method}_{kind}"] = {"score": balanced_from_counts(*counts),
                                                 "status": bad[0] if bad else "ok", "n": int(r["n_examples"].sum())}
            features.append({"feature": f, "modality": g["modality"][0], "category": g["category"][0],
                             "explanation": real["explanation"][0] if real.height else None,
                             "shuffled_from": g.filter(pl.col("explanation_kind") == "shuffled")["explanation_of"].first(),
                             **cells})
    return {"overall": _pairs(summary.get("overall", []), None),
            "by_modality": _pairs(summary.get("by_modality", []), "modality"),
            "by_category": _pairs(summary.get("by_category", []), "category"),
            "status": summary.get("status", {}), "scorer_model": summary.get("scorer_model"),
            "mode": summary.get("mode"), "prompts": summary.get("prompts"), "forced_choice": summary.get("forced_choice"),
            "n_features": summary.get("n_features", 0), "features": features}
