"""Entry point of rule report: the self-contained HTML page."""

import json
from pathlib import Path

import polars as pl

from mmsae.codes.schema import scan_codes
from mmsae.core.io import atomic_path
from mmsae.core.shards import shard_paths
from mmsae.export.histograms import feature_histograms
from mmsae.report.page import ReportInputs, build_report
from mmsae.core.job import setup
from mmsae.report.plots import export_logits, read_sparsity, report_figures, write_plots

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
i = sm.input
provenance = Path(sm.params.model, "mmsae_provenance.json")
heldout = Path(i.heldout)  # declared beside metrics.json
selected = json.loads(Path(i.selected).read_text())
inputs = ReportInputs(
    manifest=json.loads(Path(i.activations).read_text()),
    codes=json.loads(Path(i.codes).read_text()) if "codes" in i.keys() else None,
    metrics=json.loads(Path(i.metrics).read_text()),
    heldout_ids=json.loads(heldout.read_text()),
    log=pl.read_parquet(i.log_table),
    stats=pl.read_parquet(i.stats),
    selected=selected,
    maps=pl.read_parquet(i.maps),
    contexts=pl.read_parquet(i.contexts),
    maps_dir=Path(i.maps).parent,
    explanations=pl.read_parquet(i.explanations) if "explanations" in i.keys() else None,
    steering=pl.read_parquet(i.steering) if "steering" in i.keys() else None,
    attribution=json.loads(Path(i.attribution).read_text()) if "attribution" in i.keys() else None,
    attribution_dir=Path(i.attribution).parent if "attribution" in i.keys() else None,
    repair=pl.read_parquet(i.repair) if "repair" in i.keys() else None,
    evaluation=json.loads(Path(i.evaluation).read_text()) if "evaluation" in i.keys() else None,
    loss_recovered=json.loads(Path(i.loss_recovered).read_text()) if "loss_recovered" in i.keys() else None,
    scoring=json.loads(Path(i.scoring).read_text()) if "scoring" in i.keys() else None,
    scoring_table=pl.read_parquet(i.scoring_table) if "scoring_table" in i.keys() else None,
    crossmodal=pl.read_parquet(i.crossmodal) if "crossmodal" in i.keys() else None,
    effective_config=Path(i.effective_config).read_text() if "effective_config" in i.keys() else None,
    crossmodal_examples=pl.read_parquet(i.crossmodal_examples) if "crossmodal" in i.keys() else None,
    neurons=None if "neuron_properties" not in i.keys() else {
        "props": json.loads(Path(i.neuron_properties).read_text()),
        "captions": pl.read_parquet(i.neuron_captions),
        "neurons": pl.read_parquet(i.neuron_table),
        "tokens": pl.read_parquet(i.neuron_tokens),
        "edits": pl.read_parquet(i.edits),
        "neuron_dir": Path(i.neuron_properties).parent,
    },
    run={"model": sm.params.model, "demo": sm.params.demo, "banner": sm.params.banner,
         "provenance": json.loads(provenance.read_text()) if provenance.is_file() else None},
    # the shards beside the codes manifest, as the export reads them
    activation_histograms=feature_histograms(scan_codes(shard_paths(i.codes)), selected.get("features", []))
    if "codes" in i.keys() else None,
    logits=export_logits(i.export) if "export" in i.keys() else None,
    sparsity=read_sparsity(i.sparsity),
)
plots = write_plots(report_figures(inputs), sm.output.plots)
log.info("%d figures written to %s", len(plots), sm.output.plots)
page = build_report(inputs, plots)
with atomic_path(sm.output[0], ".html") as tmp:
    tmp.write_text(page)
log.info("report written to %s (%d kB)", sm.output[0], len(page) // 1024)
