"""The report's figures, drawn with matplotlib: the feature-density histogram (log10 firing frequency
per latent, the view SAELens and Neuronpedia show, with the dead latents as a bar of their own), the
training curves (FVU, L0, dead fraction, AuxK loss, learning rate against step) and one activation
histogram per feature card.

Each figure is a :class:`matplotlib.figure.Figure` (no pyplot, so no global state), rendered to SVG
with its text kept as text: the page inlines that SVG as a data URL (one self-contained file), and
:func:`write_plots` writes it with a PNG beside it under the report's ``plots/`` folder.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import polars as pl
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from safetensors.numpy import load_file

from mmsae.core.io import write_bytes

RC = {"svg.fonttype": "none", "svg.hashsalt": "mmsae", "font.size": 9, "axes.spines.top": False,
      "axes.spines.right": False, "axes.titlesize": 10}
COLORS = {"": "#1f77b4", "_image": "#d62728", "_text": "#2ca02c"}
TOKENS = {"": "all tokens", "_image": "image tokens", "_text": "text tokens"}
CURVES = (("FVU", "fvu", ("", "_image", "_text")), ("L0", "l0", ("", "_image", "_text")),
          ("dead fraction", "dead_fraction", ("", "_image", "_text")), ("AuxK loss", "aux_loss", ("",)),
          ("learning rate", "lr", ("",)))
DENSITY_COLORS = ("#1f77b4", "#ff7f0e")  # the first series filled, the second an outline
NEVER_FIRED_LOG10 = -9.999  # sparsity.safetensors holds log10(density + 1e-10): -10 for a latent that never fired
MAX_POINTS = 600  # steps drawn one by one; longer logs are drawn as group means over a min-max band


def density_figure(series: list[dict]) -> Figure:
    """Histogram of log10 feature density, SAELens/Neuronpedia's view of an SAE's sparsity, for one
    or two countings of the same latents (:func:`density_view`'s ``series``: the first filled, a
    second drawn as an outline over it).

    Args:
        series: dicts with ``label``, ``log10`` (the live latents' log10 densities), ``n_dead`` (latents
            never active: a bar of their own left of the axis, never log10(0); None when unknown) and
            ``n_tokens`` (tokens counted over: marks log10(1 / n_tokens), the lowest density one token
            can show; None to leave it out).

    Returns:
        The figure (two axes sharing y: the dead bars, then the histogram).
    """
    ends = [float(s["log10"].min()) for s in series if len(s["log10"])]
    ends += [-math.log10(s["n_tokens"]) for s in series if s.get("n_tokens")]  # the 1-token lines stay in view
    lo = math.floor(min(min(ends), -1.0)) if ends else -6.0
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(7.5, 2.9), layout="constrained")
        ax_dead, ax = fig.subplots(1, 2, sharey=True, width_ratios=[1, 9])
        bins = np.linspace(lo, 0.0, 51)
        for i, (s, color) in enumerate(zip(series, DENSITY_COLORS)):
            label = f"{s['label']}: {len(s['log10'])} live" + ("" if s["n_dead"] is None else f", {s['n_dead']} dead")
            if i == 0:
                ax.hist(s["log10"], bins=bins, color=color, label=label)
            else:
                ax.hist(s["log10"], bins=bins, color=color, histtype="step", lw=1.4, label=label)
            if s.get("n_tokens"):
                x = -math.log10(s["n_tokens"])
                ax.axvline(x, color=color, ls="--", lw=0.8)
                ax.text(x, 1.0 - 0.08 * i, " 1 token", transform=ax.get_xaxis_transform(), va="top", color=color)
            if s["n_dead"] is not None:
                ax_dead.bar([i], [s["n_dead"]], width=0.8, color=color, alpha=1.0 if i == 0 else 0.6)
                ax_dead.annotate(str(s["n_dead"]), (i, s["n_dead"]), ha="center", va="bottom", xytext=(0, 2),
                                 textcoords="offset points", fontsize=8)
        ax.set_xlim(lo, 0.0)
        ax.set_xlabel("log10 feature density (fraction of tokens where the latent is active)")
        ax.legend(loc="upper right", frameon=False, fontsize=8)
        ax_dead.set_ylabel("latents")
        ax_dead.set_xticks([(len(series) - 1) / 2], ["dead"])
        ax_dead.set_xlim(-0.7, len(series) - 0.3)
    return fig


def _series(log: pl.DataFrame, col: str) -> np.ndarray:
    return log[col].cast(pl.Float64).fill_nan(None).fill_null(np.nan).to_numpy()


def _buckets(steps: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` consecutive groups of steps: each group's first step, and the mean, min and max of its
    logged values (NaN where none is logged)."""
    edges = np.linspace(0, len(steps), n + 1).astype(int)
    x, mean, lo, hi = (np.full(n, np.nan) for _ in range(4))
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        v = y[a:b][~np.isnan(y[a:b])]
        x[i] = steps[a]
        if v.size:
            mean[i], lo[i], hi[i] = v.mean(), v.min(), v.max()
    return x, mean, lo, hi


