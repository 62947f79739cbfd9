"""Token-norm statistics, the outlier rule and SAELens-style normalisation, against numpy."""

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from mmsae.core.io import write_parquet
from mmsae.sae import TopKSAE, load_sae
from mmsae.sae.data import ActivationStream, heldout_sample_ids
from mmsae.sae.norms import fold_scaling_factor, norm_stats
from mmsae.sae.run import train_from_manifest
from mmsae.core.shards import activation_schema

D, TOKENS = 16, 10


def _manifest(tmp_path, n_images=30):
    """Image samples (two prompts each) whose every 20th image token is 100x larger, and text samples."""
    rng = np.random.default_rng(0)
    ids = [f"img{i}/{p}" for i in range(n_images) for p in (0, 1)] + [f"text{t}" for t in range(20)]
    images = [f"img{i}.png" for i in range(n_images) for _ in (0, 1)] + [None] * 20
    n = len(ids) * TOKENS
    x = rng.normal(size=(n, D)).astype(np.float32)
    modality = np.array(["image" if images[i // TOKENS] and i % TOKENS < 8 else "text" for i in range(n)])
    x[np.flatnonzero(modality == "image")[::20]] *= 100.0
    token_id = np.full(n, 7, np.int32)
    token_id[::TOKENS] = 0  # a special token, excluded
    table = pa.table({
        "sample_id": np.repeat(ids, TOKENS).tolist(), "token_index": np.tile(np.arange(TOKENS), len(ids)).astype(np.int32),
        "token_id": token_id, "modality": pa.array(modality).dictionary_encode().cast(pa.dictionary(pa.int8(), pa.string())),
        "view": np.zeros(n, np.int16), "patch_row": np.zeros(n, np.int16), "patch_col": np.zeros(n, np.int16),
        "activation": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), D)}, schema=activation_schema(D))
    write_parquet(tmp_path / "shard-00000.parquet", table)
    samples = pa.table({"sample_id": ids, "image_path": images, "prompt": [f"p{i % 2}" for i in range(len(ids))]})
    write_parquet(tmp_path / "samples.parquet", samples)
    (tmp_path / "manifest.json").write_text(json.dumps({
        "shards": [{"path": "shard-00000.parquet", "n_tokens": n}], "d_model": D, "special_token_ids": [0],
        "model": "synthetic", "hook_point": "h"}))
    sid = np.repeat(ids, TOKENS)
    return tmp_path / "manifest.json", x, modality == "image", np.isin(sid, heldout_sample_ids(samples, 0.3)), token_id != 0


def _median(v):
    v, n = np.sort(v), len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _p99(v):  # linear interpolation between order statistics, written out
    v = np.sort(v)
    h = 0.99 * (len(v) - 1)
    lo = int(math.floor(h))
    return v[lo] + (h - lo) * (v[min(lo + 1, len(v) - 1)] - v[lo])


def test_norm_stats_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(501, 8)) * rng.lognormal(size=(501, 1))
    img = rng.random(501) < 0.6
    norms = np.sqrt((x**2).sum(1))
    st = norm_stats(norms, img)
    for name, m in (("all", np.ones(501, bool)), ("image", img), ("text", ~img)):
        assert st[name]["median"] == pytest.approx(_median(norms[m]))
        assert st[name]["p99"] == pytest.approx(_p99(norms[m]))
        assert st[name]["max"] == pytest.approx(norms[m].max())
    assert norm_stats(norms, np.zeros(501, bool))["image"] == {"median": None, "p99": None, "max": None}


def test_fold_scaling_factor_takes_raw_activations():
    sae = TopKSAE(D, 64, 4, seed=3)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(20, D) * 50
    s = 0.037
    before = sae(x * s)
    fold_scaling_factor(sae, s)
    after = sae(x)
    torch.testing.assert_close(after.x_hat, before.x_hat / s, rtol=1e-4, atol=1e-3)
    assert torch.equal(after.top_idx, before.top_idx)


