"""Paper-scale extraction (#18): deterministic token subsample, bfloat16 storage, float16 clamps, disk check."""


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmsae.extract import disk
from mmsae.extract.run import ExtractConfig, extract
from mmsae.data import Sample, build_corpus
from mmsae.models import image_token_coordinates, load_subject_model, resolve_hook_point
from mmsae.sae import TopKSAE
from mmsae.sae.data import ActivationStream
from mmsae.codes.rows import encode_shards
from mmsae.core.shards import decode_activations, iter_activations, merge_manifests, shard_paths
from mmsae.extract.storage import to_storage
from mmsae.extract.subsample import token_keep_mask

HOOK = "model.language_model.layers.2"


@pytest.fixture(scope="module")
def corpus(image_dir):
    """Image samples, text samples and a training conversation with answers."""
    samples = build_corpus({"source": "folder", "path": str(image_dir), "prompts": ["Describe it."],
                            "text_prompts": ["What is 2+2?", "Name a colour."]})
    conv = Sample("conv", "What is it?", str(image_dir / "good.png"), "good.png",
                  (("assistant", "Random noise, mostly grey and speckled."), ("user", "Sure?"), ("assistant", "Yes.")))
    return samples + [conv]


def _rows(out):
    """{(sample_id, token_index): activation row} of every shard of a (merged) manifest."""
    t = pq.read_table([str(p) for p in shard_paths(out)], columns=["sample_id", "token_index"])
    x = np.concatenate([x for x, _ in iter_activations(shard_paths(out), 4096, ())]) if t.num_rows else np.zeros((0, 64))
    return dict(zip(zip(t.column("sample_id").to_pylist(), t.column("token_index").to_pylist()), map(tuple, x)))


def test_keep_mask_depends_only_on_seed_sample_and_position():
    n = 20000
    mod, role = np.array(["image"] * n), np.array(["user"] * n)
    fr = {"image": 0.25, "text": 1.0, "answer": 1.0}
    full = token_keep_mask("img-a", np.arange(n), mod, role, fr, 7)
    assert abs(full.mean() - 0.25) < 0.02
    tail = token_keep_mask("img-a", np.arange(5000, n), mod[5000:], role[5000:], fr, 7)  # same positions, alone
    np.testing.assert_array_equal(tail, full[5000:])
    assert (token_keep_mask("img-b", np.arange(n), mod, role, fr, 7) != full).mean() > 0.2  # another sample
    assert (token_keep_mask("img-a", np.arange(n), mod, role, fr, 8) != full).mean() > 0.2  # another seed
    bigger = token_keep_mask("img-a", np.arange(n), mod, role, {**fr, "image": 0.5}, 7)
    assert not (full & ~bigger).any()  # raising a fraction only adds rows


