"""What the report page is built from: one dataclass, so that a new section is one new field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from pathlib import Path

import polars as pl


@dataclass
class ReportInputs:
    """The outputs of the run that :func:`mmsae.report.page.build_report` renders.

    Required (every run has them):
        manifest: the activation manifest (corpus.train: what the SAE was trained on).
        metrics: the SAE's ``metrics.json``; log: its per-step training log (``log.parquet``).
        stats: per-feature statistics (``stats.parquet``); selected: ``selected.json`` (features and
            selection info).
        maps, contexts: from :func:`mmsae.codes.maps.render_feature_maps`; maps_dir: where their PNGs are.
        run: ``{"model": str, "demo": bool, "provenance": dict | None}`` and optionally ``"banner"``:
            ``report.banner``, shown at the top of the page.

    Optional (None: the section is left out; keys missing from an input show as "–"):
        codes: the codes manifest (corpus.interpret: whose top activations the feature cards show).
        heldout_ids: the SAE's held-out sample ids (``heldout.json``).
        explanations: ``explanations.parquet``; steering: ``steering.parquet``.
        attribution: ``summary.json`` of the attribution, with attribution_dir (its heatmaps).
        repair: ``repair.parquet`` (:func:`mmsae.interventions.repair.repair_case`'s rows).
        neurons: keyword arguments of :func:`mmsae.report.sections.neurons_view`.
        evaluation: Table 1's ``summary.json``; loss_recovered: ``loss_recovered.json``.
        scoring, scoring_table: ``scoring_summary.json`` and ``scoring.parquet`` (detection/fuzzing).
        crossmodal, crossmodal_examples: ``crossmodal.parquet`` and ``crossmodal_examples.parquet``.
        effective_config: the text of ``results/runs/<run>/config.effective.yaml`` (the run's whole config, its
            header naming the files it came from), shown verbatim.
        activation_histograms: ``{feature: (bar_values, bar_heights)}`` over the codes
            (:func:`mmsae.export.histograms.feature_histograms`), drawn on the feature cards.
        logits: ``{feature: {"pos": [(token, logit)], "neg": [...]}}`` from the Neuronpedia export
            (:func:`mmsae.report.plots.export_logits`), listed on the text-feature cards.
        sparsity: the SAE's ``sparsity.safetensors`` (d_sae,) log10 densities over the training tokens
            (:func:`mmsae.report.plots.read_sparsity`), the feature-density histogram's main series.
    """

    manifest: dict
    metrics: dict
    log: pl.DataFrame
    stats: pl.DataFrame
    selected: dict
    maps: pl.DataFrame
    contexts: pl.DataFrame
    maps_dir: Path
    run: dict
    codes: dict | None = None
    heldout_ids: list | None = None
    explanations: pl.DataFrame | None = None
    steering: pl.DataFrame | None = None
    attribution: dict | None = None
    attribution_dir: Path | None = None
    repair: pl.DataFrame | None = None
    neurons: dict | None = None
    evaluation: dict | None = None
    loss_recovered: dict | None = None
    scoring: dict | None = None
    scoring_table: pl.DataFrame | None = None
    crossmodal: pl.DataFrame | None = None
    crossmodal_examples: pl.DataFrame | None = None
    effective_config: str | None = None
    activation_histograms: dict | None = None
    logits: dict | None = None
    sparsity: Any = None
