"""Feature statistics and top samples (polars) against brute force; activation maps."""

import numpy as np
import polars as pl
import pytest
from PIL import Image

from mmsae.codes import stats as code_stats
from mmsae.codes.schema import CODE_SCHEMA
from mmsae.codes.select import feature_stats, select_features, stats_and_top_samples, top_samples
from mmsae.core.io import write_parquet
from mmsae.codes.maps import activation_mask, highlight, patch_grid


@pytest.fixture()
def codes(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for s in range(12):
        sid = f"s{s}"
        n_img = 16 if s < 8 else 0
        for t in range(n_img + 5):
            img = t < n_img
            for f in rng.choice(10, size=3, replace=False):
                rows.append({"sample_id": sid, "token_index": t, "modality": "image" if img else "text",
                             "view": 0 if img else -1, "patch_row": t // 4 if img else None,
                             "patch_col": t % 4 if img else None, "feature": int(f), "activation": float(rng.random() * 5)})
    df = pl.DataFrame(rows)
    paths = []
    for i, part in enumerate((df[: len(df) // 2], df[len(df) // 2:])):
        write_parquet(tmp_path / f"codes-{i}.parquet", part.to_arrow().cast(CODE_SCHEMA))
        paths.append(tmp_path / f"codes-{i}.parquet")
    # images: s0/s1 share one image file (two prompts), the rest have their own
    images = pl.DataFrame({"sample_id": [f"s{s}" for s in range(8)], "n_base": [16] * 8,
                           "image_path": ["a.png", "a.png"] + [f"{s}.png" for s in range(2, 8)]})
    n_tokens = 8 * 21 + 4 * 5
    return df, pl.scan_parquet([str(p) for p in paths]), images, n_tokens


def test_stats_match_brute_force(codes):
    df, lazy, _, n_tokens = codes
    n_img = 8 * 16
    stats = feature_stats(lazy, n_tokens, n_img, n_tokens - n_img)
    for f in range(10):
        sub = df.filter(pl.col("feature") == f)
        row = stats.filter(pl.col("feature") == f).row(0, named=True)
        assert row["n_tokens_active"] == sub.height
        assert row["frequency"] == pytest.approx(sub.height / n_tokens)
        assert row["frequency_image"] == pytest.approx(sub.filter(pl.col("modality") == "image").height / n_img)
        assert row["max_activation"] == pytest.approx(sub["activation"].max())
        assert row["mean_activation"] == pytest.approx(sub["activation"].mean())
        assert row["n_samples"] == sub["sample_id"].n_unique()


@pytest.mark.parametrize("rank_by", ["max", "mean"])
def test_top_samples_match_brute_force(codes, rank_by):
    df, lazy, images, _ = codes
    tops = top_samples(lazy, images, n=3, rank_by=rank_by)
    for f in range(10):
        img = df.filter((pl.col("feature") == f) & (pl.col("modality") == "image"))
        scores = {}
        for sid, g in img.group_by("sample_id"):
            sid = sid[0]
            key = "a.png" if sid in ("s0", "s1") else sid
            score = g["activation"].max() if rank_by == "max" else g["activation"].sum() / 16
            scores[key] = max(scores.get(key, -1), score)
        expect = sorted(scores.values(), reverse=True)[:3]
        got = tops.filter((pl.col("feature") == f) & (pl.col("modality") == "image")).sort("rank")
        assert got["score"].to_list() == pytest.approx(expect, rel=1e-5)
        assert not {"s0", "s1"} <= set(got["sample_id"].to_list())  # one image counts once
        txt = df.filter((pl.col("feature") == f) & (pl.col("modality") == "text"))
        best = txt.group_by("sample_id").agg(pl.col("activation").max()).sort("activation", descending=True).head(3)
        got_t = tops.filter((pl.col("feature") == f) & (pl.col("modality") == "text")).sort("rank")
        assert got_t["score"].to_list() == pytest.approx(best["activation"].to_list(), rel=1e-5)


def test_select_features(codes):
    df, lazy, _, n_tokens = codes
    stats = feature_stats(lazy, n_tokens, 128, n_tokens - 128)
    chosen, info = select_features(stats, None, "most_frequent", n=3, min_samples=1)
    assert chosen == stats.sort(["frequency", "feature"], descending=[True, False])["feature"].head(3).to_list()
    chosen, info = select_features(stats, None, "list", ids=[2, 999], min_samples=1)
    assert chosen == [2] and info["skipped_ids"] == [999]
    chosen, info = select_features(stats, None, "most_frequent", n=10, min_samples=100)
    assert chosen == [] and info["n_too_few_samples"] == 10
    with pytest.raises(ValueError, match="features.select.mode"):
        select_features(stats, None, "bogus")


def test_activation_mask_and_highlight():
    grid = patch_grid(np.array([0, 1]), np.array([0, 1]), np.array([2.0, 0.0]), side=2)
    assert grid.tolist() == [[2.0, 0.0], [0.0, 0.0]]
    mask = activation_mask(grid, (40, 20))  # (width, height)
    assert mask.shape == (20, 40)
    assert mask[0, 0] == pytest.approx(1.0) and mask[-1, -1] == pytest.approx(0.0)
    image = Image.new("RGB", (40, 20), (200, 200, 200))
    out = np.asarray(highlight(image, grid, dim=0.12))
    assert out[0, 0, 0] == 200 and out[-1, -1, 0] == int(200 * 0.12)


def test_top_tokens_and_one_pass_selection_agree_with_brute_force(codes):
    """Each top sample's token_index is its most activating token of that modality (base view for
    images), and stats_and_top_samples (one aggregation of the codes) equals the two functions."""
    df, lazy, images, n_tokens = codes
    tops = top_samples(lazy, images, n=3)
    for r in tops.iter_rows(named=True):
        g = df.filter((pl.col("feature") == r["feature"]) & (pl.col("sample_id") == r["sample_id"])
                      & (pl.col("modality") == r["modality"]))
        if r["modality"] == "image":
            g = g.filter(pl.col("view") == 0)
        best = g.filter(pl.col("activation") == g["activation"].max())["token_index"].min()
        assert r["token_index"] == best
    stats, tops2 = stats_and_top_samples(lazy, n_tokens, 128, n_tokens - 128, images, n=3, rank_by="max")
    assert stats.equals(feature_stats(lazy, n_tokens, 128, n_tokens - 128)) and tops2.equals(tops)


def _naive(rows, images, n, rank_by):
    """Plain-Python reference: stats and top samples straight from the definitions."""
    by_f = {}
    for r in rows:
        by_f.setdefault(r["feature"], []).append(r)
    stats = {}
    for f, rs in by_f.items():
        acts = [r["activation"] for r in rs]
        stats[f] = (len(rs), max(acts), np.float32(sum(float(a) for a in acts) / len(rs)),
                    sum(r["modality"] == "image" for r in rs), sum(r["modality"] == "text" for r in rs), len({r["sample_id"] for r in rs}))
    n_base = dict(zip(images["sample_id"], images["n_base"]))
    path = dict(zip(images["sample_id"], images["image_path"]))
    tops = []
    for f, rs in sorted(by_f.items()):
        for modality in ("image", "text"):
            per = {}
            for r in rs:
                if r["modality"] == modality and (modality == "text" or r["view"] == 0):
                    per.setdefault(r["sample_id"], []).append(r)
            cand = []
            for sid, g in per.items():
                top = max(r["activation"] for r in g)
                tok = min(r["token_index"] for r in g if r["activation"] == top)
                score = float(top) if modality == "text" or rank_by == "max" else sum(float(r["activation"]) for r in g) / n_base[sid]
                score = float(np.float32(score))  # ranked as stored: float32, then sample id
                cand.append((-score, sid, top, tok))
            cand.sort()
            seen, kept = set(), []
            for c in cand:  # one image per file; one text sample per (score, token): the same context
                same = path[c[1]] if modality == "image" else (c[0], c[3])
                if same not in seen:
                    seen.add(same)
                    kept.append(c)
            cand = kept
            tops += [(f, modality, i, sid, np.float32(-s), top, tok) for i, (s, sid, top, tok) in enumerate(cand[:n])]
    return stats, tops


@pytest.mark.parametrize("rank_by", ["max", "mean"])
def test_streamed_selection_equals_naive_computation(tmp_path, monkeypatch, rank_by):
    """Random codes in whole-sample shards, activations on a coarse grid (ties in scores and tokens),
    image files shared by up to 3 samples; batches, dense groups and merges made tiny so that
    samples straddle batches and the running top lists are merged many times."""
    monkeypatch.setattr(code_stats, "_BATCH_ROWS", 97)
    monkeypatch.setattr(code_stats, "_CELLS", 64)
    monkeypatch.setattr(code_stats, "_PENDING_ROWS", 50)
    rng = np.random.default_rng(1)
    rows, shards, images = [], [], {"sample_id": [], "n_base": [], "image_path": []}
    for shard in range(4):
        part = []
        for j in range(int(rng.integers(3, 9))):
            sid = f"x{rng.integers(10**6):06d}-{shard}-{j}"  # ids not in file order
            n_img = 0 if j % 4 == 3 else 12
            if n_img:
                images["sample_id"].append(sid)
                images["n_base"].append(8)
                images["image_path"].append(f"img{int(rng.integers(0, 6))}.png")
            for t in range(n_img + 4):
                img = t < n_img
                for f in rng.choice(20, size=3, replace=False):
                    part.append({"sample_id": sid, "token_index": t, "modality": "image" if img else "text",
                                 "view": (0 if t < 8 else 1) if img else -1, "patch_row": t // 4 if img else -1,
                                 "patch_col": t % 4 if img else -1, "feature": int(f),
                                 "activation": np.float32(rng.integers(1, 8) * 0.25)})
        write_parquet(tmp_path / f"codes-{shard}.parquet", pl.DataFrame(part).to_arrow().cast(CODE_SCHEMA))
        shards.append(tmp_path / f"codes-{shard}.parquet")
        rows += part
    images = pl.DataFrame(images)
    n_tok, n_img = 1000, 600
    stats, tops = stats_and_top_samples(pl.scan_parquet([str(p) for p in shards]), n_tok, n_img, n_tok - n_img, images, n=4, rank_by=rank_by)
    want_stats, want_tops = _naive(rows, images.to_dict(as_series=False), 4, rank_by)
    assert stats["feature"].to_list() == sorted(want_stats)
    for r in stats.iter_rows(named=True):
        n, mx, mean, n_i, n_t, n_s = want_stats[r["feature"]]
        assert (r["n_tokens_active"], r["max_activation"], r["mean_activation"], r["n_samples"]) == (n, mx, mean, n_s)
        assert (r["frequency"], r["frequency_image"], r["frequency_text"]) == pytest.approx((n / n_tok, n_i / n_img, n_t / (n_tok - n_img)))
    assert [tuple(r) for r in tops.iter_rows()] == want_tops
    assert tops.schema == pl.Schema({"feature": pl.Int32, "modality": pl.String, "rank": pl.Int16, "sample_id": pl.String,
                                     "score": pl.Float32, "max_activation": pl.Float32, "token_index": pl.Int32})


def test_non_contiguous_or_negative_codes_are_rejected(codes):
    df, _, images, n_tokens = codes
    shuffled = pl.concat([df.slice(0, 10), df.slice(100, 10), df.slice(10, 10)]).lazy()  # s0's rows split by s1's
    with pytest.raises(ValueError, match="not contiguous"):
        feature_stats(shuffled, n_tokens, 128, n_tokens - 128)
    bad = df.with_columns(pl.when(pl.int_range(pl.len()) == 5).then(-1.0).otherwise(pl.col("activation")).alias("activation")).lazy()
    with pytest.raises(ValueError, match="negative, infinite or NaN"):
        top_samples(bad, images, n=3)
    inf = df.with_columns(pl.when(pl.int_range(pl.len()) == 7).then(float("inf")).otherwise(pl.col("activation")).alias("activation")).lazy()
    with pytest.raises(ValueError, match="sample 's0'.* infinite"):
        feature_stats(inf, n_tokens, 128, n_tokens - 128)


@pytest.mark.parametrize("rank_by", ["max", "mean"])
def test_base_view_rows_of_a_sample_missing_from_the_samples_table_are_refused(codes, rank_by):
    """Without its n_base and image file such a sample's image score is undefined (mean) and it
    could not count once per file (max): refused, naming it, rather than ranked or dropped."""
    _, lazy, images, _ = codes
    with pytest.raises(ValueError, match="sample 's3' has base-view image rows"):
        top_samples(lazy, images.filter(pl.col("sample_id") != "s3"), n=3, rank_by=rank_by)
    with pytest.raises(ValueError, match="sample 's3' has base-view image rows"):  # n_base 0: no base-view tokens
        top_samples(lazy, images.with_columns(pl.when(pl.col("sample_id") == "s3").then(0).otherwise(pl.col("n_base")).alias("n_base")),
                    n=3, rank_by=rank_by)


@pytest.mark.parametrize("rank_by", ["max", "mean"])
def test_negative_zero_ranks_as_zero(tmp_path, rank_by):
    """-0.0 passes the sign check, and must rank as 0.0 (its float32 bits are negative)."""
    rows = [("a", 0, "text", -1, 0.0), ("b", 1, "text", -1, -0.0), ("d", 0, "image", 0, -0.0), ("d", 1, "image", 0, 0.0),
            ("e", 0, "image", 0, -0.0)]
    df = pl.DataFrame([{"sample_id": sid, "token_index": t, "modality": m, "view": v, "patch_row": 0 if v == 0 else -1,
                        "patch_col": 0 if v == 0 else -1, "feature": 1, "activation": a} for sid, t, m, v, a in rows])
    write_parquet(tmp_path / "codes.parquet", df.to_arrow().cast(CODE_SCHEMA))
    images = pl.DataFrame({"sample_id": ["d", "e"], "n_base": [2, 2], "image_path": ["d.png", "e.png"]})
    tops = top_samples(pl.scan_parquet(tmp_path / "codes.parquet"), images, n=3, rank_by=rank_by)
    got = [(r["modality"], r["sample_id"], r["score"], r["token_index"]) for r in tops.iter_rows(named=True)]
    assert got == [("image", "d", 0.0, 0), ("image", "e", 0.0, 0), ("text", "a", 0.0, 0), ("text", "b", 0.0, 1)]