def test_stream_leaves_out_outliers_and_scales(tmp_path):
    manifest, x, _, held, not_special = _manifest(tmp_path)
    paths = [tmp_path / "shard-00000.parquet"]
    kw = dict(batch_size=16, seed=0, buffer_tokens=64, heldout_ids=[], exclude_token_ids=[0])
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    cap = 10 * np.median(norms[not_special])
    plain = torch.cat([b for _, (b, _) in zip(range(40), ActivationStream(paths, **kw).train_batches())])
    assert plain.norm(dim=1).max() > cap  # outliers are in the data
    capped = torch.cat([b for _, (b, _) in zip(range(40), ActivationStream(paths, max_norm=cap, scale=2.0, **kw).train_batches())])
    assert (capped.norm(dim=1) / 2.0).max() <= cap * (1 + 1e-6)


@pytest.mark.parametrize("normalize", ["none", "expected_average_only_in"])
def test_outlier_rule_and_norm_report(tmp_path, normalize):
    manifest, x, is_image, held, not_special = _manifest(tmp_path)
    opts = {"d_sae": 64, "k": 4, "steps": 20, "batch_size": 32, "warmup_steps": 2, "buffer_tokens": 128,
            "b_dec_init_tokens": 64, "heldout_fraction": 0.3, "exclude_norm_above": 10.0, "normalize_activations": normalize}
    m = train_from_manifest(manifest, opts, "cpu", tmp_path / "ck", tmp_path / "out")
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    train = ~held & not_special
    for name, sel in (("all", train), ("image", train & is_image), ("text", train & ~is_image)):
        assert m["token_norms"][name]["median"] == pytest.approx(_median(norms[sel]))
        assert m["token_norms"][name]["p99"] == pytest.approx(_p99(norms[sel]))
        assert m["token_norms"][name]["max"] == pytest.approx(norms[sel].max())
    cap = 10.0 * _median(norms[train])
    assert m["exclude_norm_above"]["threshold"] == pytest.approx(cap)
    assert m["exclude_norm_above"]["n_excluded_train_tokens"] == int((norms[train] > cap).sum()) > 0
    ho = held & not_special
    assert m["heldout"]["n_excluded_tokens"] == int((norms[ho] > cap).sum()) > 0
    assert m["heldout"]["n_tokens"] == int((norms[ho] <= cap).sum())
    assert m["heldout"]["fvu_including_excluded"] is not None and m["heldout"]["fvu"] is not None
    sae, cfg = load_sae(tmp_path / "out")
    assert cfg["normalize_activations"] == "none"  # folded, as SAELens saves a finished SAE
    factor = cfg["mmsae"]["normalize_activations"]["scaling_factor"]
    if normalize == "none":
        assert factor == 1.0
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    else:
        kept = norms[train & (norms <= cap)]
        assert factor == pytest.approx(math.sqrt(D) / kept.mean())
        # the weights carry the factor: unit-norm decoder rows divided by it
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((64,), 1 / factor), rtol=1e-4, atol=1e-6)
    # held-out FVU recomputed independently from the saved SAE on raw activations
    xs = torch.from_numpy(x[ho & (norms <= cap)])
    with torch.no_grad():
        x_hat = sae(xs).x_hat
    fvu = ((xs - x_hat) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum()
    assert m["heldout"]["fvu"] == pytest.approx(fvu.item(), rel=1e-4)


def test_saelens_reads_the_folded_sae(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    manifest, x, *_ = _manifest(tmp_path)
    opts = {"d_sae": 64, "k": 4, "steps": 10, "batch_size": 32, "warmup_steps": 2, "buffer_tokens": 128,
            "b_dec_init_tokens": 64, "normalize_activations": "expected_average_only_in"}
    train_from_manifest(manifest, opts, "cpu", tmp_path / "ck", tmp_path / "out")
    ours, _ = load_sae(tmp_path / "out")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "out"), device="cpu")
    xs = torch.from_numpy(x[:50])
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(theirs.encode(xs)), ours(xs).x_hat, rtol=1e-4, atol=1e-3)
