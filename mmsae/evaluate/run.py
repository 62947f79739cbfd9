"""Paper step (c), Table 1: score refined explanations against where the features fire.

For each feature with a refined phrase: on each of its top images, the segmenter's mask for the
phrase against the feature's activated region (IoU; a missed detection is 0) and the CLIP score of
the phrase with the original image. Random baseline (seeded): the same phrase on random corpus
images, IoU against *that* image's activated region for the feature, T trials; CLIP likewise.
Metrics whose models cannot be loaded are reported unavailable, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from mmsae.data.corpus import load_image
from mmsae.evaluate.metrics import activated_region, bootstrap_ci, clip_score, iou
from mmsae.codes.maps import feature_grids
from mmsae.core.progress import track

SCORE_SCHEMA = {"feature": pl.Int32, "category": pl.String, "phrase": pl.String, "sample_id": pl.String,
                "source": pl.String, "trial": pl.Int32, "iou": pl.Float64, "clip_score": pl.Float64}


@dataclass(frozen=True)
class Table1Config:
    """How Table 1 scores a phrase (the ``evaluate`` config section, config/schema.yaml).

    Attributes:
        region: how a feature's activated region is drawn (``reference``: the released code's rule,
            ``majority``); threshold: the activation above which a patch counts as active (both
            :func:`~mmsae.evaluate.metrics.activated_region`).
        n_random: random corpus images per trial of the baseline; iou_trials, clip_trials: trials of
            the random baseline for IoU and for the CLIP score.
        seed: the baseline's draw.
    """

    region: str = "reference"
    threshold: float = 0.0
    n_random: int = 5
    iou_trials: int = 10
    clip_trials: int = 30
    seed: int = 0

    @classmethod
    def from_config(cls, ev: dict) -> "Table1Config":
        """From the validated ``evaluate`` config section."""
        return cls(region=ev["region"], threshold=ev["threshold"], n_random=ev["n_random_images"],
                   iou_trials=ev["iou_trials"], clip_trials=ev["clip_trials"], seed=ev["seed"])


def score_features(refined: pl.DataFrame, tops: pl.DataFrame, images: dict[str, str], codes: pl.LazyFrame, side: int,
                   cfg: Table1Config, segmenter=None, clip=None, pool: list[str] | None = None) -> pl.DataFrame:
    """One row per (feature, image, source, trial) with IoU and CLIP score (null when unavailable).

    Args:
        refined: feature, phrase, category (features without a phrase are left out).
        tops: the top-samples table; image rows give each feature's top images.
        images: sample_id -> image path for every image sample of the corpus.
        pool: the samples random images are drawn from (default: all of ``images``; pass one sample
            per distinct image so that an image is not drawn twice under two prompts).
        segmenter: a :class:`~mmsae.evaluate.backends.GroundedSegmenter` or None (IoU unavailable).
        clip: a :class:`~mmsae.evaluate.backends.ClipScorer` or None (CLIP score unavailable).
        cfg: the region rule and the random baseline's size and seed.
    """
    if segmenter is None and clip is None:
        return pl.DataFrame(schema=SCORE_SCHEMA)
    rng = np.random.default_rng(cfg.seed)
    todo = refined.filter(pl.col("phrase").is_not_null())
    pool = sorted(pool or images)
    plan = []  # (feature, category, phrase, sample_id, source, trial, wants_iou, wants_clip)
    for r in todo.iter_rows(named=True):
        f = r["feature"]
        top_ids = tops.filter((pl.col("feature") == f) & (pl.col("modality") == "image")).sort("rank")["sample_id"].to_list()
        plan += [(f, r["category"], r["phrase"], sid, "explained", -1, True, True) for sid in top_ids if sid in images]
        for t in range(max(cfg.iou_trials, cfg.clip_trials)):
            for sid in rng.choice(pool, size=min(cfg.n_random, len(pool)), replace=False).tolist():
                plan.append((f, r["category"], r["phrase"], sid, "random", t, t < cfg.iou_trials, t < cfg.clip_trials))
    grids = feature_grids(codes, [(p[0], p[3]) for p in plan], side) if segmenter is not None and plan else {}
    cache_img, cache_mask, cache_emb, cache_txt = {}, {}, {}, {}
    rows = []
    for f, cat, phrase, sid, source, trial, want_iou, want_clip in track(plan, "evaluate", unit="image-phrase pairs"):
        if sid not in cache_img:
            cache_img[sid] = load_image(images[sid])[0]
        image = cache_img[sid]
        value_iou = value_clip = None
        if segmenter is not None and want_iou and image is not None:
            key = (phrase, sid)
            if key not in cache_mask:
                cache_mask[key] = segmenter.mask(image, phrase)
            value_iou = iou(cache_mask[key], activated_region(grids[(f, sid)], image.size, cfg.threshold, cfg.region))
        if clip is not None and want_clip and image is not None:
            if sid not in cache_emb:
                cache_emb[sid] = clip.embed_images([image])
            if phrase not in cache_txt:
                cache_txt[phrase] = clip.embed_texts([phrase])
            value_clip = float(clip_score(cache_emb[sid], cache_txt[phrase])[0])
        if value_iou is None and value_clip is None:
            continue
        rows.append({"feature": f, "category": cat, "phrase": phrase, "sample_id": sid, "source": source,
                     "trial": trial, "iou": value_iou, "clip_score": value_clip})
    return pl.DataFrame(rows, schema=SCORE_SCHEMA)


def summary_table(scores: pl.DataFrame, categories: list[str], unavailable: dict[str, str], n_boot: int = 1000,
                  seed: int = 0) -> tuple[list[dict], str]:
    """Table 1: rows = categories and total; IoU and CLIP score, explained (mean, bootstrap CI) and
    random (mean ± std over trials of the per-trial mean). Returns (rows, Markdown)."""
    rows = []
    for cat in [*categories, "total"]:
        sub = scores if cat == "total" else scores.filter(pl.col("category") == cat)
        row = {"category": cat, "n_features": sub.filter(pl.col("source") == "explained")["feature"].n_unique()}
        for metric in ("iou", "clip_score"):
            exp = sub.filter((pl.col("source") == "explained") & pl.col(metric).is_not_null())
            per_feature = exp.group_by("feature").agg(pl.col(metric).mean())[metric].to_list()
            row[f"{metric}_explained"] = float(np.mean(per_feature)) if per_feature else None
            row[f"{metric}_ci"] = bootstrap_ci(per_feature, n_boot, seed=seed)
            rnd = sub.filter((pl.col("source") == "random") & pl.col(metric).is_not_null())
            per_trial = rnd.group_by("trial").agg(pl.col(metric).mean())[metric].to_list()
            row[f"{metric}_random"] = float(np.mean(per_trial)) if per_trial else None
            row[f"{metric}_random_std"] = float(np.std(per_trial)) if per_trial else None
        rows.append(row)

    def cell(row, metric):
        if metric in unavailable:
            return "unavailable", "unavailable"
        e, (lo, hi), r, s = row[f"{metric}_explained"], row[f"{metric}_ci"], row[f"{metric}_random"], row[f"{metric}_random_std"]
        exp = "–" if e is None else f"{e:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")
        rnd = "–" if r is None else f"{r:.3f} ± {s:.3f}"
        return exp, rnd

    md = ["| category | features | IoU explained | IoU random | CLIP explained | CLIP random |", "|---|---|---|---|---|---|"]
    for row in rows:
        ie, ir = cell(row, "iou")
        ce, cr = cell(row, "clip_score")
        md.append(f"| {row['category']} | {row['n_features']} | {ie} | {ir} | {ce} | {cr} |")
    if unavailable:
        md.append("")
        md += [f"- {m} unavailable: {why}" for m, why in unavailable.items()]
    return rows, "\n".join(md) + "\n"