def _draw(ax, steps: np.ndarray, y: np.ndarray, color: str) -> None:
    """One metric against step: a line broken where the metric is missing (NaN; e.g. fvu_image at steps
    without image tokens), a dot for a step between two gaps, never a line across a gap. Past
    ``MAX_POINTS`` steps, the mean of each of ``MAX_POINTS // 2`` groups of steps over its min-max band
    (a per-step line of 10^5 steps would make a figure of megabytes)."""
    if np.isnan(y).all():
        return
    if len(steps) > MAX_POINTS:
        x, mean, lo, hi = _buckets(steps, y, MAX_POINTS // 2)
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
        steps, y = x, mean
    ok = ~np.isnan(y)
    ax.plot(steps, y, color=color, lw=1.0)
    lone = ok & ~np.r_[False, ok[:-1]] & ~np.r_[ok[1:], False]
    if lone.any():
        ax.plot(steps[lone], y[lone], ".", color=color, ms=3)


def training_curves_figure(log: pl.DataFrame) -> Figure | None:
    """The per-step training log (``log.parquet``) as five panels against step: FVU, L0 and dead
    fraction (all tokens, image tokens, text tokens), AuxK loss and learning rate. A metric the log
    lacks leaves its panel saying so. None when the log has no rows or no ``step`` column."""
    if log.is_empty() or "step" not in log.columns:
        return None
    steps = log["step"].cast(pl.Float64).to_numpy()
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(12, 5.2), layout="constrained")
        axes = fig.subplots(2, 3, sharex=True).ravel()
        for ax, (title, col, parts) in zip(axes, CURVES):
            ax.set_title(title)
            present = [p for p in parts if f"{col}{p}" in log.columns]
            for p in present:
                _draw(ax, steps, _series(log, f"{col}{p}"), COLORS[p])
            if not present:
                ax.text(0.5, 0.5, f"{col} not in the training log", ha="center", va="center", transform=ax.transAxes, color="#777")
            if col == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        for ax in axes[3:]:
            ax.set_xlabel("step")
        axes[2].tick_params(labelbottom=True)
        key = axes[-1]
        key.set_axis_off()
        key.legend(handles=[Line2D([], [], color=COLORS[p], label=TOKENS[p]) for p in COLORS], loc="upper left", frameon=False,
                   title="FVU, L0, dead fraction over")
        if len(steps) > MAX_POINTS:
            n = len(steps) / (MAX_POINTS // 2)
            key.text(0, 0.35, f"{len(steps)} steps: each line is the mean\nof about {n:.0f} consecutive steps, its band\ntheir min to max", transform=key.transAxes,
                     va="top", color="#555")
    return fig


def activation_histogram_figure(bar_values: list[float], bar_heights: list[int], n_rows: int | None = None) -> Figure | None:
    """One feature's activation histogram (bars at the bin midpoints of
    :func:`mmsae.export.histograms.histogram`); None without bars."""
    if not bar_values:
        return None
    v = np.asarray(bar_values, dtype=np.float64)
    width = (v[1] - v[0]) if v.size > 1 else max(abs(v[0]) * 0.1, 1e-3)
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(3.6, 1.9), layout="constrained")
        ax = fig.subplots()
        ax.bar(v, bar_heights, width=width, color="#ff7f0e")
        ax.set_xlabel("activation")
        ax.set_ylabel("tokens")
        ax.set_title(f"activation histogram ({sum(bar_heights) if n_rows is None else n_rows} tokens)", fontsize=8)
    return fig


def report_figures(inputs) -> dict[str, Figure]:
    """Every figure of the page for :class:`mmsae.report.inputs.ReportInputs`, by file stem:
    ``training_curves``, ``feature_density`` (:func:`density_view`: over the training tokens when the
    inputs have the SAE's sparsity, and over corpus.interpret) and ``feature_<f>_activations`` per
    selected feature with a histogram."""
    figs: dict[str, Figure] = {}
    curves = training_curves_figure(inputs.log)
    if curves is not None:
        figs["training_curves"] = curves
    figs["feature_density"] = density_figure(density_view(inputs.stats, inputs.metrics, inputs.codes, inputs.sparsity)["series"])
    for f in inputs.selected.get("features", []):
        hv, hh = (inputs.activation_histograms or {}).get(f, ([], []))
        fig = activation_histogram_figure(hv, hh)
        if fig is not None:
            figs[f"feature_{f}_activations"] = fig
    return figs


