"""Activation maps: where on an image a feature fires (paper step 3; docs/methods.md, 'Top activations and activation maps').

The feature's activations on the base view's patch grid (``side x side``, the image squashed to a
square by the processor, so the grid covers the whole image) are upsampled bilinearly to the
image size. *Highlight*: the binary mask of active patches (activation > threshold), upsampled,
keeps active regions bright and darkens the rest to ``dim`` (12%) brightness. *Heatmap*: the
normalised activation blended over the image in red.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from mmsae.data.corpus import load_image
from mmsae.core.io import write_bytes


def patch_grid(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, side: int) -> np.ndarray:
    """Scatter per-patch activations into a (side, side) float32 grid (missing patches are 0)."""
    grid = np.zeros((side, side), np.float32)
    grid[rows.astype(int), cols.astype(int)] = values
    return grid


def feature_grids(codes: pl.LazyFrame, pairs: list[tuple[int, str]], side: int) -> dict[tuple[int, str], np.ndarray]:
    """Base-view activation grids (side, side) for (feature, sample_id) pairs, from the code shards
    (a pair with no active token gets zeros)."""
    want = pl.DataFrame({"feature": [p[0] for p in pairs], "sample_id": [p[1] for p in pairs]},
                        schema={"feature": pl.Int32, "sample_id": pl.String}).unique()
    acts = (codes.filter(pl.col("view") == 0).join(want.lazy(), on=["feature", "sample_id"], how="semi")
            .select("feature", "sample_id", "patch_row", "patch_col", "activation").collect(engine="streaming"))
    grids = {p: np.zeros((side, side), np.float32) for p in pairs}
    for (f, sid), g in acts.group_by(["feature", "sample_id"]):
        grids[(f, sid)] = patch_grid(g["patch_row"].to_numpy(), g["patch_col"].to_numpy(), g["activation"].to_numpy(), side)
    return grids


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a 2-D grid to ``size`` = (width, height); returns (height, width)."""
    img = Image.fromarray(grid.astype(np.float32), mode="F")
    return np.asarray(img.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def activation_mask(grid: np.ndarray, size: tuple[int, int], threshold: float = 0.0) -> np.ndarray:
    """The activated region: patches above ``threshold`` as a 0/1 grid, upsampled bilinearly to
    ``size`` (width, height). Returns (height, width) float32 in [0, 1] (soft at patch borders)."""
    return np.clip(upsample((grid > threshold).astype(np.float32), size), 0.0, 1.0)


def highlight(image: Image.Image, grid: np.ndarray, threshold: float = 0.0, dim: float = 0.12) -> Image.Image:
    """The image with active regions kept and the rest darkened to ``dim`` brightness."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    mask = activation_mask(grid, image.size, threshold)
    out = arr * (dim + (1.0 - dim) * mask[..., None])
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def heatmap(image: Image.Image, grid: np.ndarray, vmax: float | None = None, alpha: float = 0.6) -> Image.Image:
    """The image (greyed) with the activation, normalised by ``vmax`` (default: grid max), in red."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    vmax = float(vmax if vmax is not None else grid.max())
    heat = np.clip(upsample(grid, image.size) / vmax, 0, 1) if vmax > 0 else np.zeros(arr.shape[:2], np.float32)
    grey = arr.mean(-1, keepdims=True).repeat(3, -1) * 0.6
    red = np.zeros_like(arr)
    red[..., 0] = 255
    red[..., 1] = 255 * (1 - heat) * 0.3
    a = (alpha * heat)[..., None]
    out = grey * (1 - a) + red * a
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def png_bytes(image: Image.Image, max_side: int = 384) -> bytes:
    """PNG-encode ``image``, downscaled so its longer side is at most ``max_side`` pixels."""
    image = image.copy()
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def render_feature_maps(codes, samples, tops, features: list[int], side: int, out_dir, threshold: float = 0.0,
                        context_before: int = 12, context_after: int = 4):
    """Render highlight and heatmap PNGs for each selected feature's top image samples, and
    collect the token contexts of its top text samples.

    Args:
        codes: polars LazyFrame over the code shards.
        samples: polars DataFrame of ``samples.parquet`` (sample_id, image_path, tokens, ...).
        tops: the top-samples table (:func:`mmsae.codes.select.top_samples`).
        features: the selected feature ids.
        side: base-view patch grid side (image_size // patch_size).
        out_dir: PNGs go to ``out_dir/<feature>/<rank>-{highlight,heatmap}.png``.

    Returns:
        (maps, contexts): polars DataFrames. ``maps``: feature, rank, sample_id, score, highlight,
        heatmap (paths relative to out_dir), n_active_patches. ``contexts``: feature, rank,
        sample_id, score, tokens (list[str]), activations (list[float]), focus (index in the list).
    """
    out_dir = Path(out_dir)
    feats = pl.Series("feature", features, dtype=pl.Int32)
    sel = tops.filter(pl.col("feature").is_in(feats.implode()))
    text_pairs = sel.filter(pl.col("modality") == "text").select("feature", "sample_id").unique()
    acts = (  # every token's activation for the text contexts (image grids come from feature_grids)
        codes.join(text_pairs.lazy(), on=["feature", "sample_id"], how="semi")
        .select("feature", "sample_id", "token_index", "activation")
        .collect(engine="streaming")
    )
    info = {r["sample_id"]: r for r in samples.select("sample_id", "image_path", "tokens").iter_rows(named=True)}
    map_rows, ctx_rows = [], []
    image_rows = list(sel.filter(pl.col("modality") == "image").iter_rows(named=True))
    grids = feature_grids(codes, [(r["feature"], r["sample_id"]) for r in image_rows], side)
    for row in image_rows:
        f, sid = row["feature"], row["sample_id"]
        grid = grids[(f, sid)]
        image, status = load_image(info[sid]["image_path"])
        if image is None:
            continue
        rel_h, rel_m = f"{f}/{row['rank']}-highlight.png", f"{f}/{row['rank']}-heatmap.png"
        write_bytes(out_dir / rel_h, png_bytes(highlight(image, grid, threshold)))
        write_bytes(out_dir / rel_m, png_bytes(heatmap(image, grid)))
        map_rows.append({"feature": f, "rank": row["rank"], "sample_id": sid, "score": row["score"],
                         "highlight": rel_h, "heatmap": rel_m, "n_active_patches": int((grid > threshold).sum())})
    for row in sel.filter(pl.col("modality") == "text").iter_rows(named=True):
        f, sid, focus = row["feature"], row["sample_id"], row["token_index"]
        tokens = info[sid]["tokens"]
        lo, hi = max(0, focus - context_before), min(len(tokens), focus + context_after + 1)
        tok_acts = np.zeros(len(tokens), np.float32)
        sub = acts.filter((pl.col("feature") == f) & (pl.col("sample_id") == sid))
        tok_acts[sub["token_index"].to_numpy()] = sub["activation"].to_numpy()
        ctx_rows.append({"feature": f, "rank": row["rank"], "sample_id": sid, "score": row["score"],
                         "tokens": list(tokens[lo:hi]), "activations": tok_acts[lo:hi].tolist(), "focus": focus - lo})
    maps_schema = {"feature": pl.Int32, "rank": pl.Int16, "sample_id": pl.String, "score": pl.Float32,
                   "highlight": pl.String, "heatmap": pl.String, "n_active_patches": pl.Int32}
    ctx_schema = {"feature": pl.Int32, "rank": pl.Int16, "sample_id": pl.String, "score": pl.Float32,
                  "tokens": pl.List(pl.String), "activations": pl.List(pl.Float32), "focus": pl.Int32}
    return pl.DataFrame(map_rows, schema=maps_schema), pl.DataFrame(ctx_rows, schema=ctx_schema)


def top_percent_mask(grid: np.ndarray, size: tuple[int, int], percent: float = 5.0) -> np.ndarray:
    """Bool (height, width) mask of the pixels in the top ``percent`` of the bilinearly upsampled map
    (arXiv 2311.07470's binary heatmap mask)."""
    up = upsample(grid, size)
    return up >= np.percentile(up, 100.0 - percent)


def masked(image: Image.Image, mask: np.ndarray, dim: float = 0.12) -> Image.Image:
    """The image with pixels outside ``mask`` (height, width) darkened to ``dim`` brightness."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = arr * np.where(mask, 1.0, dim)[..., None]
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
