"""BatchTopK and Matryoshka BatchTopK SAEs (``sae.architecture``, :mod:`mmsae.sae.batchtopk`), each
checked against an independent dense computation and against SAELens 6's own code on our files."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from mmsae.core.io import write_parquet
from mmsae.core.shards import activation_schema
from mmsae.sae import fvu, load_sae, save_sae
from mmsae.sae.batchtopk import THRESHOLD_RATE, batch_topk, make_sae, matryoshka_prefixes
from mmsae.sae.data import ActivationStream
from mmsae.sae.splice import SteeringHook
from mmsae.sae.trainer import TrainConfig, evaluate, make_optimizer, train, train_step
from mmsae.workflow.config_check import config_errors

ARCHS = ["topk", "batchtopk", "matryoshka_batchtopk"]


def _data(n=512, d=16, seed=0) -> torch.Tensor:
    """Sparse non-negative mixtures of 48 directions plus an offset: some tokens use many, some few."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(48, d, generator=gen)
    codes = (torch.rand(n, 48, generator=gen) < torch.rand(n, 1, generator=gen) * 0.3) * torch.rand(n, 48, generator=gen)
    return codes @ basis + 0.5


def _dense_pre(sae, x):
    """(x - b_dec) W_enc + b_enc, written out (not through the SAE's methods)."""
    return (x - sae.b_dec) @ sae.W_enc_T.T + sae.b_enc


def _dense(vals, idx, d_sae):
    return torch.zeros(vals.shape[0], d_sae).scatter_add_(1, idx, vals)


def _trained(arch, steps=12, d_sae=64, k=4, seed=0):
    """A small SAE of ``arch`` after ``steps`` steps of the trainer's own step (a nonzero threshold)."""
    x = _data(seed=seed)
    cfg = TrainConfig(d_sae=d_sae, k=k, batch_size=128, lr=2e-3, architecture=arch, matryoshka_prefixes=[8, 24])
    sae = make_sae(arch, 16, d_sae, k, prefixes=cfg.matryoshka_prefixes, seed=seed)
    sae.init_b_dec(x, "mean")
    opt = make_optimizer(sae, cfg)
    outs = []
    for i in range(steps):
        outs.append(train_step(sae, opt, x[(i % 4) * 128:(i % 4 + 1) * 128], torch.zeros(d_sae, dtype=torch.bool), cfg)["out"])
    return sae, outs, x


def test_batch_topk_is_the_flat_topk_of_the_batch():
    gen = torch.Generator().manual_seed(3)
    for n, d_sae, k in ((64, 300, 5), (7, 4096, 3), (200, 64, 2), (1024, 4608, 32), (3, 10, 4), (2, 3, 4)):
        pre = torch.randn(n, d_sae, generator=gen) + torch.randn(n, 1, generator=gen)  # rows of unequal scale
        ref = pre.flatten().topk(min(k * n, n * d_sae)).indices
        ref = ref[pre.flatten()[ref] > 0].sort().values
        assert torch.equal(batch_topk(pre, k), ref)


