"""Extraction: Parquet schema, resume after a kill, batching, bad images skipped and counted."""

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmsae.extract.run import ExtractConfig, extract
from mmsae.data import Sample, build_corpus
from mmsae.core.shards import iter_activations, read_shard_meta, shard_paths, shard_schema

HOOK = "model.language_model.layers.2"


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
    assert schema.remove_metadata().equals(shard_schema(64, "float32"))
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


def test_dirty_folder_every_file_accounted_for(subject, tmp_path):
    from tests.dirty import make_dirty_folder

    expect = make_dirty_folder(tmp_path / "imgs")
    samples = build_corpus({"source": "folder", "path": str(tmp_path / "imgs"), "prompts": ["Describe it."]})
    m = extract(subject, samples, tmp_path / "out", ExtractConfig(hook_point=HOOK, batch_size=2), "h", progress=False)
    used = {r["image_path"]: r["image_status"] for r in pq.read_table(tmp_path / "out" / "samples.parquet").to_pylist()}
    skipped = {s["image"]: s["reason"] for s in m["skipped"]}
    root = str(tmp_path / "imgs") + "/"
    outcome = {p[len(root):]: v for p, v in used.items()} | {p[len(root):]: "skip: " + r for p, r in skipped.items()}
    assert set(outcome) == set(expect)  # every file: used, converted or skipped, none lost
    for name, want in expect.items():
        assert outcome[name].startswith(want), (name, outcome[name])
    assert m["n_samples"] == len(used) == 9 and m["n_images_skipped"] == 5
    assert m["n_images_converted"] == sum(v.startswith("converted") for v in used.values()) == 4


def test_images_are_opened_one_batch_at_a_time(subject, image_dir, tmp_path, monkeypatch):
    import mmsae.extract.forward as act

    opened, at_first_forward = [], []
    real = act.load_image
    monkeypatch.setattr(act, "load_image", lambda *a, **k: opened.append(1) or real(*a, **k))
    h = subject.model.register_forward_pre_hook(lambda *a: at_first_forward.append(len(opened)) if not at_first_forward else None)
    try:
        extract(subject, _corpus(image_dir), tmp_path, ExtractConfig(hook_point=HOOK, batch_size=1), "h", progress=False)
    finally:
        h.remove()
    assert len(opened) == 9 and at_first_forward[0] <= 2 * 1 + 4  # this batch, the next, and the bad images between


def test_kill_then_config_change_leaves_no_stale_rows(subject, image_dir, tmp_path):
    samples = _corpus(image_dir)
    out = tmp_path / "a"
    cfg = ExtractConfig(hook_point=HOOK, shard_tokens=1)  # one sample per shard
    extract(subject, samples, out, cfg, "old", progress=False)
    # a kill: a samples file of the old config whose shard never landed, and temporary files
    pq.write_table(pq.read_table(out / "samples-00006.parquet"), out / "samples-00009.parquet")
    (out / ".shard-00010.parquet.abc123.parquet").write_bytes(b"partial")
    (out / ".samples-00010.parquet.xyz.parquet").write_bytes(b"partial")
    (out / "manifest.json").unlink()
    m = extract(subject, samples[:3], out, cfg, "new", progress=False)
    table = pq.read_table(out / "samples.parquet")
    shard_ids = set(pq.read_table([str(p) for p in shard_paths(out / "manifest.json")]).column("sample_id").to_pylist())
    used = {s.sample_id for s in samples[:3]} - {s["sample_id"] for s in m["skipped"]}  # blank.png is skipped
    assert m["n_samples"] == table.num_rows == len(used) == 2
    assert set(table.column("sample_id").to_pylist()) == shard_ids == used
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in out.glob("s*-*.parquet")) == sorted(f"{k}-{i:05d}.parquet" for i in range(2) for k in ("samples", "shard"))


def test_resume_counts_converted_images_from_stored_tables(subject, image_dir, tmp_path):
    samples = _corpus(image_dir)
    cfg = ExtractConfig(hook_point=HOOK, shard_tokens=1)
    whole = extract(subject, samples, tmp_path / "whole", cfg, "h", progress=False)
    extract(subject, samples[:6], tmp_path / "a", cfg, "h", progress=False)  # "killed" after 6 samples
    (tmp_path / "a" / "manifest.json").unlink()
    resumed = extract(subject, samples, tmp_path / "a", cfg, "h", progress=False)
    assert whole["n_images_converted"] == resumed["n_images_converted"] == 4
    assert resumed["n_samples"] == whole["n_samples"] and resumed["n_images_skipped"] == whole["n_images_skipped"]


def test_later_stages_take_usable_images_from_the_samples_table(subject, image_dir, tmp_path):
    from mmsae.data import load_image, usable_samples

    extract(subject, _corpus(image_dir), tmp_path, ExtractConfig(hook_point=HOOK), "h", progress=False)
    s = usable_samples(tmp_path / "samples.parquet", ["Caption it."], ["t"], None)
    images = [x for x in s if x.image_path]
    assert len(images) == 5 and all(load_image(x.image_path)[0] is not None for x in images)
    assert {x.image_key for x in images} == {"good.png", "cmyk.jpg", "deep16.png", "palette.png", "alpha.png"}
    assert s[-1].sample_id == "txt-0000" and all(x.prompt == "Caption it." for x in images)
    assert len(usable_samples(tmp_path / "samples.parquet", ["a", "b"], [], 2)) == 4


def test_token_strings_stored_once_as_a_vocabulary(subject, tmp_path):
    extract(subject, [Sample("t", "hello hello hello")], tmp_path, ExtractConfig(hook_point=HOOK), "h", progress=False)
    vocab = pq.read_table(tmp_path / "vocab.parquet")
    row = pq.read_table(tmp_path / "samples.parquet").to_pylist()[0]
    assert vocab.num_rows == len(set(row["input_ids"])) < len(row["input_ids"])
    assert row["tokens"] == subject.tokenizer.batch_decode([[i] for i in row["input_ids"]])
    assert "tokens" not in pq.read_schema(tmp_path / "samples-00000.parquet").names


def test_training_answers_are_marked_assistant(subject, image_dir, tmp_path):
    conv = Sample("c", "What is it?", str(image_dir / "good.png"), "good.png",
                  (("assistant", "Random noise, mostly."), ("user", "Sure?"), ("assistant", "Yes, quite sure.")))
    plain = Sample("p", "Name a colour.", None, None, (("assistant", "Blue"),))
    bare = Sample("q", "Name a colour.")
    m = extract(subject, [conv, plain, bare], tmp_path, ExtractConfig(hook_point=HOOK), "h", progress=False)
    t = _read_sorted(tmp_path / "manifest.json")
    enc = subject.tokenizer
    for sid, answers in (("c", ["Random noise, mostly.", "Yes, quite sure."]), ("p", ["Blue"]), ("q", [])):
        rows = t.filter(pc.equal(t["sample_id"], sid))
        role = rows.column("role").cast("string").to_pylist()
        ids = rows.column("token_id").to_pylist()
        assert [i for i, r in zip(ids, role) if r == "assistant"] == [x for a in answers for x in enc.encode(a, add_special_tokens=False)]
        assert set(role) <= {"user", "assistant"}
    # the answer is part of the sequence, after the image tokens, and the prompt is not marked
    c = t.filter(pc.equal(t["sample_id"], "c"))
    first_answer = c.column("role").cast("string").to_pylist().index("assistant")
    assert c.column("modality").cast("string").to_pylist()[:first_answer].count("image") > 0
    assert m["n_samples"] == 3
