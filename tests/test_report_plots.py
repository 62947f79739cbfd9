"""The report's figures (mmsae.report.plots): the feature-density histogram with its dead latents
counted apart, the training curves of each logged metric, an activation histogram per feature card,
top logits on text-feature cards, and the figures written as files beside the page."""

import base64
import math
import re

import numpy as np
import polars as pl
import pytest
import torch
from report_inputs import EVIL, inputs

from mmsae.export import neuronpedia as npx
from mmsae.export.histograms import feature_histograms, histogram
from mmsae.report.page import ReportInputs, build_report
from mmsae.report.plots import export_logits, report_figures, svg_text, training_curves_figure, write_plots


def _svgs(page: str) -> dict[str, str]:
    """Each inlined SVG of the page by its <img> alt text."""
    out = {}
    for src, alt in re.findall(r'<img src="data:image/svg\+xml;base64,([^"]+)" alt="([^"]*)"', page):
        out[alt] = base64.b64decode(src).decode()
    return out


def _texts(svg: str) -> str:
    return " ".join(re.findall(r"<text[^>]*>([^<]*)</text>", svg))


def test_density_histogram_counts_dead_latents_apart(tmp_path):
    """62 of the 64 latents never fire: they are a bar and a number of their own, not log10(0)."""
    page = build_report(ReportInputs(**inputs(tmp_path)))
    (alt, svg), = [(a, s) for a, s in _svgs(page).items() if a.startswith("feature density")]
    assert "2 live latents; 62 dead latents" in alt
    assert "<b>62 dead latents</b> of 64" in page
    text = _texts(svg)
    assert "dead" in text and "62" in text and "log10 feature density" in text
    assert "inf" not in svg.lower().replace("infinity", "")  # no log10(0) anywhere


def test_density_histogram_bins_log10_of_live_frequencies(tmp_path):
    freq = [1e-4] * 5 + [1e-2] * 3
    d = inputs(tmp_path)
    d["stats"] = pl.DataFrame({"feature": list(range(8)), "frequency": freq})
    d["metrics"] = {**d["metrics"], "d_sae": 10}
    ax = report_figures(ReportInputs(**d))["feature_density"].axes[1]
    heights = [p.get_height() for p in ax.patches]
    centers = [p.get_x() + p.get_width() / 2 for p in ax.patches]
    assert sum(heights) == 8
    assert {round(c) for c, h in zip(centers, heights) if h} == {-4, -2}
    dead_ax = report_figures(ReportInputs(**d))["feature_density"].axes[0]
    assert [p.get_height() for p in dead_ax.patches] == [2]


def test_training_curves_show_each_metric(tmp_path):
    page = build_report(ReportInputs(**inputs(tmp_path)))
    (svg,) = [s for a, s in _svgs(page).items() if a.startswith("training curves")]
    text = _texts(svg)
    for title in ("FVU", "L0", "dead fraction", "AuxK loss", "learning rate", "step"):
        assert title in text, title
    assert "not in the training log" not in text
    assert "<polyline" not in page  # the hand-drawn chart is gone
    old = _texts(svg_text(training_curves_figure(inputs(tmp_path / "old", new=False)["log"])))
    assert "aux_loss not in the training log" in old and "lr not in the training log" in old


def test_training_curve_breaks_where_a_metric_is_missing():
    """fvu_image is missing at steps whose batch had no image token: no line across the gap, and a
    step between two gaps is a dot."""
    log = pl.DataFrame({"step": list(range(10)), "fvu": [1.0 - 0.05 * s for s in range(10)],
                        "fvu_image": [0.9, 0.8, None, None, 0.7, None, 0.6, 0.5, 0.4, None]})
    ax = training_curves_figure(log).axes[0]
    image = [ln for ln in ax.lines if ln.get_color() == "#d62728"]
    y = image[0].get_ydata()
    assert [math.isnan(v) for v in y] == [False, False, True, True, False, True, False, False, False, True]
    dots = [ln for ln in image if ln.get_linestyle() == "None"]
    assert len(dots) == 1 and list(dots[0].get_xdata()) == [4.0]


def test_feature_cards_have_activation_histograms_and_text_cards_top_logits(tmp_path):
    page = build_report(ReportInputs(**inputs(tmp_path)))
    svgs = _svgs(page)
    for f in (7, 9):
        assert "activation" in _texts(svgs[f"feature {f} activation histogram"])
    f7 = page[page.index('id="f7"'):page.index('id="f9"')]
    f9 = page[page.index('id="f9"'):page.index("<h2", page.index('id="f9"'))]
    assert "top positive logits" not in f7  # feature 7 fires on images only
    assert "top positive logits" in f9 and "top negative logits" in f9
    assert "<code class=tok> cat</code></td><td>+2.5" in f9 and "<code class=tok> the</code></td><td>-1.75" in f9
    assert EVIL not in page and "&lt;script&gt;" in f9