def test_batchtopk_keeps_exactly_k_times_batch_in_training():
    sae = make_sae("batchtopk", 16, 128, 6, seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every pre-activation positive: exactly k n are kept
    x = _data(n=100)
    out = sae(x)
    active = out.top_vals > 0
    assert int(active.sum()) == 6 * 100
    per_token = active.sum(1)
    assert per_token.min() < 6 < per_token.max()  # k on average over the batch, not on every token
    # the kept latents are the batch's 600 largest pre-activations, computed densely
    pre = _dense_pre(sae, x).detach()
    ref = torch.zeros(pre.numel(), dtype=torch.bool)
    ref[pre.flatten().topk(600).indices] = True
    torch.testing.assert_close(_dense(out.top_vals.detach(), out.top_idx, 128), torch.where(ref.view_as(pre), pre, 0.0))
    torch.testing.assert_close(out.x_hat, _dense(out.top_vals, out.top_idx, 128) @ sae.W_dec + sae.b_dec)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_sparse_step_gradients_equal_dense_autograd(arch):
    """The training loss (FVU, Matryoshka's prefixes, AuxK) through the sparse step and through the
    textbook dense SAE (the same kept set as a fixed mask) give the same gradient for every
    parameter; so does the inference encoder's gradient in x."""
    torch.manual_seed(0)
    sae = make_sae(arch, 24, 96, 3, prefixes=[16, 40], seed=7).double()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        sae.threshold.fill_(0.3)
    x = torch.randn(40, 24, dtype=torch.float64) * 2 + 1
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True

    def grads(loss):
        sae.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in sae.named_parameters()}

    out = sae(x)
    aux = sae.auxk_loss(x, out, dead, k_aux=12)
    sparse = grads(sae.reconstruction_loss(x, out) + 0.5 * aux)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    mask = torch.zeros(pre.numel(), dtype=torch.bool)
    mask[pre.detach().flatten().topk(3 * 40).indices] = True
    z = pre * (mask.view_as(pre) & (pre > 0))
    prefixes = sae.prefixes if arch == "matryoshka_batchtopk" else [96]
    recon = sum(fvu(x, z[:, :m] @ sae.W_dec[:m] + sae.b_dec) for m in prefixes)
    masked = pre.masked_fill(~dead, float("-inf"))
    avals, aidx = masked.topk(12, dim=-1)
    z_aux = torch.zeros_like(pre).scatter(-1, aidx, avals.relu())
    d_aux = fvu((x - (z @ sae.W_dec + sae.b_dec)).detach(), z_aux @ sae.W_dec)
    dense = grads(recon + 0.5 * d_aux)
    for name in dense:
        assert dense[name].abs().max() > 0, name
        torch.testing.assert_close(sparse[name], dense[name], msg=name)
    # the inference encoder's gradient in x (attribution's path), against autograd through a JumpReLU
    xs = x.clone().requires_grad_(True)
    vals, idx = sae.encode(xs)
    (sae.decode(vals, idx) ** 2).sum().backward()
    xd = x.clone().requires_grad_(True)
    pre = (xd - sae.b_dec) @ sae.W_enc + sae.b_enc
    ((pre * (pre > 0.3)) @ sae.W_dec + sae.b_dec).pow(2).sum().backward()
    torch.testing.assert_close(xs.grad, xd.grad)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_threshold_is_the_running_estimate_of_the_smallest_kept_activation(arch):
    sae, outs, x = _trained(arch)
    mins = [o.top_vals.detach()[o.top_vals > 0].min().item() for o in outs]
    theta = mins[0]
    for m in mins[1:]:
        theta = (1 - THRESHOLD_RATE) * theta + THRESHOLD_RATE * m
    assert torch.allclose(sae.threshold, torch.full((64,), theta), rtol=1e-5)
    # inference keeps exactly the latents above it, with their pre-activations (a JumpReLU)
    with torch.no_grad():
        pre = _dense_pre(sae, x)
        vals, idx = sae.encode(x)
        want = torch.where(pre > theta, pre, 0.0)
        torch.testing.assert_close(_dense(vals, idx, 64), want)
        ev = evaluate(sae, x, torch.zeros(len(x), dtype=torch.bool))
        assert ev["l0"] == pytest.approx((want > 0).sum(1).float().mean().item())
        assert ev["fvu"] == pytest.approx(fvu(x, want @ sae.W_dec + sae.b_dec).item(), rel=1e-5)


def test_encode_dense_keeps_latent_0_beside_the_padding():
    """Padded rows (index 0, value 0) must not overwrite latent 0 where it is active."""
    sae = make_sae("batchtopk", 16, 64, 4)
    with torch.no_grad():
        sae.b_enc[0] = 10.0  # latent 0 active on every token
        sae.threshold.fill_(0.05)
        x = _data(n=32)
        want = torch.where(_dense_pre(sae, x) > 0.05, _dense_pre(sae, x), 0.0)
        vals, _ = sae.encode(x)
        assert ((vals > 0).sum(1) < vals.shape[1]).any()  # some rows are padded
        torch.testing.assert_close(sae.encode_dense(x), want)


def test_threshold_of_a_fixed_batch_reproduces_its_selection():
    """With the parameters frozen (lr 0) on one batch, theta settles on that batch's smallest kept
    activation, so the threshold keeps (all but that one of) the k n latents BatchTopK kept."""
    x = _data(n=128)
    cfg = TrainConfig(d_sae=64, k=4, batch_size=128, lr=0.0, architecture="batchtopk")
    sae = make_sae("batchtopk", 16, 64, 4)
    opt = make_optimizer(sae, cfg)
    for _ in range(5):
        out = train_step(sae, opt, x, torch.zeros(64, dtype=torch.bool), cfg)["out"]
    kept = int((out.top_vals > 0).sum())
    with torch.no_grad():
        vals, _ = sae.encode(x)
    assert kept == 4 * 128 and int((vals > 0).sum()) in (kept - 1, kept)


