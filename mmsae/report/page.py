"""The run's report: one self-contained static HTML page (images inlined as data URLs), rendered
from the Jinja2 templates in ``mmsae/report/templates/`` with autoescaping on, one template per
section.

Sections: the run (model, hook point, corpus and token counts, skipped images), the SAE (held-out
FVU / L0 / dead fraction, token norms, training curve as inline SVG, and the loss recovered with it
spliced into the model), one card per selected feature
(statistics, top images with the activated regions highlighted and heatmaps, top text contexts with
the activating tokens marked, the explanation), then - when the workflow produced them - the
explanation evaluation, steering, attribution and multimodal neurons.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from jinja2 import Environment, PackageLoader

from mmsae.report.sections import (attribution_view, evaluation_view, feature_cards, loss_recovered_view, neurons_view,
                                   sae_view, steering_view)
from mmsae.report.scoring import scoring_view
from mmsae.report.views import curve, data_url, fmt, num

ENV = Environment(loader=PackageLoader("mmsae.report", "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True)
ENV.filters.update(fmt=fmt, num=num, data_url=data_url)


def build_report(*, manifest: dict, metrics: dict, log: pl.DataFrame, stats: pl.DataFrame, selected: dict,
                 maps: pl.DataFrame, contexts: pl.DataFrame, maps_dir: Path, run: dict,
                 explanations: pl.DataFrame | None = None, steering: pl.DataFrame | None = None,
                 attribution: dict | None = None, attribution_dir: Path | None = None, neurons: dict | None = None,
                 evaluation: dict | None = None, heldout_ids: list | None = None, codes: dict | None = None,
                 loss_recovered: dict | None = None,
                 scoring: dict | None = None, scoring_table: pl.DataFrame | None = None) -> str:
    """The whole page as an HTML string.

    Args:
        manifest: the activation manifest (corpus.train: what the SAE was trained on); codes: the codes
        manifest (corpus.interpret: whose top activations the feature cards show), None for a report
        without it; metrics: the SAE's ``metrics.json``; log: per-step log;
        stats: feature statistics; selected: ``selected.json`` (features and selection info);
        maps, contexts: from :func:`mmsae.codes.maps.render_feature_maps`; maps_dir: where PNGs are;
        run: ``{"model", "demo": bool, "provenance": dict|None}``;
        explanations, steering, attribution (+ attribution_dir), neurons (keyword arguments of
        :func:`~mmsae.report.sections.neurons_view`), evaluation: the optional stages' outputs;
        heldout_ids: the SAE's held-out sample ids (``heldout.json``), when written.
        loss_recovered: ``loss_recovered.json`` (the SAE spliced into the model), when computed.
        scoring, scoring_table: ``scoring_summary.json`` and ``scoring.parquet`` (detection/fuzzing).
        Sections whose input is None are left out; keys missing from an input show as "–".
    """
    status = explanations["status"].to_list() if explanations is not None else None
    return ENV.get_template("page.html.j2").render(
        run=run,
        manifest=manifest,
        codes=codes,
        metrics=metrics,
        sae=sae_view(metrics, heldout_ids),
        curve=curve(log),
        loss_recovered=None if loss_recovered is None else loss_recovered_view(loss_recovered),
        selected=selected,
        info=selected.get("info", {}),
        explanation_counts=None if status is None else {s: status.count(s) for s in
                                                        ("ok", "untagged", "no_explanation", "unparsed", "failed")},
        cards=feature_cards(selected.get("features", []), stats, maps, contexts, maps_dir, explanations),
        evaluation=None if evaluation is None else evaluation_view(evaluation),
        scoring=None if scoring is None else scoring_view(scoring, scoring_table),
        steering=None if steering is None else steering_view(steering),
        attribution=None if attribution is None else attribution_view(attribution, attribution_dir or Path(".")),
        neurons=None if neurons is None else neurons_view(**{k: v for k, v in neurons.items() if k != "data_url"}),
    )


__all__ = ["build_report"]