def density_view(stats: pl.DataFrame, metrics: dict, codes: dict | None, sparsity=None) -> dict:
    """The density histogram's series (see :func:`density_figure`), each a dict with ``label``,
    ``log10`` (live latents), ``n_live``, ``n_dead`` and ``n_tokens``:

    - ``train``: over the training tokens, from ``sparsity`` (the SAE folder's ``sparsity.safetensors``,
      SAELens's log10(density + 1e-10), so a latent that never fired has -10); None without it.
    - ``interpret``: over the codes of corpus.interpret, from ``stats.parquet``'s ``frequency`` (one row
      per latent active there); dead = metrics.json's d_sae minus those (None without d_sae).

    Also ``series`` (train first when present) and ``d_sae``."""
    freq = stats["frequency"].to_numpy().astype(np.float64) if "frequency" in stats.columns else np.zeros(0)
    live = freq[freq > 0]
    d_sae = metrics.get("d_sae")
    interpret = {"label": "corpus.interpret", "log10": np.log10(live), "n_live": int(live.size),
                 "n_dead": None if d_sae is None else int(d_sae) - int(live.size), "n_tokens": (codes or {}).get("n_tokens")}
    train = None
    if sparsity is not None:
        s = np.asarray(sparsity, dtype=np.float64).ravel()
        dead = s <= NEVER_FIRED_LOG10
        train = {"label": "training tokens", "log10": s[~dead], "n_live": int((~dead).sum()), "n_dead": int(dead.sum()),
                 "n_tokens": metrics.get("tokens_trained")}
        d_sae = d_sae or int(s.size)
    return {"train": train, "interpret": interpret, "series": [x for x in (train, interpret) if x is not None], "d_sae": d_sae}


def read_sparsity(path: str | Path) -> np.ndarray:
    """The ``sparsity`` tensor of a ``sparsity.safetensors`` file, (d_sae,) float32 log10 densities
    (:func:`mmsae.sae.io.save_sparsity`), read without torch.

    Raises:
        FileNotFoundError: no such file; KeyError: it has no ``sparsity`` tensor."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found")
    return load_file(str(path))["sparsity"]


def svg_text(fig: Figure) -> str:
    """The figure as SVG text (text kept as <text>, no date, stable ids)."""
    buf = io.BytesIO()
    with matplotlib.rc_context(RC):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue().decode()


def svg_url(svg: str) -> str:
    """An SVG inlined as a data URL (an <img> of it keeps its ids out of the page's)."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


def write_plots(figs: dict[str, Figure], folder: str | Path) -> dict[str, str]:
    """Write ``<stem>.svg`` and ``<stem>.png`` (120 dpi) of each figure into ``folder`` (created),
    each atomically; returns the SVG texts by stem (what the page inlines).

    Raises:
        mmsae.core.io.WriteError: a file could not be written (names it and the free space).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for stem, fig in figs.items():
        out[stem] = svg_text(fig)
        write_bytes(folder / f"{stem}.svg", out[stem].encode())
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, metadata={"Software": None})
        write_bytes(folder / f"{stem}.png", buf.getvalue())
    return out


def export_logits(neuronpedia_dir: str | Path) -> dict[int, dict]:
    """Each exported feature's top logits from the export's Neuronpedia feature records
    (``<model_id>/<source_id>/features/batch-*.jsonl.gz``, :func:`mmsae.export.neuronpedia.feature_record`):
    ``{feature: {"pos": [(token, logit), ...], "neg": [...]}}``; empty when the folder holds none."""
    out = {}
    for path in sorted(Path(neuronpedia_dir).glob("*/*/features/batch-*.jsonl.gz")):
        for line in gzip.decompress(path.read_bytes()).decode().splitlines():
            if line:
                r = json.loads(line)
                out[int(r["index"])] = {"pos": list(zip(r["pos_str"], r["pos_values"])),
                                        "neg": list(zip(r["neg_str"], r["neg_values"]))}
    return out


def is_text_feature(stat: dict, n_contexts: int) -> bool:
    """A card shows top logits when its feature fires on text: text contexts on the card or a nonzero
    ``frequency_text``."""
    ft = stat.get("frequency_text")
    return n_contexts > 0 or (ft is not None and not (isinstance(ft, float) and math.isnan(ft)) and ft > 0)


def visible_token(token: str) -> str:
    """A token string as a card shows it: newlines, tabs and carriage returns spelled ``\\n``, ``\\t``, ``\\r``
    (spaces stay, on a shaded background), so that no token is blank."""
    return token.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def add_card_plots(cards: list[dict], svgs: dict[str, str], logits: dict[int, dict] | None) -> list[dict]:
    """Each card with ``histogram`` (its activation histogram's data URL, or None) and, on text-feature
    cards (:func:`is_text_feature`), ``logits`` (``{"pos", "neg"}`` or None when the export has none)
    and ``text_feature``; ``logits_source``: whether an export was read at all."""
    for c in cards:
        svg = svgs.get(f"feature_{c['feature']}_activations")
        c["histogram"] = None if svg is None else svg_url(svg)
        c["text_feature"] = is_text_feature(c.get("stat") or {}, len(c.get("contexts") or []))
        lg = (logits or {}).get(c["feature"]) if c["text_feature"] else None
        c["logits"] = None if lg is None else {side: [(visible_token(tok), v) for tok, v in lg[side]] for side in ("pos", "neg")}
        c["logits_source"] = logits is not None
    return cards
