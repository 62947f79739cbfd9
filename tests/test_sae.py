"""SAE math (Gao et al. 2024), SAELens-layout round trip, streaming and resume."""

import dataclasses
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from mmsae.core.shards import activation_schema
from mmsae.core.io import write_parquet
from mmsae.sae import TopKSAE, fvu, load_sae, save_sae
from mmsae.sae.data import ActivationStream, member_of
from mmsae.sae.trainer import TrainConfig, evaluate, train


def test_exactly_k_nonzero_per_row():
    sae = TopKSAE(16, 64, k=5, seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive, so TopK keeps exactly k
    z = sae.encode_dense(torch.randn(32, 16))
    assert ((z != 0).sum(1) == 5).all()
    # and never more than k when many are negative
    sae.b_enc.data.fill_(-0.5)
    assert ((sae.encode_dense(torch.randn(32, 16)) != 0).sum(1) <= 5).all()


def test_init_matches_paper_reference_trainer():
    """The paper's released trainer (EvolvingLMMs-Lab/multimodal-sae train/sae/sae/sae.py, as sparsify):
    encoder = nn.Linear's default init, b_enc = 0, W_dec = encoder rows scaled to unit norm. The old
    init (W_enc = W_dec^T, unit-norm encoder) trained ~5% worse FVU at equal steps."""
    torch.manual_seed(7)
    lin = torch.nn.Linear(48, 96)
    sae = TopKSAE(48, 96, k=4, seed=7)
    ref_dec = lin.weight.data / (lin.weight.data.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    assert torch.equal(sae.W_enc.detach().T, lin.weight.data)
    torch.testing.assert_close(sae.W_dec.detach(), ref_dec, rtol=0, atol=1e-7)
    assert (sae.b_enc == 0).all() and (sae.b_dec == 0).all()
    assert sae.W_enc.norm(dim=0).mean().item() == pytest.approx(3 ** -0.5, rel=0.05)  # not unit norm


def test_decode_matches_dense_matmul():
    sae = TopKSAE(16, 64, k=5, seed=2)
    x = torch.randn(8, 16)
    out = sae(x)
    dense = sae.encode_dense(x)
    torch.testing.assert_close(out.x_hat, dense @ sae.W_dec + sae.b_dec)


def test_fvu_definition():
    x = torch.randn(100, 8)
    assert fvu(x, x).item() == 0.0
    mean = x.mean(0, keepdim=True).expand_as(x)
    assert fvu(x, mean).item() == pytest.approx(1.0, abs=1e-6)
    x_hat = x + 0.1 * torch.randn_like(x)
    expect = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu(x, x_hat).item() == pytest.approx(expect.item(), rel=1e-6)


def test_decoder_norm_kept_and_parallel_grad_removed():
    sae = TopKSAE(16, 64, k=4, seed=3)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(64, 16)
    for _ in range(5):
        out = sae(x)
        fvu(x, out.x_hat).backward()
        sae.remove_parallel_grads()
        parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
        assert parallel.abs().max().item() < 1e-6
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder()
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_auxk_gradient_reaches_dead_latents():
    sae = TopKSAE(16, 64, k=4, seed=4)
    x = torch.randn(32, 16)
    out = sae(x)
    used = torch.zeros(64, dtype=torch.bool)
    used[out.top_idx.flatten()] = True
    dead = ~used
    assert dead.any()
    main = fvu(x, out.x_hat)
    main.backward(retain_graph=True)
    assert sae.W_enc_T.grad.T[:, dead].abs().sum() == 0  # the main loss never reaches them
    sae.zero_grad()
    sae.auxk_loss(x, out, dead, k_aux=8).backward()
    g = sae.W_enc_T.grad.T[:, dead].abs().sum(0)
    assert (g > 0).sum() >= 8 or (g > 0).all()
    assert sae.W_enc_T.grad.T[:, used].abs().sum() == 0  # and only dead latents get AuxK gradient


def test_b_dec_geometric_median_resists_outliers():
    sae = TopKSAE(4, 8, k=2)
    data = torch.cat([torch.zeros(99, 4), torch.full((1, 4), 1000.0)])
    sae.init_b_dec(data, "geometric_median")
    assert sae.b_dec.abs().max().item() < 1.0
    sae.init_b_dec(data, "mean")
    assert sae.b_dec[0].item() == pytest.approx(10.0)


def test_saelens_layout_round_trip(tmp_path):
    sae = TopKSAE(16, 64, k=5, seed=5)
    save_sae(sae, tmp_path, model_name="m", hook_point="model.language_model.layers.1")
    assert {p.name for p in tmp_path.iterdir()} == {"cfg.json", "sae_weights.safetensors"}
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert t["W_enc"].shape == (16, 64) and t["W_dec"].shape == (64, 16)
    assert t["b_enc"].shape == (64,) and t["b_dec"].shape == (16,)
    back, cfg = load_sae(tmp_path)
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 16 and cfg["d_sae"] == 64 and cfg["k"] == 5
    x = torch.randn(4, 16)
    torch.testing.assert_close(back(x).x_hat, sae(x).x_hat)


def _shards(tmp_path, n_shards=3, n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(32, d)).astype(np.float32)
    paths = []
    for s in range(n_shards):
        codes = (rng.random((n, 32)) < 0.1) * rng.random((n, 32))
        x = (codes @ basis + 0.01 * rng.normal(size=(n, d))).astype(np.float32)  # rows unique
        table = pa.table(
            {
                "sample_id": [f"s{s}-{i // 10}" for i in range(n)],
                "token_index": np.arange(n, dtype=np.int32) % 10,
                "token_id": (np.arange(n) % 10).astype(np.int32),
                "modality": pa.array(["image" if i % 3 else "text" for i in range(n)]).dictionary_encode().cast(pa.dictionary(pa.int8(), pa.string())),
                "view": np.zeros(n, np.int16),
                "patch_row": np.zeros(n, np.int16),
                "patch_col": np.zeros(n, np.int16),
                "activation": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d),
            },
            schema=activation_schema(d),
        )
        write_parquet(tmp_path / f"shard-{s:05d}.parquet", table, row_group_size=64)
        paths.append(tmp_path / f"shard-{s:05d}.parquet")
    return paths


HELD = [f"s{s}-{j}" for s in range(3) for j in range(0, 30, 5)]  # every 5th sample of _shards


def test_stream_is_deterministic_bounded_and_splits_by_sample(tmp_path):
    paths = _shards(tmp_path)
    s = ActivationStream(paths, batch_size=32, seed=7, buffer_tokens=128, heldout_ids=HELD, exclude_token_ids=[0], read_rows=50)
    a = [b[0] for _, b in zip(range(40), s.train_batches())]
    b = [b[0] for _, b in zip(range(40), s.train_batches())]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(x.shape == (32, 16) for x in a)
    ho, _ = s.heldout(65536)
    train_rows = {tuple(r.tolist()) for x in a for r in x}
    assert ho.shape[0] > 0 and not any(tuple(r.tolist()) in train_rows for r in ho)


def test_training_reduces_fvu_and_resume_matches(tmp_path):
    paths = _shards(tmp_path)
    stream = ActivationStream(paths, batch_size=64, seed=0, buffer_tokens=256, heldout_ids=HELD)
    cfg = TrainConfig(d_sae=64, k=4, steps=60, batch_size=64, warmup_steps=5, checkpoint_every=10, dead_tokens=500, b_dec_init_tokens=200)
    full, rows, fires = train(stream, 16, cfg, tmp_path / "a", progress=False)
    assert rows[-1]["fvu"] < 0.6 * max(r["fvu"] for r in rows[:5])  # training reduces FVU
    assert {"l0_image", "l0_text", "dead_fraction_image", "dead_fraction_text", "fvu_image", "fvu_text"} <= set(rows[-1])
    assert rows[-1]["l0_image"] <= 4 and 0 <= rows[-1]["dead_fraction_text"] <= 1
    assert not (tmp_path / "a" / "checkpoint.pt").exists()  # removed once complete
    part, _, _ = train(stream, 16, cfg, tmp_path / "b", progress=False, stop_after=30)  # a "killed" run
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 30
    for name, p in part.state_dict().items():  # the checkpoint holds exactly the state at the kill
        assert torch.equal(state["sae"][name], p)
    t0 = time.perf_counter()
    resumed, rows_b, fires_b = train(stream, 16, cfg, tmp_path / "b", progress=False)
    wall = time.perf_counter() - t0
    # the time of the killed part is carried over: the final elapsed_s is the sum of both parts
    assert rows_b[29]["elapsed_s"] <= state["train_seconds"] < rows_b[-1]["elapsed_s"] <= state["train_seconds"] + wall
    assert len(rows_b) == 60 and [r["step"] for r in rows_b] == list(range(60))
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name  # bit-identical on CPU
    assert [r["fvu"] for r in rows] == [r["fvu"] for r in rows_b]
    assert torch.equal(fires, fires_b) and int(state["fire_counts"].sum()) < int(fires.sum())  # counts carried over the kill
    x, m = stream.heldout(65536)
    ev = evaluate(resumed, x, m)
    assert ev["l0"] <= 4 and 0 <= ev["fvu"] < 1 and ev["n_image_tokens"] + ev["n_text_tokens"] == len(x)
    # every latent active on some token is active on an image or a text token
    assert ev["never_active_fraction"] <= min(ev["never_active_fraction_image"], ev["never_active_fraction_text"])


def test_checkpoint_of_other_data_is_not_resumed(tmp_path):
    cfg = TrainConfig(d_sae=32, k=4, steps=20, batch_size=32, warmup_steps=2, checkpoint_every=5, b_dec_init_tokens=64)
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    s1 = ActivationStream(_shards(tmp_path / "d1", seed=1), batch_size=32, seed=0, buffer_tokens=128, heldout_ids=())
    train(s1, 16, cfg, tmp_path / "ck", progress=False, stop_after=10)
    s2 = ActivationStream(_shards(tmp_path / "d2", seed=2, n=200), batch_size=32, seed=0, buffer_tokens=128, heldout_ids=())
    _, rows, _ = train(s2, 16, cfg, tmp_path / "ck", progress=False)
    assert rows[0]["step"] == 0  # started afresh


def test_resume_is_bit_identical_with_another_thread_count_and_rng_use(tmp_path):
    """The checkpointed run's CPU thread count and random states are restored, so neither a resumed
    process with another thread count nor one whose global generators were used meanwhile drifts."""
    paths = _shards(tmp_path, n=600, d=32)
    stream = ActivationStream(paths, batch_size=128, seed=0, buffer_tokens=512, heldout_ids=())
    cfg = TrainConfig(d_sae=256, k=8, steps=24, batch_size=128, warmup_steps=3, checkpoint_every=100, dead_tokens=600,
                      b_dec_init_tokens=256)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full, _, _ = train(stream, 32, cfg, tmp_path / "a", progress=False)
        train(stream, 32, cfg, tmp_path / "b", progress=False, stop_after=12)
        torch.set_num_threads(1)
        torch.rand(5), np.random.rand(3), random.random()  # the new process's generators differ
        resumed, _, _ = train(stream, 32, cfg, tmp_path / "b", progress=False)
        assert torch.get_num_threads() == 1  # the caller's count is back
    finally:
        torch.set_num_threads(threads)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_train_config_defaults_are_the_schema_defaults():
    """Defaults live in config/schema.yaml; TrainConfig mirrors them and has a field for every key."""
    schema = yaml.safe_load((Path(__file__).parents[1] / "config" / "schema.yaml").read_text())
    keys = {k: v["default"] for k, v in schema["properties"]["sae"]["properties"].items() if k not in ("name", "gpus", "source")}
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name != "device"}
    assert fields == keys


