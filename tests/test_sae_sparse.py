"""The sparse training step (EncoderGather + embedding_bag decoder) equals the dense autograd step.

The reference below is the textbook dense TopK SAE: pre = (x - b_dec) W_enc + b_enc with autograd
through the whole (n, d_sae) matrix, z = scatter(ReLU(top-k)), x_hat = z W_dec + b_dec, and AuxK
through a masked dense top-k. Both steps see the same parameters and data, so their losses and
every parameter's gradient must agree to float tolerance.
"""

import pytest
import torch

from mmsae.sae import TopKSAE, fvu
from mmsae.sae.model import TopK


def dense_loss(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor, k_aux: int, aux_coef: float):
    target = x.detach()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(sae.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    x_hat = z @ sae.W_dec + sae.b_dec
    main = fvu(target, x_hat)
    aux = x.new_zeros(())
    if dead.any():
        masked = pre.masked_fill(~dead, float("-inf"))
        avals, aidx = masked.topk(min(k_aux, int(dead.sum())), dim=-1)
        z_aux = torch.zeros_like(pre).scatter(-1, aidx, avals.relu())
        aux = fvu((target - x_hat).detach(), z_aux @ sae.W_dec)
    return main, aux, main + aux_coef * aux


def grads(sae, loss):
    sae.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("n_dead", [0, 20, 64])
def test_sparse_step_matches_dense_autograd(n_dead):
    torch.manual_seed(0)
    sae = TopKSAE(24, 96, k=6, seed=7).double()
    with torch.no_grad():  # a non-trivial b_dec and b_enc, so their gradient paths are exercised
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    x = torch.randn(40, 24, dtype=torch.float64) * 2 + 1
    dead = torch.zeros(96, dtype=torch.bool)
    dead[torch.randperm(96)[:n_dead]] = True
    out = sae(x)
    main = fvu(x, out.x_hat)
    aux = sae.auxk_loss(x, out, dead, k_aux=12)
    sparse = grads(sae, main + 0.5 * aux)
    d_main, d_aux, d_loss = dense_loss(sae, x, dead, 12, 0.5)
    dense = grads(sae, d_loss)
    torch.testing.assert_close(main, d_main)
    torch.testing.assert_close(aux, d_aux)
    if n_dead:
        assert aux.item() > 0
    for name in dense:
        assert dense[name].abs().max() > 0, name
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-9, atol=1e-12, msg=name)


def test_sparse_step_matches_in_float32_and_input_grad():
    torch.manual_seed(1)
    sae = TopKSAE(32, 256, k=8, seed=3)
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(64, 32, requires_grad=True)
    out = sae(x)
    loss = fvu(x.detach(), out.x_hat)
    sparse = grads(sae, loss)
    gx = x.grad.clone()
    x.grad = None
    dense = grads(sae, dense_loss(sae, x, torch.zeros(256, dtype=torch.bool), 1, 0.0)[0])
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-6)


def test_sparse_step_forms_no_dense_latent_gradient():
    """The backward never builds an (n, d_sae) tensor: the encoder's weight gradient is non-zero
    in the selected latents' columns only, and no autograd node holds an (n, d_sae) gradient."""
    sae = TopKSAE(16, 512, k=4, seed=0)
    x = torch.randn(8, 16)
    out = sae(x)
    assert not out.pre.requires_grad  # pre is not part of the autograd graph
    seen = []

    def hook(grad_in, grad_out):  # records every gradient shape flowing through the graph
        seen.extend(tuple(g.shape) for g in (*grad_in, *grad_out) if g is not None)

    node = out.x_hat.grad_fn
    stack, nodes = [node], set()
    while stack:
        f = stack.pop()
        if f is None or f in nodes:
            continue
        nodes.add(f)
        f.register_hook(hook)
        stack.extend(nf for nf, _ in f.next_functions)
    fvu(x, out.x_hat).backward()
    assert (8, 512) not in seen
    used = torch.zeros(512, dtype=torch.bool)
    used[out.top_idx.flatten()] = True
    assert sae.W_enc_T.grad.T[:, ~used].abs().sum() == 0


def test_topk_module():
    topk = TopK(2)
    vals, idx = topk(torch.tensor([[3.0, -1.0, 5.0, 0.5], [-2.0, -1.0, -3.0, -4.0]]))
    assert sorted(idx[0].tolist()) == [0, 2] and sorted(vals[0].tolist()) == [3.0, 5.0]
    assert (vals[1] == 0).all()  # negative pre-activations are ReLU'd to 0 (L0 < k)
    with pytest.raises(ValueError, match="k=0"):
        TopK(0)
    with pytest.raises(ValueError, match="latents"):
        TopK(5)(torch.zeros(2, 4))
    assert isinstance(TopKSAE(4, 8, k=2).topk, TopK)


def test_w_enc_layout_and_state_dict_round_trip():
    sae = TopKSAE(16, 64, k=4, seed=2)
    assert sae.W_enc.shape == (16, 64) and sae.W_enc.T.is_contiguous()
    # every parameter the optimiser steps is contiguous (fused Adam copies a transposed one each step)
    assert all(p.is_contiguous() for p in sae.parameters())
    state = sae.state_dict()
    assert set(state) == {"W_enc", "b_enc", "W_dec", "b_dec"} and state["W_enc"].shape == (16, 64)  # SAELens's layout
    x = torch.randn(5, 16)
    sae(x).x_hat.pow(2).sum().backward()
    assert sae.W_enc_T.grad.is_contiguous() and sae.W_enc_T.grad.shape == (64, 16)  # no transposed gradient copy
    other = TopKSAE(16, 64, k=4, seed=9)
    other.load_state_dict({k: v.contiguous() for k, v in sae.state_dict().items()})
    torch.testing.assert_close(other(x).x_hat, sae(x).x_hat)
