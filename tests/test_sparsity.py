"""``sparsity.safetensors`` (#32.1): log10 firing density of each latent over the training tokens,
written beside cfg.json and the weights as SAELens writes it and read back by SAELens's loader.

The SAE trains at lr 0 for one pass over a fixed list of batches, so its weights stay the initial
ones and an independent TopK encode of the same batches must fire exactly as training did.
"""

import json

import pytest
import torch
from helpers import FixedBatches
from safetensors import safe_open

from mmsae.sae.io import load_sparsity
from mmsae.sae.run import NormPass, TrainedOn, finish_training
from mmsae.sae.trainer import TrainConfig, train

D, D_SAE, K, N, STEPS = 16, 256, 2, 32, 6  # 384 firings at most: some latents never fire


def _stream():
    """A fixed list of batches: the last ``N // 4`` rows of each are image tokens."""
    gen = torch.Generator().manual_seed(1)
    return FixedBatches([torch.randn(N, D, generator=gen) for _ in range(STEPS)], torch.arange(N) >= N - N // 4, "fake-sparsity")


def _independent_log10_density(sae, batches):
    """Plain TopK of ReLU(x - b_dec) W_enc + b_enc per token; a latent fires where its kept value is > 0."""
    fires = torch.zeros(D_SAE, dtype=torch.float64)
    W_enc, b_enc, b_dec = (t.detach() for t in (sae.W_enc, sae.b_enc, sae.b_dec))
    for x in batches:
        pre = torch.relu((x - b_dec) @ W_enc + b_enc)
        vals, idx = pre.topk(K, dim=1)
        for v, i in zip(vals.flatten().tolist(), idx.flatten().tolist()):
            fires[i] += v > 0
    return torch.log10(fires / (N * len(batches)) + 1e-10).float()


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sparsity")
    cfg = TrainConfig(d_sae=D_SAE, k=K, steps=STEPS, batch_size=N, lr=0.0, warmup_steps=1, checkpoint_every=100,
                      b_dec_init_tokens=64, aux_coef=0.0, dead_tokens=10_000)
    stream = _stream()
    sae, rows, fires = train(stream, D, cfg, tmp / "ckpt", progress=False)
    heldout = (torch.randn(20, D), torch.arange(20) < 5)
    out = tmp / "sae"
    finish_training(sae, rows, fires, cfg, {}, TrainedOn(D, "m", "blocks.0.hook_resid_post", []), NormPass({}), heldout, out)
    return out, sae, stream


def test_sparsity_file_equals_an_independent_count(sae_folder):
    out, sae, stream = sae_folder
    with safe_open(str(out / "sparsity.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["sparsity"]  # SAELens's single tensor name
        sparsity = f.get_tensor("sparsity")
    assert sparsity.shape == (D_SAE,) and sparsity.dtype == torch.float32
    expected = _independent_log10_density(sae, stream.batches)
    torch.testing.assert_close(sparsity, expected)
    assert (sparsity == -10).any() and (sparsity > -10).any()  # never-fired latents at log10(1e-10), as SAELens
    torch.testing.assert_close(load_sparsity(out), expected)
    assert json.loads((out / "cfg.json").read_text())["d_sae"] == D_SAE


def test_saelens_reads_the_sparsity(sae_folder, monkeypatch):
    """SAELens's own reader: ``load_sparsity`` of its toolkit where the installed version has it, else
    its Hugging Face loader (which reads cfg, weights and sparsity) with the download pointed at the folder."""
    sae_lens = pytest.importorskip("sae_lens")
    out, sae, stream = sae_folder
    expected = _independent_log10_density(sae, stream.batches)
    try:
        from sae_lens.toolkit.pretrained_saes import load_sparsity as saelens_load_sparsity
    except ImportError:
        saelens_load_sparsity = None
    if saelens_load_sparsity is not None:
        got = saelens_load_sparsity(str(out))
    else:
        from sae_lens.loading import pretrained_sae_loaders as loaders

        def local_download(repo_id, filename, **_):
            return str(out.parent / filename)

        monkeypatch.setattr(loaders, "hf_hub_download", local_download)
        cfg, state, got = loaders.sae_lens_huggingface_loader("local/repo", out.name)
        assert cfg["d_sae"] == D_SAE and state["W_enc"].shape == (D, D_SAE)
    assert got is not None, f"sae_lens {sae_lens.__version__} found no sparsity"
    torch.testing.assert_close(got.float(), expected)


def test_hub_folder_carries_the_sparsity_and_saelens_reads_it(sae_folder, tmp_path, monkeypatch):
    """The Hub folder holds the SAE under its hook point with ``sparsity.safetensors``; SAELens's Hub
    loader (download pointed at the folder) returns the SAE folder's densities."""
    from huggingface_hub import ModelCard

    from mmsae.export.hub import write_hub_folder

    out, _, _ = sae_folder
    hook = "blocks.0.hook_resid_post"
    hub = write_hub_folder(tmp_path / "hub", sae_dir=out, hook_point=hook, release="r", repo_id=None, model="m",
                           metrics={"heldout": {"fvu": 0.5, "l0": 2.0}}, loss_recovered=None, corpus="c")
    assert (hub / hook / "sparsity.safetensors").read_bytes() == (out / "sparsity.safetensors").read_bytes()
    assert "sparsity.safetensors" in ModelCard.load(hub / "README.md").text
    pytest.importorskip("sae_lens")
    from sae_lens.loading import pretrained_sae_loaders as loaders

    monkeypatch.setattr(loaders, "hf_hub_download", lambda repo_id, filename, **_: str(hub / filename))
    _, _, got = loaders.sae_lens_huggingface_loader("local/repo", hook)
    torch.testing.assert_close(got, load_sparsity(out))