def test_per_role_fractions():
    n = 30000
    mod = np.array(["image", "text", "text"] * (n // 3))
    role = np.array(["user", "user", "assistant"] * (n // 3))
    keep = token_keep_mask("s", np.arange(n), mod, role, {"image": 0.0, "text": 0.5, "answer": 1.0}, 0)
    assert not keep[mod == "image"].any()
    assert keep[role == "assistant"].all()
    assert abs(keep[(mod == "text") & (role == "user")].mean() - 0.5) < 0.03


def test_subsample_same_rows_after_kill_and_resume_and_across_parts(subject, corpus, tmp_path):
    cfg = ExtractConfig(hook_point=HOOK, shard_tokens=1, token_fraction=0.3, seed=3)
    whole = extract(subject, corpus, tmp_path / "whole", cfg, "h", progress=False)
    rows = _rows(tmp_path / "whole" / "manifest.json")
    assert 0 < whole["n_tokens"] == len(rows) < 0.5 * sum(whole["tokens_seen"].values())
    # kill after 4 samples, resume
    extract(subject, corpus[:4], tmp_path / "a", cfg, "h", progress=False)
    (tmp_path / "a" / "manifest.json").unlink()
    resumed = extract(subject, corpus, tmp_path / "a", cfg, "h", progress=False)
    assert _rows(tmp_path / "a" / "manifest.json") == rows
    assert resumed["tokens_seen"] == whole["tokens_seen"] and resumed["tokens_written"] == whole["tokens_written"]
    # three parts (every third sample each, in another batch size), merged
    parts = []
    for i in range(3):
        m = extract(subject, corpus[i::3], tmp_path / "parts" / f"part-{i}", ExtractConfig(**{**cfg.__dict__, "batch_size": 2}),
                    f"p{i}", progress=False)
        parts.append(tmp_path / "parts" / f"part-{i}" / "manifest.json")
    merged = merge_manifests(parts, tmp_path / "parts" / "manifest.json")
    assert set(_rows(tmp_path / "parts" / "manifest.json")) == set(rows)
    assert merged["tokens_written"] == whole["tokens_written"] and merged["n_tokens"] == whole["n_tokens"]
    assert m["token_fraction"] == {"image": 0.3, "text": 0.3, "answer": 0.3} and m["seed"] == 3


def test_subsample_drops_special_tokens_and_counts_roles(subject, corpus, tmp_path):
    special = {i for i in subject.tokenizer.all_special_ids if i != subject.image_token_id}
    full = extract(subject, corpus, tmp_path / "full", ExtractConfig(hook_point=HOOK), "h", progress=False)
    t = pq.read_table([str(p) for p in shard_paths(tmp_path / "full" / "manifest.json")], columns=["token_id"])
    assert special & set(t.column(0).to_pylist())  # stored at fraction 1, as before
    assert full["tokens_written"] == full["tokens_seen"] and full["n_special_dropped"] == 0
    fr = {"image": 0.2, "text": 1.0, "answer": 1.0}
    m = extract(subject, corpus, tmp_path / "sub", ExtractConfig(hook_point=HOOK, token_fraction=fr), "h", progress=False)
    t = pq.read_table([str(p) for p in shard_paths(tmp_path / "sub" / "manifest.json")])
    assert not special & set(t.column("token_id").to_pylist())
    assert m["n_special_dropped"] > 0
    assert m["tokens_seen"] == full["tokens_seen"] and m["tokens_seen"]["answer"] > 0
    # every user text and answer token but the special ones; about a fifth of the image tokens
    assert m["tokens_written"]["answer"] == m["tokens_seen"]["answer"]
    assert m["tokens_written"]["text"] == m["tokens_seen"]["text"] - m["n_special_dropped"]
    assert 0.1 < m["tokens_written"]["image"] / m["tokens_seen"]["image"] < 0.3
    assert m["n_tokens"] == sum(m["tokens_written"].values()) == t.num_rows
    assert m["n_image_tokens"] == m["tokens_written"]["image"]


def test_bfloat16_round_trip_bit_exact_through_extraction_and_sae_reader(tiny_llava_dir, image_dir, tmp_path):
    bf = load_subject_model(tiny_llava_dir, dtype="bfloat16")
    samples = build_corpus({"source": "folder", "path": str(image_dir), "prompts": ["Describe it."],
                            "text_prompts": ["Name a colour."], "max_images": 2})
    seen = []
    h = resolve_hook_point(bf.model, HOOK).register_forward_hook(lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o)[0].clone()))
    try:
        m = extract(bf, samples, tmp_path, ExtractConfig(hook_point=HOOK, dtype="bfloat16", stop_at_hook=False), "h",
                    progress=False)
    finally:
        h.remove()
    shards = shard_paths(tmp_path / "manifest.json")
    field = pq.read_schema(shards[0]).field("activation")
    assert field.type.value_type == pa.uint16() and field.metadata[b"mmsae_dtype"] == b"bfloat16" and m["dtype"] == "bfloat16"
    rg = pq.ParquetFile(shards[0]).metadata.row_group(0)
    col = next(rg.column(i) for i in range(rg.num_columns) if rg.column(i).path_in_schema == "activation.list.element")
    assert "BYTE_STREAM_SPLIT" in col.encodings and not col.has_dictionary_page  # the smaller encoding (bench/extract_disk.py)
    original = torch.cat(seen)  # batch size 1, no padding: each forward's tokens in order
    assert original.dtype == torch.bfloat16
    got = np.concatenate([x for x, _ in iter_activations(shards, 7, ())])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), original.float().numpy().view(np.uint32))  # bit-exact
    # and the SAE's training reader yields those very rows
    ids = [s.sample_id for s in samples]
    x, _ = ActivationStream(shards, batch_size=4, seed=0, buffer_tokens=64, heldout_ids=ids).heldout(10**6)  # every row, in order
    np.testing.assert_array_equal(x.numpy().view(np.uint32), original.float().numpy().view(np.uint32))
    # and encoding the shards gives the codes of the original activations
    sae = TopKSAE(64, 32, 4, seed=1)
    codes = encode_shards(sae, shards, tmp_path / "codes", progress=False)
    got = pq.read_table(tmp_path / "codes" / codes["shards"][0]["path"])
    with torch.no_grad():
        vals, _ = sae.encode(original.float())
    assert codes["n_tokens"] == len(original)
    want = sorted(float(v) for v in vals[vals > 0])
    assert sorted(got.column("activation").to_pylist()) == pytest.approx(want, rel=1e-6)


