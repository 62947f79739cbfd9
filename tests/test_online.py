"""Online SAE training (sae.source: online) against cached training on the same small real corpus.

The tiny LLaVA-NeXT of conftest (a 64-wide random language model, real tokenizer and image pipeline)
over five scikit-image photos under two prompts and six text prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mmsae.extract.run import ExtractConfig, extract
from mmsae.workflow.config_check import config_errors
from mmsae.data import build_corpus
from mmsae.sae.online import ModelSource, OnlineStream, token_fractions, train_online
from mmsae.sae.run import train_from_manifest
from mmsae.sae.io import load_sae, load_sparsity

HOOK = "model.language_model.layers.2"
# At heldout_fraction 0.3, retina and two of the text prompts are held out (CRC32 of their names).
CORPUS = {"source": "skimage", "names": ["retina", "astronaut", "chelsea", "coffee", "rocket"],
          "prompts": ["Describe this image.", "What stands out?"],
          "text_prompts": ["What is the capital of France?", "Name three red fruits.", "How do planes fly?",
                           "Write a haiku about rain.", "Tell me a fact about octopuses.", "Describe tree bark."]}
OPTS = dict(d_sae=128, k=8, steps=160, batch_size=64, warmup_steps=10, dead_tokens=2000, buffer_tokens=512,
            b_dec_init_tokens=256, heldout_fraction=0.3, heldout_max_tokens=65536, checkpoint_every=1000, seed=0)


def _source(subject, samples):
    return ModelSource(subject, samples, HOOK, batch_size=1, max_image_pixels=None, fractions=None, subsample_seed=0,
                       identity={"test": 1})


def _cached(subject, samples, tmp: Path, shard_tokens: int, opts: dict) -> dict:
    manifest = extract(subject, samples, tmp / "acts", ExtractConfig(hook_point=HOOK, shard_tokens=shard_tokens), "h", progress=False)
    assert manifest["n_images_skipped"] == 0
    return train_from_manifest(tmp / "acts" / "manifest.json", opts, "cpu", tmp / "ckpt-c", tmp / "sae-c")


def test_online_equals_cached_when_shards_hold_one_sample(subject, tmp_path, monkeypatch):
    """With one sample per shard and nothing held out, an epoch's shard order and sample order are the same
    draw and the rows are the same forward passes, so online training is the cached training, bit for bit:
    the shuffle buffer, b_dec initialisation, epochs and special-token exclusion are shared, not re-implemented."""
    samples = build_corpus(CORPUS)
    opts = {**OPTS, "heldout_fraction": 0.0, "steps": 30}
    cached = _cached(subject, samples, tmp_path, shard_tokens=1, opts=opts)
    writes = []
    real_write = pq.write_table
    monkeypatch.setattr(pq, "write_table", lambda table, where, **kw: (writes.append(str(where)), real_write(table, where, **kw)))
    online = train_online(_source(subject, samples), opts, "cpu", tmp_path / "ckpt-o", tmp_path / "sae-o")
    # online writes no activation shard: its only Parquet file is the training log
    assert [Path(w).name.split(".")[1] for w in writes] == ["log"], writes
    assert sorted(p.name for p in (tmp_path / "sae-o").iterdir()) == ["cfg.json", "heldout.json", "log.parquet", "metrics.json",
                                                                       "sae_weights.safetensors", "sparsity.safetensors"]
    assert online["source"] == "online" and cached["source"] == "cache"
    assert online["final_train_fvu"] == cached["final_train_fvu"]
    a, _ = load_sae(tmp_path / "sae-c")
    b, _ = load_sae(tmp_path / "sae-o")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(load_sparsity(tmp_path / "sae-c"), load_sparsity(tmp_path / "sae-o"))  # the same firings
    # more steps than one pass gives: several epochs were read
    assert online["data"]["epochs_started"] > 1
    assert online["data"]["n_tokens"] == json.loads((tmp_path / "acts/manifest.json").read_text())["n_tokens"]


def test_online_and_cached_reach_the_same_heldout_fvu(subject, tmp_path):
    """At token fraction 1, default shard size (several samples per shard) and a held-out split by image:
    the same held-out samples and rows, and held-out FVU within 0.015 (absolute; FVU is ~0.055 here).

    Why 0.015: the two paths differ only in the order rows reach the buffer (a shard's samples move together
    when cached), i.e. in SGD noise. Measured on this corpus and these settings (2026-12-01): cached held-out
    FVU under seeds 0, 1, 2 was 0.0557, 0.0529, 0.0563 (spread 0.0034); online under seeds 0, 1 was 0.0596,
    0.0531 (0.0039 from cached at seed 0). 0.015 is about four times the seed-to-seed spread.
    """
    samples = build_corpus(CORPUS)
    cached = _cached(subject, samples, tmp_path, shard_tokens=1024, opts=OPTS)
    online = train_online(_source(subject, samples), OPTS, "cpu", tmp_path / "ckpt-o", tmp_path / "sae-o")
    held_c = json.loads((tmp_path / "sae-c/heldout.json").read_text())
    held_o = json.loads((tmp_path / "sae-o/heldout.json").read_text())
    assert held_c == held_o and 0 < len(held_o) < len(samples)
    assert any(s.startswith("img-") for s in held_o) and any(s.startswith("txt-") for s in held_o)
    ho_c, ho_o = cached["heldout"], online["heldout"]
    assert ho_o["n_tokens"] == ho_c["n_tokens"] > 0  # the same held-out rows
    assert abs(ho_o["fvu"] - ho_c["fvu"]) < 0.015, (ho_o["fvu"], ho_c["fvu"])
    assert ho_o["fvu"] < 0.2  # trained
    assert online["tokens_trained"] == OPTS["steps"] * OPTS["batch_size"]


def test_heldout_samples_are_never_forwarded_for_training(subject):
    """The training stream forwards only training samples; special tokens never reach a batch."""
    samples = build_corpus(CORPUS)
    held = {s.sample_id for s in samples[:2]} | {samples[-1].sample_id}
    special = subject.special_token_ids
    s = OnlineStream(_source(subject, samples), batch_size=32, seed=0, buffer_tokens=64, heldout_ids=held,
                     exclude_token_ids=special)
    forwarded = []
    real = s._rows

    def spy(batch_samples, train):
        forwarded.extend(x.sample_id for x in batch_samples)
        return real(batch_samples, train)

    s._rows = spy
    it = s.train_batches()
    for _ in range(40):
        x, m = next(it)
        assert x.shape == (32, 64) and x.dtype == torch.float32 and m.dtype == torch.bool
    assert forwarded and not set(forwarded) & held
    it.close()  # its suspended forward loop holds a hook on the model
    # rows of a sample without special tokens: the count of kept rows is the count of non-special tokens
    s2 = OnlineStream(_source(subject, samples[-1:]), 8, 0, 16, [], special)
    x, _ = s2._take(s2._rows(samples[-1:], train=False), 10_000)
    ids = subject.tokenizer(samples[-1].prompt)["input_ids"]
    assert 0 < len(x) < s2.seen.forwarded  # the chat template's special tokens were left out
    assert len(ids) <= s2.seen.forwarded


def test_token_fraction_subsamples_deterministically(subject):
    samples = build_corpus({**CORPUS, "names": ["astronaut"], "text_prompts": []})
    src = _source(subject, samples)
    full = OnlineStream(src, 8, 0, 16, [], None)
    x_full, _ = full._take(full._rows(samples, train=False), 100_000)
    src.fractions = token_fractions(0.25)
    a = OnlineStream(src, 8, 0, 16, [], None)
    xa, _ = a._take(a._rows(samples, train=False), 100_000)
    b = OnlineStream(src, 8, 0, 16, [], None)
    xb, _ = b._take(b._rows(samples, train=False), 100_000)
    assert np.array_equal(xa, xb)
    assert 0.1 < len(xa) / len(x_full) < 0.4
    assert token_fractions(1.0) is None and token_fractions({"image": 1, "text": 1}) is None
    with pytest.raises(ValueError, match="token_fraction"):
        token_fractions({"image": 1.5})


def test_online_with_several_gpus_is_refused_at_load():
    cfg = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())
    cfg["sae"] |= {"source": "online", "gpus": 2}
    assert any("sae.source='online'" in e and "sae.gpus" in e for e in config_errors(cfg))
    cfg["sae"]["gpus"] = 1
    assert not any("sae.source" in e for e in config_errors(cfg))
