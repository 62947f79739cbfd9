"""Extraction: Parquet schema, resume after a kill, batching, bad images skipped and counted."""

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mmsae.activations import ExtractConfig, extract
from mmsae.data import Sample, build_corpus
from mmsae.models import load_subject_model
from mmsae.shards import activation_schema, iter_activations, read_shard_meta, shard_paths

HOOK = "model.language_model.layers.2"


@pytest.fixture(scope="module")
def subject(tiny_llava_dir):
    return load_subject_model(tiny_llava_dir)


def _corpus(image_dir):
    return build_corpus({"source": "folder", "path": str(image_dir), "prompts": ["Describe it."],
                         "text_prompts": ["What is 2+2?", "Name a colour."]})


def _read_sorted(manifest):
    t = pq.read_table([str(p) for p in shard_paths(manifest)])
    return t.sort_by([("sample_id", "ascending"), ("token_index", "ascending")])


def test_schema_round_trip_and_manifest(subject, image_dir, tmp_path):
    samples = _corpus(image_dir)
    m = extract(subject, samples, tmp_path, ExtractConfig(hook_point=HOOK, shard_tokens=200), "h1", progress=False)
    shard = shard_paths(tmp_path / "manifest.json")[0]
    schema = pq.read_schema(shard)
    assert schema.remove_metadata().equals(activation_schema(64))
    meta = read_shard_meta(shard)
    assert meta["hook_point"] == HOOK and meta["d_model"] == 64 and meta["layer"] == 2 and meta["config_hash"] == "h1"
    t = _read_sorted(tmp_path / "manifest.json")
    assert t.num_rows == m["n_tokens"] == m["n_image_tokens"] + m["n_text_tokens"]
    assert set(t.column("modality").to_pylist()) == {"image", "text"}
    text = t.filter(pc.equal(t["view"], -1))
    assert text.column("patch_row").null_count == text.num_rows
    # the good, CMYK, 16-bit, palette and alpha images are used; the rest skipped with reasons
    reasons = {s["image"].rsplit("/", 1)[-1]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"truncated.jpg", "junk.png", "tiny.png", "blank.png"}
    assert m["n_images_skipped"] == 4 and m["n_images_converted"] == 4
    assert m["n_samples"] == 5 + 2
    x, cols = next(iter_activations(shard_paths(tmp_path / "manifest.json"), 50))
    assert x.shape == (50, 64) and x.dtype == np.float32 and set(cols) == {"modality", "token_id"}


def test_resume_after_kill_skips_done_samples(subject, image_dir, tmp_path, caplog):
    samples = _corpus(image_dir)
    cfg = ExtractConfig(hook_point=HOOK, shard_tokens=1)  # one sample per shard
    first = extract(subject, samples[:4], tmp_path / "a", cfg, "h", progress=False)  # "killed" after 4 samples
    (tmp_path / "a" / "manifest.json").unlink()
    caplog.set_level("INFO")
    extract(subject, samples, tmp_path / "a", cfg, "h", progress=False)
    assert first["n_samples"] >= 2 and f"{first['n_samples']} already extracted" in caplog.text
    extract(subject, samples, tmp_path / "b", cfg, "h", progress=False)
    a, b = _read_sorted(tmp_path / "a" / "manifest.json"), _read_sorted(tmp_path / "b" / "manifest.json")
    assert a.num_rows == b.num_rows
    np.testing.assert_array_equal(np.stack(a.column("activation").to_numpy(zero_copy_only=False)),
                                  np.stack(b.column("activation").to_numpy(zero_copy_only=False)))
    # another config hash discards the old shards
    extract(subject, samples[:4], tmp_path / "a", cfg, "other", progress=False)
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["n_samples"] == first["n_samples"]


def test_batched_equals_unbatched(subject, image_dir, tmp_path):
    samples = _corpus(image_dir)
    extract(subject, samples, tmp_path / "b1", ExtractConfig(hook_point=HOOK, batch_size=1), "h", progress=False)
    extract(subject, samples, tmp_path / "b3", ExtractConfig(hook_point=HOOK, batch_size=3), "h", progress=False)
    a, b = _read_sorted(tmp_path / "b1" / "manifest.json"), _read_sorted(tmp_path / "b3" / "manifest.json")
    assert a.drop(["activation"]).equals(b.drop(["activation"]))
    np.testing.assert_allclose(np.stack(a.column("activation").to_numpy(zero_copy_only=False)),
                               np.stack(b.column("activation").to_numpy(zero_copy_only=False)), atol=1e-4)


def test_float16_storage(subject, tmp_path):
    m = extract(subject, [Sample("t", "hello")], tmp_path, ExtractConfig(hook_point=HOOK, dtype="float16"), "h", progress=False)
    assert pq.read_schema(tmp_path / m["shards"][0]["path"]).field("activation").type.value_type == "halffloat"
