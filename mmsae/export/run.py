"""The export rule's work: gather a run's tables into the Neuronpedia records (:mod:`.neuronpedia`)
and the Hub folder (:mod:`.hub`)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import torch

from mmsae.export import logits as lg
from mmsae.export import neuronpedia as npx

README = """# Neuronpedia export (mmsae)

Folder layout and field names follow Neuronpedia's conversion script
(hijohnnylin/neuronpedia `utils/neuronpedia-utils/neuronpedia_utils/convert-saedashboard-to-neuronpedia-export.py`):
`{model_id}/{source_id}/` holds `release/model/sourceset/source.jsonl` and gzipped JSONL batches under
`features/`, `activations/` and `explanations/`. Replace `<creator-id>` with your Neuronpedia user id
before importing.

Image examples: Neuronpedia has no field for image patches. An image example's `tokens` are the
labels `<img vV rR cC>` (image view V, patch row R, patch column C) of the sample's image tokens in
token order, with this feature's activation on each as `values` (0 where it is inactive). The
highlighted image of each such example is beside this file, at `images/<feature>/<rank>-highlight.png`
(rank = 0 for the strongest); an image example's `dataSource` field names that file.

Logits (`pos_str`/`neg_str`) are the decoder row times the unembedding ({logit_rule}).
Explanation scores: `scoreV1` = detection, `scoreV2` = fuzzing balanced accuracy on held-out examples.
"""


def feature_logit_tables(W_dec: torch.Tensor, W_U: torch.Tensor, norm_weight: torch.Tensor | None, features: list[int],
                         decode, k: int = 10, n_bins: int = 50) -> dict[int, dict]:
    """Top ``k`` positive and negative logits (token strings through ``decode(id)``) and the logit
    histogram of each feature. ``W_dec``: ``(d_sae, d_model)``; ``W_U``: ``(d_model, vocab)``."""
    idx = torch.tensor(features, dtype=torch.long)
    logits = lg.feature_logits(W_dec[idx], W_U, norm_weight)
    pi, pv, ni, nv = lg.top_logits(logits, k)
    out = {}
    for j, f in enumerate(features):
        hv, hh = lg.histogram(logits[j], n_bins)
        out[f] = {"pos_str": [decode(int(t)) for t in pi[j]], "pos_values": pv[j].tolist(),
                  "neg_str": [decode(int(t)) for t in ni[j]], "neg_values": nv[j].tolist(),
                  "hist_values": hv, "hist_heights": hh}
    return out


def build_records(src: npx.SourceInfo, *, features: list[int], stats: pl.DataFrame, contexts: pl.DataFrame,
                  maps: pl.DataFrame, maps_dir: Path, image_codes: pl.DataFrame, logit_tables: dict[int, dict],
                  histograms: dict[int, tuple[list, list]], explanations: pl.DataFrame | None,
                  scoring: pl.DataFrame | None) -> tuple[list, list, list, list]:
    """The feature, activation and explanation records and the PNGs to copy, for ``features``.

    Raises:
        ValueError: a feature has no row in ``stats``.
    """
    created = datetime.now(timezone.utc).isoformat()
    scores = npx.per_feature_scores(scoring)
    feats, acts, expls, images = [], [], [], []
    for f in features:
        st = stats.filter(pl.col("feature") == f)
        if st.height == 0:
            raise ValueError(f"feature {f} is selected but has no row in stats.parquet")
        st = st.row(0, named=True)
        feats.append(npx.feature_record(src, f, frac_nonzero=st["frequency"], max_act=st["max_activation"],
                                        logit=logit_tables[f], freq_hist=histograms.get(f, ([], [])), created=created))
        for row in contexts.filter(pl.col("feature") == f).sort("rank").iter_rows(named=True):
            acts.append(npx.activation_record(src, f, row["rank"], "text", row["tokens"], row["activations"],
                                              row.get("focus"), created))
        for rank, labels, values, png in npx.image_examples(maps, image_codes, f):
            rec = npx.activation_record(src, f, rank, "image", labels, values, None, created)
            rec["dataSource"] = f"images/{f}/{rank}-highlight.png"
            acts.append(rec)
            images.append((Path(maps_dir) / png, rec["dataSource"]))
        if explanations is not None:
            e = explanations.filter((pl.col("feature") == f) & (pl.col("status") == "ok") & pl.col("explanation").is_not_null())
            if e.height:
                r = e.row(0, named=True)
                s = scores.get(f, {})
                expls.append(npx.explanation_record(src, f, r["explanation"], r.get("explainer_model"),
                                                    s.get("detection"), s.get("fuzzing"), created))
    return feats, acts, expls, images