def test_matryoshka_loss_is_the_sum_over_prefixes():
    sae, _, x = _trained("matryoshka_batchtopk", steps=3)
    assert sae.prefixes == [8, 24, 64]
    xb = x[:128]
    out = sae(xb)
    z = _dense(out.top_vals.detach(), out.top_idx, 64)
    want = sum(((xb - (z[:, :m] @ sae.W_dec[:m] + sae.b_dec)) ** 2).sum() / ((xb - xb.mean(0)) ** 2).sum()
               for m in (8, 24, 64))
    assert sae.reconstruction_loss(xb, out).item() == pytest.approx(want.item(), rel=1e-5)
    # and that is the loss the trainer's step minimises (AuxK off)
    cfg = TrainConfig(d_sae=64, k=4, batch_size=128, lr=0.0, aux_coef=0.0, architecture="matryoshka_batchtopk")
    res = train_step(sae, make_optimizer(sae, cfg), xb, torch.zeros(64, dtype=torch.bool), cfg)
    assert res["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert res["fvu"].item() == pytest.approx(fvu(xb, out.x_hat).item(), rel=1e-5)


def test_matryoshka_prefixes_checked():
    assert matryoshka_prefixes(4608, None) == [144, 576, 2304, 4608]
    assert matryoshka_prefixes(64, [8, 64]) == [8, 64]
    for bad in ([8, 8], [16, 8], [0, 8], [128]):
        with pytest.raises(ValueError, match="matryoshka_prefixes"):
            matryoshka_prefixes(64, bad)
    cfg = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())  # refused when the workflow loads
    cfg["sae"] |= {"d_sae": 64, "k": 4, "matryoshka_prefixes": [16, 8]}
    assert any("sae.matryoshka_prefixes" in e for e in config_errors(cfg))
    cfg["sae"]["matryoshka_prefixes"] = [8, 16, 64]
    assert not any("matryoshka" in e for e in config_errors(cfg))


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_forward_on_our_files_equals_ours(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    sae, _, x = _trained(arch)
    save_sae(sae, tmp_path, model_name="m", hook_point="model.layers.1")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    assert theirs.cfg.architecture() == ("topk" if arch == "topk" else "jumprelu")  # SAELens's inference layout
    ours, cfg = load_sae(tmp_path)
    assert ours.architecture == arch and cfg["metadata"].get("training_architecture", "topk") == arch
    if arch != "topk":
        assert torch.equal(theirs.threshold.detach(), sae.threshold) and torch.equal(ours.threshold, sae.threshold)
    if arch == "matryoshka_batchtopk":
        assert ours.prefixes == [8, 24, 64] == cfg["metadata"]["training_architecture_details"]["matryoshka_widths"]
    with torch.no_grad():
        vals, idx = ours.encode(x)
        z_theirs = theirs.encode(x)
        torch.testing.assert_close(_dense(vals, idx, 64), z_theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.decode(vals, idx), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_saelens_training_forward_equals_ours(arch):
    """SAELens's own training SAE with our weights (decoder rows already unit norm, so its
    rescale_acts_by_decoder_norm is set off) keeps the same latents, and its loss terms are ours in
    its units: sum of squared errors over tokens, where ours divides by the batch's total variance."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae, _, x = _trained(arch, steps=3)
    common = dict(d_in=16, d_sae=64, k=4, rescale_acts_by_decoder_norm=False, aux_loss_coefficient=0.0)
    if arch == "batchtopk":
        theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    else:
        theirs = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(**common, matryoshka_widths=[8, 24, 64]))
    state = {k: v for k, v in sae.state_dict().items() if k != "threshold"}
    theirs.load_state_dict({**state, "topk_threshold": torch.tensor(0.0, dtype=torch.double)})
    xb = x[:128]
    step = theirs.training_forward_pass(TrainStepInput(sae_in=xb, coefficients={}, dead_neuron_mask=None,
                                                       n_training_steps=0, is_logging_step=False))
    out = sae(xb)
    torch.testing.assert_close(_dense(out.top_vals.detach(), out.top_idx, 64), step.feature_acts.detach(), rtol=1e-5, atol=1e-5)
    sst_per_token = ((xb - xb.mean(0)) ** 2).sum() / len(xb)
    mse_terms = sum(v for name, v in step.losses.items() if "mse" in name)
    assert (sae.reconstruction_loss(xb, out) * sst_per_token).item() == pytest.approx(mse_terms.item(), rel=1e-4)
    assert theirs.topk_threshold.item() == pytest.approx(THRESHOLD_RATE * out.top_vals[out.top_vals > 0].min().item(), rel=1e-5)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_steering_reference_mode_uses_the_threshold(arch):
    """Steering's reference mode (and so loss recovered and reference attribution) reconstructs with
    the architecture's inference encoder, not TopK."""
    sae, _, x = _trained(arch)
    with torch.no_grad():
        recon = SteeringHook(sae, [], mode="reference", positions="all").steer(x[None])[0]
        vals, idx = sae.encode(x)
        torch.testing.assert_close(recon, sae.decode(vals, idx))
        assert (vals > 0).sum(1).max() > sae.k  # a token TopK would have cut


def _shard(path, n=600, d=16):
    x = _data(n=n, d=d).numpy().astype(np.float32)
    table = pa.table({
        "sample_id": [f"s{i // 10}" for i in range(n)],
        "token_index": np.arange(n, dtype=np.int32) % 10,
        "token_id": (np.arange(n) % 10).astype(np.int32),
        "modality": pa.array(["image" if i % 3 else "text" for i in range(n)]).dictionary_encode().cast(pa.dictionary(pa.int8(), pa.string())),
        "view": np.zeros(n, np.int16), "patch_row": np.zeros(n, np.int16), "patch_col": np.zeros(n, np.int16),
        "activation": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d),
    }, schema=activation_schema(d))
    write_parquet(path, table, row_group_size=64)
    return [path]


def test_matryoshka_training_resumes_bit_identically(tmp_path):
    """train() builds the configured architecture; its threshold is in the checkpoint, so a killed
    run resumes to the same SAE."""
    stream = ActivationStream(_shard(tmp_path / "shard-00000.parquet"), batch_size=64, seed=0, buffer_tokens=256, heldout_ids=())
    cfg = TrainConfig(d_sae=64, k=4, steps=16, batch_size=64, warmup_steps=2, checkpoint_every=100, b_dec_init_tokens=128,
                      architecture="matryoshka_batchtopk", matryoshka_prefixes=[16])
    full = train(stream, 16, cfg, tmp_path / "a", progress=False)[0]
    assert type(full).__name__ == "MatryoshkaBatchTopKSAE" and full.prefixes == [16, 64] and full.threshold[0] > 0
    train(stream, 16, cfg, tmp_path / "b", progress=False, stop_after=7)
    resumed = train(stream, 16, cfg, tmp_path / "b", progress=False)[0]
    for (name, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    assert dataclasses.asdict(cfg)["architecture"] == "matryoshka_batchtopk"
    assert not math.isnan(float(full.threshold[0]))


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_we_load_saelens_trained_batchtopk_files(tmp_path, arch):
    """The other direction: a SAELens training SAE (its own init, threshold from its own forward
    passes) saved by its save_inference_model is read by load_sae as the architecture it was trained as."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    common = dict(d_in=16, d_sae=64, k=4)
    theirs = (BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common)) if arch == "batchtopk" else
              MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(**common, matryoshka_widths=[8, 32, 64])))
    x = _data()
    with torch.no_grad():
        for i in range(4):
            theirs.training_forward_pass(TrainStepInput(sae_in=x[i * 128:(i + 1) * 128], coefficients={}, dead_neuron_mask=None,
                                                        n_training_steps=i, is_logging_step=False))
    theirs.save_inference_model(tmp_path)
    ours, _ = load_sae(tmp_path)
    inference = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert ours.architecture == arch and ours.k == 4 and float(ours.threshold[0]) > 0
    assert arch == "batchtopk" or ours.prefixes == [8, 32, 64]
    with torch.no_grad():
        vals, idx = ours.encode(x)
        torch.testing.assert_close(_dense(vals, idx, 64), inference.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.decode(vals, idx), inference(x), rtol=1e-5, atol=1e-5)


def test_load_refuses_other_jumprelu_files(tmp_path):
    sae, _, _ = _trained("batchtopk", steps=1)
    save_sae(sae, tmp_path, model_name="m", hook_point="h")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["metadata"]["training_architecture"]  # a JumpReLU SAE trained as JumpReLU (e.g. Gemma Scope)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="jumprelu"):
        load_sae(tmp_path)


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from mmsae.sae.batchtopk import smallest_kept
    from mmsae.sae.distributed import maybe_ddp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x = _data(seed=rank)  # each rank its own data
        cfg = TrainConfig(d_sae=64, k=4, batch_size=256, lr=2e-3, architecture="batchtopk")
        sae = make_sae("batchtopk", 16, 64, 4)
        sae.init_b_dec(_data(), "mean")
        opt = make_optimizer(sae, cfg)
        model = maybe_ddp(sae, torch.device("cpu"))
        mins = []
        for i in range(6):
            out = train_step(sae, opt, x[(i % 4) * 128:(i % 4 + 1) * 128], torch.zeros(64, dtype=torch.bool), cfg, model=model)["out"]
            mins.append(smallest_kept(out).item())
        torch.save({"threshold": sae.threshold.clone(), "mins": mins}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_share_the_threshold_of_their_mean_smallest_kept(tmp_path):
    """Under DDP each rank ranks its own batch; the threshold follows the ranks' mean smallest kept
    activation, so every rank holds the same one."""
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert torch.equal(a["threshold"], b["threshold"])
    means = [(p + q) / 2 for p, q in zip(a["mins"], b["mins"])]
    assert a["mins"] != b["mins"]
    theta = means[0]
    for m in means[1:]:
        theta = (1 - THRESHOLD_RATE) * theta + THRESHOLD_RATE * m
    assert float(a["threshold"][0]) == pytest.approx(theta, rel=1e-5)
