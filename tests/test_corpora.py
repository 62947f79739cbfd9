"""Two corpora (arXiv 2411.14982 Figs 1-2): corpus.train feeds extraction and training, corpus.interpret is
encoded from the model with the SAE spliced in (sparse codes only). The legacy single corpus section,
the DAG (encode reads the model and the SAE, not the activations), and encoding from the model equal
to encoding the dense shards of the same samples."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import REPO, default_run_dir, dry_run
from report_inputs import inputs
from snakemake.utils import validate

from mmsae.extract.run import ExtractConfig, extract
from mmsae.workflow.config_check import config_errors, normalise_corpus
from mmsae.data import build_corpus, corpus_part
from mmsae.codes.encode import EncodeConfig, encode_corpus
from mmsae.codes.schema import CODE_SCHEMA
from mmsae.codes.select import base_view_counts
from mmsae.report.page import ReportInputs, build_report
from mmsae.sae import TopKSAE, trained_without_special_tokens
from mmsae.codes.rows import encode_shards
from mmsae.core.shards import shard_paths

SCHEMA = str(REPO / "config/schema.yaml")
HOOK = "model.language_model.layers.2"
KEY = ["sample_id", "token_index", "feature"]


# --- config: the two roles and the legacy single section ---------------------------------------

def _validated(cfg: dict) -> tuple[dict, str | None]:
    cfg = copy.deepcopy(cfg)
    note = normalise_corpus(cfg)
    validate(cfg, SCHEMA)
    return cfg, note


def test_legacy_single_corpus_is_used_for_both_roles():
    legacy = {"corpus": {"source": "skimage", "names": ["chelsea"], "prompts": ["Hi."], "max_images": 1}}
    cfg, note = _validated(legacy)
    assert cfg["corpus"]["train"] == cfg["corpus"]["interpret"]
    assert cfg["corpus"]["train"] == {"source": "skimage", "names": ["chelsea"], "prompts": ["Hi."], "max_images": 1,
                                      "path": None, "text_prompts": [], "text_source": None}
    assert "corpus.train" in note and "corpus.interpret" in note and "train: {" in note
    # a legacy --configfile merged over config.yaml's two roles: the legacy section replaces both
    merged = {"corpus": {"train": {"source": "skimage", "prompts": ["A", "B"]}, "interpret": {"prompts": [""]},
                         "source": "folder", "path": "imgs"}}
    cfg, _ = _validated(merged)
    assert cfg["corpus"]["train"] == cfg["corpus"]["interpret"]
    assert cfg["corpus"]["train"]["source"] == "folder" and cfg["corpus"]["train"]["prompts"] == ["Describe this image."]


def test_two_roles_get_their_own_defaults_and_checks(tmp_path):
    cfg, note = _validated({"corpus": {"interpret": {"prompts": [""]}}, "encode": {}})
    assert note is None
    assert cfg["corpus"]["train"]["prompts"] == ["Describe this image."] and cfg["corpus"]["interpret"]["prompts"] == [""]
    assert cfg["encode"] == {"batch_size": 1, "shard_tokens": 65536, "base_view_only": False}
    cfg, _ = _validated({"corpus": {"interpret": {"source": "folder", "path": "nowhere"}, "train": {"source": "table"}}})
    errors = config_errors(cfg, tmp_path)
    assert any(e.startswith("corpus.interpret.path='nowhere': no such folder") for e in errors)
    assert "corpus.train.path is required when corpus.train.source is 'table'" in errors


def test_default_config_interprets_its_own_corpus():
    cfg, note = _validated(yaml.safe_load((REPO / "config.yaml").read_text()))
    train, interp = cfg["corpus"]["train"], cfg["corpus"]["interpret"]
    assert note is None and train["source"] == interp["source"] == "skimage"
    assert interp["prompts"] == [""] and len(train["prompts"]) == 2 and interp["text_prompts"] == train["text_prompts"]


# --- the DAG: encode depends on the model and the SAE, not on the activations -----------------

def _jobs(workdir: Path) -> list:
    return [(j.rule, j.input, j.params) for j in dry_run(workdir).jobs]


@pytest.mark.workflow
def test_encode_reads_the_model_and_the_sae_not_the_activations(tmp_path):
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    jobs = _jobs(tmp_path)
    rules = {name: (inputs, params) for name, inputs, params in jobs}
    inputs, params = rules["encode"]
    run = default_run_dir()
    assert sorted(inputs) == ["results/models/demo", f"{run}/sae/cfg.json", f"{run}/sae/sae_weights.safetensors"]
    assert params["corpus"]["prompts"] == [""] and params["encode"]["base_view_only"] is False
    assert rules["extract"][1]["corpus"]["prompts"] == ["Describe this image.", "What stands out in this picture?"]
    for name in ("encode", "select_top", "render_maps", "evaluate"):  # the interpretation side reads codes only
        assert not [f for f in rules[name][0] if f.startswith("results/activations")], name
    assert f"{run}/codes/samples.parquet" in rules["select_top"][0]
    assert "results/activations/manifest.json" in rules["train_sae"][0]  # the train side keeps its cache


# --- encoding from the model = encoding the extracted dense shards --------------------------------

@pytest.fixture(scope="module")
def encoded(subject, tmp_path_factory):
    """The same samples extracted densely and encoded, and encoded from the model (both base_view_only values)."""
    samples = build_corpus({"source": "skimage", "names": ["chelsea", "rocket", "coffee"], "prompts": ["", "Describe it."],
                            "text_prompts": ["What is 2+2?", "Name a colour."]})
    sae = TopKSAE(64, 256, k=8, seed=0)
    with torch.no_grad():  # non-zero encoder bias, so that some latents are off for some tokens
        sae.b_enc.normal_(0, 0.5)
    sae_cfg = {"hook_name": HOOK}
    d = tmp_path_factory.mktemp("enc")
    extract(subject, samples, d / "acts", ExtractConfig(hook_point=HOOK, shard_tokens=300), "h", progress=False)
    dense = encode_shards(sae, shard_paths(d / "acts/manifest.json"), d / "dense", progress=False)
    out = {}
    for base_only in (False, True):
        cfg = EncodeConfig(hook_point=HOOK, batch_size=2, shard_tokens=250, base_view_only=base_only, max_image_pixels=None)
        out[base_only] = encode_corpus(subject, sae, sae_cfg, samples, d / f"model-{base_only}", cfg, "h", progress=False)
    return d, dense, out, subject, sae, samples


def _codes(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted(folder.glob("codes-*.parquet"))).sort(KEY)


def test_encoding_from_the_model_equals_encoding_the_dense_shards(encoded):
    d, dense_manifest, model_manifests, *_ = encoded
    m = model_manifests[False]
    dense, model = _codes(d / "dense"), _codes(d / "model-False")
    assert pq.read_schema(sorted((d / "model-False").glob("codes-*.parquet"))[0]).remove_metadata().equals(CODE_SCHEMA)
    assert model.height > 0 and model.select(KEY).equals(dense.select(KEY))  # the same latents of the same tokens
    assert model.drop("activation").equals(dense.drop("activation"))  # the same token metadata
    np.testing.assert_allclose(model["activation"].to_numpy(), dense["activation"].to_numpy(), rtol=1e-4, atol=1e-5)
    acts = d / "acts/manifest.json"
    a = json.loads(acts.read_text())
    for k in ("n_tokens", "n_image_tokens", "n_text_tokens", "n_samples", "grid_side", "hook_point", "d_model"):
        assert m[k] == a[k], k
    assert m["n_tokens"] == dense_manifest["n_tokens"] and m["d_sae"] == 256 and m["k"] == 8 and len(m["shards"]) > 1
    # the samples table: extraction's (token strings included), plus the base-view token count
    ext = pl.read_parquet(d / "acts/samples.parquet").sort("sample_id")
    ours = pl.read_parquet(d / "model-False/samples.parquet").sort("sample_id")
    assert ours.drop("n_base_tokens").select(ext.columns).equals(ext)


def test_base_view_only_keeps_base_view_image_tokens_and_text(encoded):
    d, _, manifests, *_ = encoded
    full, base = _codes(d / "model-False"), _codes(d / "model-True")
    assert full.filter(pl.col("view") > 0).height > 0  # anyres tiles exist and are left out
    assert base.equals(full.filter((pl.col("view") == 0) | (pl.col("modality") == "text")))
    acts = pl.read_parquet([str(p) for p in shard_paths(d / "acts/manifest.json")], columns=["modality", "view"])
    n_kept = acts.filter((pl.col("view") == 0) | (pl.col("modality") == "text")).height
    assert manifests[True]["n_tokens"] == n_kept < manifests[False]["n_tokens"]
    assert manifests[True]["n_text_tokens"] == manifests[False]["n_text_tokens"] and manifests[True]["base_view_only"]


def test_base_view_counts_come_from_the_codes_samples(encoded):
    """The base-view token counts equal those counted in the dense shards (the old source)."""
    d, *_ = encoded
    acts = pl.read_parquet([str(p) for p in shard_paths(d / "acts/manifest.json")], columns=["sample_id", "view"])
    want = acts.filter(pl.col("view") == 0).group_by("sample_id").len().rename({"len": "n_base"}).sort("sample_id")
    for folder in ("model-False", "model-True"):
        got = base_view_counts(pl.read_parquet(d / folder / "samples.parquet")).sort("sample_id")
        assert got.select("sample_id", "n_base").equals(want) and got["image_path"].null_count() == 0
    with pytest.raises(ValueError, match="n_base_tokens"):
        base_view_counts(pl.read_parquet(d / "acts/samples.parquet"))


def test_special_tokens_the_sae_was_trained_without_get_no_codes(encoded, tmp_path):
    """An SAE trained without special tokens (our default) is not asked to encode them: their codes
    would be out of distribution (an attention sink such as <|im_start|> tops feature statistics and
    text contexts). The rows kept are exactly the others'; the manifest counts what was left out."""
    d, _, manifests, subject, sae, samples = encoded
    special = tuple(subject.special_token_ids)
    cfg = EncodeConfig(hook_point=HOOK, batch_size=2, shard_tokens=250, base_view_only=False, max_image_pixels=None)
    ours = {"hook_name": HOOK, "mmsae": {"train": {}}}  # our cfg.json: sae.exclude_special_tokens defaults to true
    m = encode_corpus(subject, sae, ours, samples, tmp_path / "codes", cfg, "h", progress=False)
    ids = pl.read_parquet(d / "model-False" / "samples.parquet").select("sample_id", "input_ids").explode("input_ids").with_columns(
        token_index=pl.int_range(pl.len()).over("sample_id").cast(pl.Int32))
    full = _codes(d / "model-False").join(ids, on=["sample_id", "token_index"])
    is_special = pl.col("input_ids").is_in(list(special))
    assert full.filter(is_special).height > 0  # the corpus has special tokens: the check below is not vacuous
    assert _codes(tmp_path / "codes").equals(full.filter(~is_special).drop("input_ids"))
    n_special = ids.filter(is_special).height
    assert m["n_tokens_excluded"] == n_special and m["n_tokens"] == manifests[False]["n_tokens"] - n_special
    assert m["exclude_token_ids"] == sorted(special) and manifests[False]["n_tokens_excluded"] == 0
    dense = encode_shards(sae, shard_paths(d / "acts/manifest.json"), tmp_path / "dense", progress=False, exclude_token_ids=special)
    assert _codes(tmp_path / "dense").select(KEY).equals(_codes(tmp_path / "codes").select(KEY))  # the dense path leaves out the same
    assert dense["n_tokens_excluded"] == n_special and dense["n_tokens"] == m["n_tokens"]


