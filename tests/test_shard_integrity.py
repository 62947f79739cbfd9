"""Damaged shards (reliability issue #33, item 2): a truncated activation shard is found, named,
and redone by a rerun of extraction; a truncated code shard is named by its readers."""

import json
import shutil

import pytest
import pyarrow.parquet as pq

from mmsae.codes.rows import encode_shards
from mmsae.codes.schema import scan_codes
from mmsae.core.shards import ShardError, iter_activations, merge_manifests, shard_paths
from mmsae.data import build_corpus
from mmsae.extract.run import ExtractConfig, extract
from mmsae.sae.data import ActivationStream
from mmsae.sae.model import TopKSAE
from mmsae.sae.run import train_from_manifest

HOOK = "model.language_model.layers.2"


@pytest.fixture(scope="module")
def extracted(subject, image_dir, tmp_path_factory):
    """A finished extraction (3 shards) and what the rule needs to run it again."""
    samples = build_corpus({"source": "folder", "path": str(image_dir), "prompts": ["Describe it."],
                            "text_prompts": ["What is 2+2?", "Name a colour."]})
    cfg = ExtractConfig(hook_point=HOOK, shard_tokens=150)
    out = tmp_path_factory.mktemp("acts") / "part-0"
    manifest = extract(subject, samples, out, cfg, "h", progress=False)
    assert manifest["n_shards"] >= 3
    return subject, samples, cfg, out, manifest


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "manifest.json"}


@pytest.mark.parametrize("manifest_kept", [False, True], ids=["manifest-removed-as-snakemake-does", "manifest-kept"])
def test_rerun_of_extraction_redoes_exactly_a_truncated_unit(extracted, tmp_path, caplog, manifest_kept):
    subject, samples, cfg, original, manifest = extracted
    out = _copy(original, tmp_path / "part-0")
    shard = out / manifest["shards"][1]["path"]
    _truncate(shard)
    if not manifest_kept:  # snakemake --forcerun extract deletes the rule's outputs first
        (out / "manifest.json").unlink()
        (out / "samples.parquet").unlink()
    caplog.set_level("INFO")
    again = extract(subject, samples, out, cfg, "h", progress=False)
    assert str(shard) in caplog.text  # the damaged unit is named
    redone = pq.read_table(original / manifest["shards"][1]["path"].replace("shard-", "samples-")).num_rows
    assert f"{len(samples)} samples, {manifest['n_samples'] - redone} already extracted" in caplog.text
    assert [r.message for r in caplog.records if r.message.startswith("wrote shard")] == [
        f"wrote shard 00001: {manifest['shards'][1]['n_tokens']} tokens, {redone} samples"]
    assert again == manifest
    assert _files(out) == _files(original)  # byte for byte, in the same shard index


def test_a_shard_with_other_bytes_than_its_samples_file_recorded_is_redone(extracted, tmp_path, caplog):
    """A shard replaced by a readable file of another size (its footer intact) is caught too."""
    subject, samples, cfg, original, manifest = extracted
    out = _copy(original, tmp_path / "part-0")
    name = manifest["shards"][0]["path"]
    t = pq.read_table(out / name)
    pq.write_table(t.slice(0, t.num_rows - 1), out / name)  # readable, one row short
    (out / "manifest.json").unlink()
    assert extract(subject, samples, out, cfg, "h", progress=False) == manifest
    assert "rows, but its samples file recorded" in caplog.text


def test_readers_name_a_truncated_activation_shard(extracted, tmp_path):
    _, _, _, original, manifest = extracted
    out = _copy(original, tmp_path / "part-0")
    shard = out / manifest["shards"][2]["path"]
    _truncate(shard, 0.9)
    with pytest.raises(ShardError, match=str(shard)) as e:
        shard_paths(out / "manifest.json")
    assert "bytes, but its manifest recorded" in str(e.value) and "manifest.json" in str(e.value)
    paths = shard_paths(out / "manifest.json", check=False)
    with pytest.raises(ShardError, match=str(shard)):  # the stream names it too, given the paths alone
        for _ in iter_activations(paths):
            pass
    stream = ActivationStream(paths, batch_size=32, seed=0, buffer_tokens=64, heldout_ids=[])
    with pytest.raises(ShardError, match=str(shard)):
        next(iter(stream.train_batches()))
    opts = {"d_sae": 32, "k": 4, "steps": 2, "batch_size": 32, "warmup_steps": 1, "buffer_tokens": 64,
            "b_dec_init_tokens": 32, "heldout_fraction": 0.3}
    with pytest.raises(ShardError, match=str(shard)):  # the train_sae rule's entry
        train_from_manifest(out / "manifest.json", opts, "cpu", tmp_path / "ck", tmp_path / "sae")
    # merging the parts names it as well
    with pytest.raises(ShardError, match=str(shard)):
        merge_manifests([out / "manifest.json"], tmp_path / "manifest.json")


def test_a_truncated_code_shard_is_named(extracted, tmp_path):
    _, _, _, original, manifest = extracted
    sae = TopKSAE(64, 32, k=4, seed=0)
    codes = encode_shards(sae, shard_paths(original / "manifest.json"), tmp_path / "codes", progress=False)
    assert all(e["bytes"] == (tmp_path / "codes" / e["path"]).stat().st_size for e in codes["shards"])
    shard = tmp_path / "codes" / codes["shards"][1]["path"]
    _truncate(shard)
    with pytest.raises(ShardError, match=str(shard)):
        shard_paths(tmp_path / "codes" / "manifest.json")
    with pytest.raises(ShardError, match=str(shard)):
        scan_codes(shard_paths(tmp_path / "codes" / "manifest.json", check=False))
    _truncate(original_copy := _copy(original, tmp_path / "acts") / manifest["shards"][0]["path"])
    with pytest.raises(ShardError, match=str(original_copy)):  # encoding names a damaged activation shard
        encode_shards(sae, [original_copy], tmp_path / "codes2", progress=False)