def test_bfloat16_decode_of_extreme_values():
    t = torch.tensor([[0.0, -0.0, 1e-40, -3.0e38, float("inf"), 1.5, -2.25e-5, 7.0]], dtype=torch.bfloat16)
    raw, _, _ = to_storage(t, "bfloat16")
    col = pa.FixedSizeListArray.from_arrays(pa.array(raw.reshape(-1), pa.uint16()), 8)
    np.testing.assert_array_equal(decode_activations(col, "bfloat16").view(np.uint32), t.float().numpy().view(np.uint32))


@pytest.mark.parametrize("dtype,arrow", [("float32", pa.float32()), ("float16", pa.float16()), ("bfloat16", pa.uint16())])
def test_decoded_activations_are_writable_for_torch(dtype, arrow):
    """A float32 column reads zero-copy as a read-only buffer; torch.from_numpy warns on it (undefined
    behaviour if written), so every storage type decodes to a writable array."""
    raw = np.arange(8, dtype={"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype])
    table = pa.table({"activation": pa.FixedSizeListArray.from_arrays(pa.array(raw, arrow), 4)})
    x = decode_activations(table.column("activation"), dtype)
    assert x.shape == (2, 4) and x.dtype == np.float32 and x.flags.writeable


def test_float16_overflow_clamped_and_counted(subject, tmp_path):
    x = torch.tensor([[1e5, -7e4, 65504.0, 1e-9, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0, 1e-10]])
    y, over, under = to_storage(x, "float16")
    assert over.tolist() == [2, 0] and under.tolist() == [1, 1]
    assert y[0, :3].tolist() == [65504.0, -65504.0, 65504.0] and np.isfinite(y).all()
    # through extraction: a hook that scales the residual stream makes some values overflow float16
    layer = resolve_hook_point(subject.model, HOOK)
    h = layer.register_forward_hook(lambda m, i, o: ((o[0] if isinstance(o, tuple) else o) * 1e6,) + tuple(o[1:])
                                    if isinstance(o, tuple) else o * 1e6)
    try:
        m = extract(subject, [Sample("t", "hello there")], tmp_path / "16", ExtractConfig(hook_point=HOOK, dtype="float16"), "h",
                    progress=False)
        extract(subject, [Sample("t", "hello there")], tmp_path / "32", ExtractConfig(hook_point=HOOK), "h", progress=False)
    finally:
        h.remove()
    stored = np.concatenate([x for x, _ in iter_activations(shard_paths(tmp_path / "16" / "manifest.json"), 64, ())])
    exact = np.concatenate([x for x, _ in iter_activations(shard_paths(tmp_path / "32" / "manifest.json"), 64, ())])
    assert np.isfinite(stored).all() and np.isfinite(exact).all()
    assert m["n_float16_overflow"] == int((np.abs(exact) >= 65520).sum()) > 0  # what float16 rounds to inf
    np.testing.assert_array_equal(stored[np.abs(exact) >= 65520], np.sign(exact[np.abs(exact) >= 65520]) * 65504)
    assert m["shards"][0]["n_float16_overflow"] == m["n_float16_overflow"]
    assert "n_float16_underflow" in m["shards"][0]


def test_disk_projection_refused_naming_both_figures_and_override(subject, corpus, tmp_path, monkeypatch):
    good = {"good.png", "cmyk.jpg", "deep16.png", "palette.png", "alpha.png", None}  # no image skipped
    corpus = [s for s in corpus if s.image_key in good]
    cfg = ExtractConfig(hook_point=HOOK)
    monkeypatch.setattr(disk, "free_bytes", lambda path: 1000)
    with pytest.raises(disk.DiskSpaceError) as e:
        extract(subject, corpus, tmp_path / "a", cfg, "h", progress=False)
    msg = str(e.value)
    assert "1000 bytes" in msg and "free" in msg and "extract.check_disk" in msg
    projected = int(msg.split("(")[1].split(" bytes")[0])
    assert projected > 1000
    assert not list((tmp_path / "a").glob("shard-*"))  # refused before any work
    m = extract(subject, corpus, tmp_path / "a", cfg, "h", progress=False, check_disk=False)
    assert m["projected_bytes"] == projected
    # the projection bounds what was written from above (raw activation bytes, which zstd shrinks; the largest
    # anyres grid, which unpadding trims), by a bounded factor
    assert m["actual_bytes"] == sum(p.stat().st_size for p in (tmp_path / "a").iterdir() if p.name != "manifest.json")
    assert 0.3 < m["actual_bytes"] / m["projected_bytes"] <= 1, (m["actual_bytes"], m["projected_bytes"])
    # parts that may run at once are checked together
    monkeypatch.setattr(disk, "free_bytes", lambda path: int(projected * 1.5))
    extract(subject, corpus, tmp_path / "b", cfg, "h", progress=False)
    with pytest.raises(disk.DiskSpaceError):
        extract(subject, corpus, tmp_path / "c", cfg, "h", progress=False, disk_parts=2)
    merged = merge_manifests([tmp_path / "a" / "manifest.json", tmp_path / "b" / "manifest.json"], tmp_path / "manifest.json")
    assert merged["projected_bytes"] == 2 * projected


def test_projection_arithmetic_and_paper_config():
    # per-role fractions apply to their tokens; text-only samples have no image tokens
    full = disk.project_extraction_bytes(10, 5, 100, {"text": 20, "answer": 10}, 64, "float32", 1.0)
    per = 64 * 4 + disk.OVERHEAD_BYTES_PER_TOKEN
    seen = 10 * 100 + 15 * 30
    assert full == seen * (per + disk.SEEN_BYTES_PER_TOKEN)
    part = disk.project_extraction_bytes(10, 5, 100, {"text": 20, "answer": 10}, 64, "bfloat16", {"image": 0.5, "answer": 0})
    assert part == round((500 + 15 * 20) * (64 * 2 + disk.OVERHEAD_BYTES_PER_TOKEN) + seen * disk.SEEN_BYTES_PER_TOKEN)
    # the paper config: 779k conversations x ~2,900 tokens at d_model 4096, 2 bytes: ~18.5 TB, ~1.9 TB at 0.1
    assert 17e12 < disk.project_extraction_bytes(779_000, 0, 2_600, 300, 4096, "float16", 1.0) < 20e12
    assert disk.project_extraction_bytes(779_000, 0, 2_600, 300, 4096, "float16", 0.1) < 2e12


def test_max_image_tokens_bounds_the_model_layout(subject):
    most = disk.max_image_tokens(subject.model.config)
    pins = subject.model.config.image_grid_pinpoints
    sizes = torch.tensor([[h, w] for h, w in pins] + [[30, 500], [500, 30], [56, 56]])
    counts = [len(c) for c in image_token_coordinates(subject.model, sizes)]
    assert most == max(counts)  # reached by a pinpoint-shaped image
    assert all(c <= most for c in counts)


def test_schema_and_rule_carry_the_keys():
    import yaml

    schema = yaml.safe_load(open("config/schema.yaml"))["properties"]["extract"]["properties"]
    assert schema["token_fraction"]["default"] == 1.0 and schema["seed"]["default"] == 0 and schema["check_disk"]["default"] is True
    assert "bfloat16" in schema["dtype"]["enum"]
    rule = open("rules/extract.smk").read()
    assert '"token_fraction", "seed"' in rule and "check_disk" not in rule
    paper = yaml.safe_load(open("config/llava-next-8b.yaml"))
    assert paper["extract"]["token_fraction"] == 0.1


def test_samples_without_a_kept_token_are_done_on_resume(subject, tmp_path, caplog):
    cfg = ExtractConfig(hook_point=HOOK, token_fraction={"text": 0.0, "answer": 0.0})
    samples = [Sample("a", "hello"), Sample("b", "Name a colour.")]
    m = extract(subject, samples, tmp_path, cfg, "h", progress=False)
    assert m["n_tokens"] == 0 and m["n_samples"] == 2 and m["tokens_seen"]["text"] > 0
    (tmp_path / "manifest.json").unlink()
    caplog.set_level("INFO")
    again = extract(subject, samples, tmp_path, cfg, "h", progress=False)
    assert "2 already extracted" in caplog.text and again["n_samples"] == 2