def test_only_an_sae_of_ours_trained_without_special_tokens_excludes_them():
    assert trained_without_special_tokens({"mmsae": {"train": {"exclude_special_tokens": True}}})
    assert trained_without_special_tokens({"mmsae": {"train": {}}})  # the default
    assert not trained_without_special_tokens({"mmsae": {"train": {"exclude_special_tokens": False}}})
    assert not trained_without_special_tokens({"hook_name": HOOK})  # an SAE from elsewhere: trained on every token


def test_encode_rejects_an_sae_of_another_hook_point(encoded, tmp_path):
    _, _, _, subject, sae, samples = encoded
    cfg = EncodeConfig(hook_point=HOOK, batch_size=1, shard_tokens=100, base_view_only=False, max_image_pixels=None)
    with pytest.raises(ValueError, match="layers.3"):
        encode_corpus(subject, sae, {"hook_name": "model.language_model.layers.3"}, samples[:1], tmp_path, cfg, "h", progress=False)
    with pytest.raises(ValueError, match="d_in=32"):
        encode_corpus(subject, TopKSAE(32, 64, k=4), {}, samples[:1], tmp_path, cfg, "h", progress=False)


def test_parts_split_samples_as_extraction_does():
    samples = build_corpus({"source": "skimage", "names": ["chelsea", "rocket"], "prompts": ["a", "b"], "text_prompts": ["t"]})
    parts = [corpus_part(samples, p, 2) for p in range(2)]
    assert [s.sample_id for s in parts[0] + parts[1]] == [s.sample_id for s in samples[0::2] + samples[1::2]]
    with pytest.raises(ValueError, match="part 2"):
        corpus_part(samples, 2, 2)


