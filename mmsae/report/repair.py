"""The report's answer-repair section (:mod:`mmsae.interventions.repair`): per case, the answer before,
each intervention on the top features with its answer after, and the successes beside the control's."""

from __future__ import annotations

import polars as pl

from mmsae.interventions.repair_tally import tally

KIND_LABELS = {"ablate_text": "ablate text features", "clamp_image": "clamp up image features"}


def repair_view(table: pl.DataFrame) -> dict:
    """Template data: one entry per case with its baseline, the top arm's rows in trial order and the
    tally (:func:`mmsae.interventions.repair_tally.tally`: successes, control successes per draw).

    Args:
        table: ``repair.parquet``.
    """
    rows = table.to_dicts()
    counts = tally(rows)
    cases = []
    for name, t in counts.items():
        mine = [r for r in rows if r["case"] == name]
        base = next(r for r in mine if r["arm"] == "baseline")
        top = sorted((r for r in mine if r["arm"] == "top"), key=lambda r: r["order"])
        cases.append({"name": name, "prompt": base["prompt"], "image": base["image"], "wrong": base["wrong"],
                      "correct": base["correct"], "answer_before": base["answer_before"], "text_before": base["text_before"],
                      "metric": base["metric"], "already_correct": base["flipped"], **t,
                      "first_label": t["first_success"] and KIND_LABELS.get(t["first_success"]["kind"], t["first_success"]["kind"]),
                      "rows": [{**r, "label": KIND_LABELS.get(r["kind"], r["kind"]),
                                "ppl_ratio": r["ppl_after"] / r["ppl_before"] if r["ppl_before"] else None} for r in top]})
    return {"cases": cases}


__all__ = ["repair_view"]
