"""The SAE's held-out split is by image (and by prompt for text-only samples), and is saved."""

import json
import zlib
from collections import defaultdict

import numpy as np
import pyarrow as pa

from mmsae.core.io import write_parquet
from mmsae.sae.data import heldout_sample_ids
from mmsae.sae.run import train_from_manifest
from mmsae.core.shards import activation_schema


def _samples(n_images=40, n_text=20):
    """Every image under two prompts, then text-only samples with their own prompts (ids as relative paths)."""
    ids, images, prompts = [], [], []
    for i in range(n_images):
        for p in ("Describe the image.", "What is in it?"):
            ids.append(f"coco/{i:03d}.jpg/{p[:4]}")
            images.append(f"corpus/coco/{i:03d}.jpg")
            prompts.append(p)
    for t in range(n_text):
        ids.append(f"text/{t:03d}.txt")
        images.append(None)
        prompts.append(f"Tell me about topic {t}.")
    return pa.table({"sample_id": ids, "image_path": images, "prompt": prompts})


def _sides(table, held):
    sides = defaultdict(set)
    for sid, image, prompt in zip(*(table.column(c).to_pylist() for c in ("sample_id", "image_path", "prompt"))):
        sides[image if image is not None else prompt].add(sid in held)
    return sides


def test_no_image_or_text_prompt_on_both_sides():
    table = _samples()
    # the data is such that a split by sample id (the old rule) puts some image on both sides
    by_id = {s for s in table.column("sample_id").to_pylist() if zlib.crc32(s.encode()) / 2**32 < 0.3}
    assert any(len(v) == 2 for v in _sides(table, by_id).values())
    held = set(heldout_sample_ids(table, 0.3))
    sides = _sides(table, held)
    assert all(len(v) == 1 for v in sides.values())  # each image / text prompt entirely on one side
    n_groups_held = sum(True in v for v in sides.values())
    assert 0 < n_groups_held < len(sides)
    assert heldout_sample_ids(table, 0.0) == []
    # the same corpus installed elsewhere is split the same way
    moved = table.set_column(1, "image_path", pa.array([p and p.replace("corpus/", "moved/elsewhere/corpus/") for p in table.column(1).to_pylist()]))
    assert set(heldout_sample_ids(moved, 0.3)) == held


def test_passages_answering_one_prompt_are_split_one_by_one():
    """Text samples that share a prompt (corpus.text_source passages given as answers to it) are different
    texts: they split by sample, not all onto one side (which held out no passage in the default run)."""
    n = 60
    table = pa.table({"sample_id": [f"text-python-topics-{i:05d}" for i in range(n)], "image_path": pa.array([None] * n, pa.string()),
                      "prompt": ["Tell me about a topic from the Python documentation."] * n})
    held = heldout_sample_ids(table, 0.3)
    assert 0 < len(held) < n
    assert set(held) == {s for s in table.column("sample_id").to_pylist() if zlib.crc32(f"sample:{s}".encode()) / 2**32 < 0.3}


def _manifest(tmp_path, table, d=16, tokens_per_sample=12):
    rng = np.random.default_rng(0)
    ids = table.column("sample_id").to_pylist()
    n = len(ids) * tokens_per_sample
    x = rng.normal(size=(n, d)).astype(np.float32)
    shard = pa.table({
        "sample_id": np.repeat(ids, tokens_per_sample).tolist(), "token_index": np.tile(np.arange(tokens_per_sample), len(ids)).astype(np.int32),
        "token_id": np.full(n, 7, np.int32),
        "modality": pa.array(["image" if i % 2 else "text" for i in range(n)]).dictionary_encode().cast(pa.dictionary(pa.int8(), pa.string())),
        "view": np.zeros(n, np.int16), "patch_row": np.zeros(n, np.int16), "patch_col": np.zeros(n, np.int16),
        "activation": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)}, schema=activation_schema(d))
    write_parquet(tmp_path / "shard-00000.parquet", shard)
    write_parquet(tmp_path / "samples.parquet", table)
    manifest = {"shards": [{"path": "shard-00000.parquet", "n_tokens": n}], "d_model": d, "special_token_ids": [0],
                "model": "synthetic", "hook_point": "h"}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "manifest.json"


def test_heldout_json_is_written_and_the_heldout_tokens_are_those_samples(tmp_path):
    table = _samples()
    manifest = _manifest(tmp_path, table)
    opts = {"d_sae": 32, "k": 4, "steps": 5, "batch_size": 64, "warmup_steps": 1, "buffer_tokens": 256,
            "b_dec_init_tokens": 64, "heldout_fraction": 0.3}
    metrics = train_from_manifest(manifest, opts, "cpu", tmp_path / "ck", tmp_path / "out")
    held = json.loads((tmp_path / "out" / "heldout.json").read_text())
    assert held == heldout_sample_ids(table, 0.3) and held == sorted(held) and len(held) > 0
    assert all(len(v) == 1 for v in _sides(table, set(held)).values())
    assert metrics["n_heldout_samples"] == len(held)
    assert metrics["heldout"]["n_tokens"] == 12 * len(held)  # every token of those samples, and no other
