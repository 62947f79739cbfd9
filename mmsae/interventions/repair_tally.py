"""The tally of answer repair's rows (:func:`mmsae.interventions.repair.repair_case`), without torch: the
repair rule's log and the report's section (:mod:`mmsae.report.repair`) count the same way."""

from __future__ import annotations


def tally(rows: list[dict]) -> dict:
    """Per case: the intervention rows tried, the top arm's successes, and the control's successes
    per draw (its expected count beside the top arm's), with the first successful top intervention.

    Returns:
        ``{case: {"n_trials", "successes", "control_successes", "control_draws", "first_success" (row or None)}}``.
    """
    out = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        top = [r for r in rows if r["case"] == case and r["arm"] == "top"]
        ctrl = [r for r in rows if r["case"] == case and r["arm"] == "control"]
        draws = len({r["draw"] for r in ctrl})
        out[case] = {"n_trials": len(top), "successes": sum(r["success"] for r in top),
                     "control_successes": sum(r["success"] for r in ctrl) / draws if draws else None,
                     "control_draws": draws,
                     "first_success": next((r for r in sorted(top, key=lambda r: r["order"]) if r["success"]), None)}
    return out