def test_train_step_follows_config():
    """The one step train() and bench/sae_throughput.py share honours aux_coef and grad_clip
    (the bench's hand copy always ran AuxK and clipping)."""
    from mmsae.sae.trainer import make_optimizer, train_step

    x = torch.randn(64, 16)
    dead = torch.ones(64, dtype=torch.bool)  # every latent dead: AuxK would touch all of them
    for aux_coef, clip in ((0.0, 0.0), (1 / 32, 1e-3)):
        sae = TopKSAE(16, 64, k=4, seed=0)
        cfg = TrainConfig(d_sae=64, k=4, aux_coef=aux_coef, grad_clip=clip, k_aux=8)
        res = train_step(sae, make_optimizer(sae, cfg), x, dead, cfg)
        grads = torch.cat([p.grad.flatten() for p in sae.parameters()])
        selected = torch.zeros(64, dtype=torch.bool)
        selected[res["out"].top_idx.flatten()] = True
        if aux_coef == 0:
            assert res["aux_loss"].item() == 0
            assert sae.W_enc_T.grad.T[:, ~selected].abs().sum() == 0  # no AuxK gradient
        else:
            assert res["aux_loss"].item() > 0 and sae.W_enc_T.grad.T[:, ~selected].abs().sum() > 0
            assert grads.norm().item() == pytest.approx(clip, rel=1e-4)  # clipped
        assert res["loss"].item() == pytest.approx(res["fvu"].item() + aux_coef * res["aux_loss"].item())
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))  # unit-norm decoder after the step


def test_member_of_matches_isin_for_any_order_of_ids():
    rng = np.random.default_rng(0)
    pool = np.array([f"s{i}" for i in range(40)], dtype=object)
    held = {f"s{i}" for i in range(0, 40, 3)}
    contiguous = np.repeat(pool, rng.integers(1, 30, len(pool)))
    for ids in (contiguous, rng.permutation(contiguous), contiguous[:1], contiguous[:0]):
        np.testing.assert_array_equal(member_of(ids, held), np.isin(ids, np.array(sorted(held), dtype=object)))