# --- the report says which corpus each number comes from ------------------------------------------

def test_report_names_the_corpus_of_each_number(tmp_path):
    def text(html: str) -> str:
        return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))

    args = inputs(tmp_path)
    codes = {"n_samples": 33, "n_tokens": 4321, "n_image_tokens": 4000, "n_text_tokens": 321, "n_shards": 3,
             "n_images_used": 9, "n_images_converted": 0, "skipped": [{"image": "odd.png", "reason": "too small"}],
             "base_view_only": True, "n_tokens_excluded": 66}
    page = text(build_report(ReportInputs(**args, codes=codes)))
    train = page[page.index("training corpus (corpus.train)"):page.index("interpretation corpus (corpus.interpret)")]
    interp = page[page.index("interpretation corpus (corpus.interpret)"):page.index("Sparse autoencoder")]
    assert "5000 (3000 image, 2000 text)" in train and "d_sae" in train
    assert "4321 (4000 image, 321 text)" in interp and "base-view image tokens and text only" in interp
    assert "odd.png: too small" in interp and "odd.png" not in train
    assert "special tokens left out (the SAE was trained without them) 66" in interp
    assert "trained on corpus.train" in page and "over corpus.interpret (33 samples, 9 images" in page
    old = text(build_report(ReportInputs(**args)))  # a report without the codes' manifest still renders, train side only
    assert "training corpus (corpus.train)" in old and "corpus.interpret (" not in old