def test_text_card_without_an_export_says_where_logits_come_from(tmp_path):
    page = build_report(ReportInputs(**{**inputs(tmp_path), "logits": None}))
    assert "top logits: need the export (export.enabled)" in page


def test_plot_files_are_written_and_are_what_the_page_shows(tmp_path):
    inp = ReportInputs(**inputs(tmp_path / "in"))
    svgs = write_plots(report_figures(inp), tmp_path / "plots")
    stems = {"training_curves", "feature_density", "feature_7_activations", "feature_9_activations"}
    assert set(svgs) == stems
    for stem in stems:
        assert (tmp_path / "plots" / f"{stem}.svg").read_text() == svgs[stem]
        assert (tmp_path / "plots" / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = build_report(inp, svgs)
    assert all(base64.b64encode(s.encode()).decode() in page for s in svgs.values())


def test_numpy_histogram_matches_torch_histc():
    """The export's histogram moved off torch (the report's environment has none): same bars."""
    v = torch.randn(5000).abs() * 3
    values, heights = histogram(v.numpy(), 50)
    assert heights == torch.histc(v, bins=50, min=float(v.min()), max=float(v.max())).int().tolist()
    assert values[0] == pytest.approx(float(v.min()) + (float(v.max()) - float(v.min())) / 100, abs=1e-4)
    assert histogram([], 5) == ([], []) and histogram([2.0, 2.0], 5) == ([2.0], [2])
    codes = pl.DataFrame({"feature": [1, 1, 1, 2], "activation": [1.0, 2.0, 3.0, 0.5]})
    h = feature_histograms(codes.lazy(), [1, 2, 3], n_bins=2)
    assert h == {1: ([1.5, 2.5], [1, 2]), 2: ([0.5], [1]), 3: ([], [])}


def test_export_logits_reads_the_neuronpedia_feature_records(tmp_path):
    src = npx.SourceInfo(model_id="demo", source_set="mmsae-topk", layer=4, hook_point="model.layers.4",
                         release="mmsae-demo", description="d", hf_repo_id="u/r", hf_folder_id="model.layers.4", dataset="c")
    logit = {"pos_str": [" cat", " dog"], "pos_values": [2.0, 1.0], "neg_str": [" the"], "neg_values": [-1.0]}
    feats = [npx.feature_record(src, f, frac_nonzero=0.1, max_act=2.0, logit=logit, freq_hist=([1.0], [3]), created="t")
             for f in (3, 5)]
    npx.write_export(tmp_path / "neuronpedia", src, feats, [], [], [], "readme")
    got = export_logits(tmp_path / "neuronpedia")
    assert set(got) == {3, 5}
    assert got[3] == {"pos": [(" cat", 2.0), (" dog", 1.0)], "neg": [(" the", -1.0)]}
    assert export_logits(tmp_path / "nothing") == {}


def test_no_live_latent_still_draws(tmp_path):
    d = {**inputs(tmp_path), "stats": pl.DataFrame({"feature": [], "frequency": []}, schema={"feature": pl.Int32, "frequency": pl.Float64})}
    fig = report_figures(ReportInputs(**d))["feature_density"]
    assert [p.get_height() for p in fig.axes[0].patches] == [64]
    assert np.isfinite(fig.axes[1].get_xlim()).all()


def test_density_histogram_reads_the_training_sparsity(tmp_path):
    """With the SAE's sparsity.safetensors (written as the trainer writes it), the main series is the
    training tokens' density and its never-fired latents (-10) are the dead bar; corpus.interpret's
    counting stays beside it."""
    from mmsae.sae.io import save_sparsity
    from mmsae.report.plots import read_sparsity
    counts = torch.cat([torch.zeros(10), torch.arange(1, 55, dtype=torch.float32)])  # 10 never fired
    sparsity = read_sparsity(save_sparsity(tmp_path, counts, 1000))
    assert sparsity.shape == (64,) and (sparsity[:10] == -10).all()
    d = {**inputs(tmp_path / "in"), "sparsity": sparsity}
    page = build_report(ReportInputs(**d))
    (alt,) = [a for a in _svgs(page) if a.startswith("feature density")]
    assert "over training tokens" in alt and "54 live latents; 10 dead latents" in alt
    text = re.sub(r"<[^>]+>", "", page)
    assert "10 dead latents of 64 never fired in training" in text and "2 latents are active and 62 never are" in text
    fig = report_figures(ReportInputs(**d))["feature_density"]
    assert [p.get_height() for p in fig.axes[0].patches] == [10, 62]
    with pytest.raises(FileNotFoundError):
        read_sparsity(tmp_path / "missing.safetensors")
