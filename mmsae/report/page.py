"""The run's report: one self-contained static HTML page (images inlined as data URLs), rendered
from the Jinja2 templates in ``mmsae/report/templates/`` with autoescaping on, one template per
section.

Sections: the run (model, hook point, corpus and token counts, skipped images), the SAE (held-out
FVU / L0 / dead fraction, token norms, the training curves and the feature-density histogram
(matplotlib figures of :mod:`mmsae.report.plots`, inlined as SVG data URLs), and the loss recovered
with it spliced into the model), one card per selected feature (statistics, an activation histogram,
top logits on text features, top images with the activated regions highlighted and heatmaps, top text
contexts with the activating tokens marked, the explanation), then - when the workflow produced them - the
explanation evaluation, steering, attribution and multimodal neurons.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from jinja2 import Environment, PackageLoader

from mmsae.report.sections import (attribution_view, evaluation_view, feature_cards, loss_recovered_view, neurons_view,
                                   sae_view, steering_view)
from mmsae.report.crossmodal import crossmodal_view
from mmsae.report.inputs import ReportInputs
from mmsae.report.scoring import scoring_view
from mmsae.report.repair import repair_view
from mmsae.report.plots import add_card_plots, density_view, report_figures, svg_text, svg_url
from mmsae.report.views import data_url, fmt, num

ENV = Environment(loader=PackageLoader("mmsae.report", "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True)
ENV.filters.update(fmt=fmt, num=num, data_url=data_url, svg_url=svg_url)


def build_report(inputs: ReportInputs, plots: dict[str, str] | None = None) -> str:
    """The whole page as an HTML string, from the run's outputs (:class:`ReportInputs`; sections whose
    input is None are left out). ``plots``: the SVG texts of :func:`mmsae.report.plots.report_figures`
    by stem (what :func:`mmsae.report.plots.write_plots` returns); None draws them here."""
    r = inputs
    if plots is None:
        plots = {stem: svg_text(fig) for stem, fig in report_figures(r).items()}
    explanations = r.explanations
    status = explanations["status"].to_list() if explanations is not None else None
    return ENV.get_template("page.html.j2").render(
        run=r.run,
        effective_config=r.effective_config,
        manifest=r.manifest,
        codes=r.codes,
        metrics=r.metrics,
        sae=sae_view(r.metrics, r.heldout_ids),
        plots=plots,
        density=density_view(r.stats, r.metrics, r.codes, r.sparsity),
        loss_recovered=None if r.loss_recovered is None else loss_recovered_view(r.loss_recovered),
        selected=r.selected,
        info=r.selected.get("info", {}),
        explanation_counts=None if status is None else {s: status.count(s) for s in
                                                        ("ok", "untagged", "no_explanation", "unparsed", "failed")},
        cards=add_card_plots(feature_cards(r.selected.get("features", []), r.stats, r.maps, r.contexts, r.maps_dir,
                                           explanations), plots, r.logits),
        evaluation=None if r.evaluation is None else evaluation_view(r.evaluation),
        scoring=None if r.scoring is None else scoring_view(r.scoring, r.scoring_table),
        steering=None if r.steering is None else steering_view(r.steering),
        attribution=None if r.attribution is None else attribution_view(r.attribution, r.attribution_dir or Path(".")),
        repair=None if r.repair is None else repair_view(r.repair),
        crossmodal=None if r.crossmodal is None else crossmodal_view(r.crossmodal, r.crossmodal_examples),
        neurons=None if r.neurons is None else neurons_view(**{k: v for k, v in r.neurons.items() if k != "data_url"}),
    )


__all__ = ["ReportInputs", "build_report"]
