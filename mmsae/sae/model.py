"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Shapes: ``x`` is ``(n, d_model)``; latents are ``(n, d_sae)``. Parameters use SAELens's layout:
``W_enc (d_model, d_sae)``, ``b_enc (d_sae,)``, ``W_dec (d_sae, d_model)``, ``b_dec (d_model,)``.

    pre  = (x - b_dec) @ W_enc + b_enc                                   (encoder)
    z    = TopK_k(pre)                     keep the k largest, ReLU them, zero the rest
    x_hat = z @ W_dec + b_dec                                            (decoder)

Loss = FVU(x, x_hat) + aux_coef * AuxK, where FVU = ||x - x_hat||^2 / ||x - mean(x)||^2 over the
batch and AuxK reconstructs the detached residual e = x - x_hat from the top ``k_aux`` pre-activations
among dead latents (Gao et al. §A.2). Decoder rows stay at unit norm: after each optimiser step
:meth:`TopKSAE.normalize_decoder`, and before it :meth:`TopKSAE.remove_parallel_grads`.

Sparse training step: only ``pre`` (one dense matmul, batch x d_model x d_sae) is dense. The kept
values are gathered from it by :class:`EncoderGather`, whose backward computes the encoder's weight
gradient only for the selected (token, latent) pairs; the decoder is an ``embedding_bag`` over the
k selected rows of ``W_dec``, forward and backward. Nothing else of size (n, d_sae) is formed. The
results equal the dense autograd step's (``tests/test_sae_sparse.py``).

``W_enc`` has shape (d_model, d_sae) but is stored latent-major: the parameter is ``W_enc_T``
(d_sae, d_model), contiguous as in ``nn.Linear``, and ``W_enc`` is its transpose (a view). So the
sparse weight gradient is written row by row and never transposed, and the fused Adam step runs
over contiguous tensors (on a transposed view it copies each one: 0.15-0.30 s instead of 0.055 s
per step at d_sae 32768, d_model 2048 on 2 CPU cores). ``state_dict()`` and ``load_state_dict``
speak SAELens's layout (key ``W_enc``, (d_model, d_sae)), so files and checkpoints are unchanged.

Other architectures (``sae.architecture``): :mod:`mmsae.sae.batchtopk` subclasses :class:`TopKSAE` for
BatchTopK and Matryoshka BatchTopK. Every architecture has :meth:`TopKSAE.forward` (the training
forward), :meth:`TopKSAE.encode` and :meth:`TopKSAE.select` (the inference encoder, on inputs and on
dense pre-activations: what codes, steering, attribution and loss recovered use) and
:meth:`TopKSAE.reconstruction_loss`; for TopK training and inference select alike.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class SAEOutput(NamedTuple):
    """Result of :meth:`TopKSAE.forward`.

    x_hat: (n, d_model) reconstruction; top_vals, top_idx: (n, k) the kept latents;
    pre: (n, d_sae) pre-activations (for AuxK), computed without autograd: gradients reach the
    encoder through ``top_vals`` (and through AuxK's own gathered values).
    """

    x_hat: torch.Tensor
    top_vals: torch.Tensor
    top_idx: torch.Tensor
    pre: torch.Tensor


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the batch.

    x, x_hat: (n, d_model). Returns a scalar; 0 is perfect, 1 is no better than the batch mean.
    """
    return (x - x_hat).pow(2).sum() / (x - x.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)


class TopK(nn.Module):
    """TopK activation (Gao et al. 2024 §2.3): keep each row's k largest entries, then ReLU them.

    As openai/sparse_autoencoder's ``TopK`` with a ReLU post-activation, but it returns the sparse
    form instead of scattering into a dense (n, d_sae) tensor.

    forward(pre): pre (n, d_sae) -> (values, indices), each (n, k); values >= 0 (a selected
    negative pre-activation becomes 0, so L0 <= k), indices in [0, d_sae), in no particular order.
    Differentiable in ``pre`` (the gradient flows to the selected entries only).

    Raises:
        ValueError: k < 1, or pre has fewer than k columns.
    """

    def __init__(self, k: int):
        super().__init__()
        if k < 1:
            raise ValueError(f"TopK: k={k} must be >= 1")
        self.k = k

    def forward(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pre.shape[-1] < self.k:
            raise ValueError(f"TopK: k={self.k} is more than the {pre.shape[-1]} latents")
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return vals.relu(), idx

    def extra_repr(self) -> str:
        return f"k={self.k}"


class EncoderGather(torch.autograd.Function):
    """Encoder pre-activations at chosen (token, latent) pairs, with a backward that touches only those.

    forward(x, W_enc, b_enc, b_dec, pre, rows, cols) -> vals
        x (n, d_model), W_enc (d_model, d_sae), b_enc (d_sae,), b_dec (d_model,);
        pre (n, d_sae) = (x - b_dec) @ W_enc + b_enc, already computed by the caller without
        autograd (it is only read here, not recomputed); rows (m,) int64 ascending token indices,
        cols (m,) int64 latent indices. vals (m,): vals[i] = pre[rows[i], cols[i]]. TopK's (n, j)
        selection is the flat list rows = 0..n-1 each repeated j times, cols = idx.flatten()
        (:func:`gather_selected`); BatchTopK's kept pairs are any number per token.

    backward(g), g = dL/dvals (m,), with S the (n, d_sae) matrix holding g[i] at (rows[i], cols[i])
    and 0 elsewhere (never formed densely):
        dL/db_enc = S summed over rows                  (d_sae,)    scatter-add of m values
        dL/dW_enc = (x - b_dec)^T S                     (d_model, d_sae), non-zero in the selected
                    columns only: a sparse (d_sae x n) @ dense (n x d_model) product, m*d_model
                    multiply-adds instead of the dense n*d_sae*d_model, computed latent-major
        dL/db_dec = -W_enc @ dL/db_enc                  (d_model,)  as x - b_dec is the input
        dL/dx     = S W_enc^T                           (n, d_model), only when x requires grad
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, pre, rows, cols):
        ctx.save_for_backward(x, W_enc, b_dec, rows, cols)
        # flat index_select: pre[rows, cols] (advanced indexing) takes 5 ms at (1024 x 32768, 32 per row)
        # on 2 CPU cores, this 0.3 ms (TopK's former pre.gather(1, idx) 0.17 ms)
        return pre.reshape(-1).index_select(0, rows * pre.shape[1] + cols)

    @staticmethod
    def backward(ctx, g):
        x, W_enc, b_dec, rows, cols = ctx.saved_tensors
        n, d_sae = x.shape[0], W_enc.shape[1]
        g = g.contiguous()
        grad_x = grad_W = grad_b_enc = grad_b_dec = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_b_enc = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        if ctx.needs_input_grad[1]:
            s_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (d_sae, n), check_invariants=False)
            grad_W = torch.sparse.mm(s_t, x - b_dec).T  # (d_sae, d_model) computed, returned as a view
        if ctx.needs_input_grad[3]:
            grad_b_dec = -(W_enc @ grad_b_enc)
        if ctx.needs_input_grad[0]:
            counts = torch.bincount(rows, minlength=n)
            grad_x = F.embedding_bag(cols, W_enc.T, counts.cumsum(0) - counts, per_sample_weights=g, mode="sum")
        return grad_x, grad_W, (grad_b_enc if ctx.needs_input_grad[2] else None), grad_b_dec, None, None, None


def gather_selected(sae: "TopKSAE", x: torch.Tensor, pre: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(n, j) pre-activations of ``sae`` at the latents ``idx`` (n, j) of each token, through
    :class:`EncoderGather` (sparse backward). x (n, d_model), pre (n, d_sae) computed without autograd."""
    n, j = idx.shape
    rows = torch.arange(n, device=idx.device).repeat_interleave(j)
    return EncoderGather.apply(x, sae.W_enc, sae.b_enc, sae.b_dec, pre, rows, idx.reshape(-1)).reshape(n, j)


def _state_dict_in_saelens_layout(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: ``W_enc_T`` (d_sae, d_model) leaves as ``W_enc`` (d_model, d_sae)."""
    state_dict[prefix + "W_enc"] = state_dict.pop(prefix + "W_enc_T").T


def _load_state_dict_from_saelens_layout(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: ``W_enc`` (d_model, d_sae) arrives as ``W_enc_T`` (d_sae, d_model)."""
    if prefix + "W_enc" in state_dict:
        state_dict[prefix + "W_enc_T"] = state_dict.pop(prefix + "W_enc").T


class TopKSAE(nn.Module):
    """TopK SAE with ReLU before TopK and unit-norm decoder rows.

    Initialisation as the paper's released trainer (and sparsify): W_enc^T ~ U(-1/sqrt(d_model),
    1/sqrt(d_model)) as ``nn.Linear``, b_enc = 0, W_dec = W_enc^T with each row scaled to unit norm,
    b_dec = 0 until :meth:`init_b_dec`.

    Args:
        d_model: input width (the hooked layer's hidden size).
        d_sae: number of latents.
        k: latents kept per token (L0 = k, or fewer when fewer pre-activations are positive).
        seed: seeds the initial weights.

    Raises:
        ValueError: k is not in [1, d_sae].
    """

    architecture = "topk"  # sae.architecture; the subclasses of mmsae.sae.batchtopk set their own

    def __init__(self, d_model: int, d_sae: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not 1 <= k <= d_sae:
            raise ValueError(f"sae.k: {k} must be between 1 and d_sae={d_sae}")
        self.d_model, self.d_sae, self.k = d_model, d_sae, k
        self.topk = TopK(k)
        gen = torch.Generator().manual_seed(seed)
        # The paper's released trainer (EvolvingLMMs-Lab/multimodal-sae train/sae/sae/sae.py, a fork of
        # EleutherAI's sae, today's sparsify): the encoder is nn.Linear(d_model, d_sae)'s default init,
        # U(-1/sqrt(d_model), 1/sqrt(d_model)) (kaiming_uniform_ with a=sqrt(5)), b_enc = 0, and the
        # decoder rows are the encoder rows scaled to unit norm. So here W_dec has unit-norm rows (one
        # per latent) and W_enc = W_dec^T times each latent's encoder-row norm (~1/sqrt(3): d_model
        # entries of variance 1/(3 d_model)), i.e. the same directions but not the same scale.
        # openai/sparse_autoencoder initialises differently: unit-norm decoder columns (one per latent) and
        # the encoder set to exactly the decoder's transpose. We have not measured how the two compare.
        w_enc = torch.empty(d_sae, d_model, dtype=torch.float32)
        nn.init.kaiming_uniform_(w_enc, a=math.sqrt(5), generator=gen)
        w_dec = w_enc / (w_enc.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
        self.W_dec = nn.Parameter(w_dec.to(dtype))
        self.W_enc_T = nn.Parameter(w_enc.to(dtype))  # (d_sae, d_model), contiguous: latent-major storage
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_model, dtype=dtype))
        self.register_state_dict_post_hook(_state_dict_in_saelens_layout)
        self.register_load_state_dict_pre_hook(_load_state_dict_from_saelens_layout)

    @property
    def W_enc(self) -> torch.Tensor:
        """(d_model, d_sae) encoder weight, SAELens's layout: a view of ``W_enc_T`` (in-place edits
        reach the parameter; its gradient is ``W_enc_T.grad``, transposed)."""
        return self.W_enc_T.T

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_model) -> (..., d_sae) encoder pre-activations (dense, differentiable)."""
        flat = (x - self.b_dec).reshape(-1, self.d_model)
        return torch.addmm(self.b_enc, flat, self.W_enc).reshape(*x.shape[:-1], self.d_sae)

    def _select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., d_model) -> top values (..., k), indices (..., k), pre (..., d_sae); sparse backward
        (leading dimensions, e.g. batch and sequence, are flattened for the step and restored)."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.d_model)
        with torch.no_grad():
            pre = self.pre_acts(x)
            _, idx = self.topk(pre)
        vals = gather_selected(self, x, pre, idx).relu()
        return vals.reshape(*lead, self.k), idx.reshape(*lead, self.k), pre.reshape(*lead, self.d_sae)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference encoder: (n, d_model) -> (values, indices), each (n, k): the k largest ReLU'd
        pre-activations (differentiable in x and the encoder's parameters, sparse backward)."""
        vals, idx, _ = self._select(x)
        return vals, idx

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference activation on dense pre-activations: (n, d_sae) -> (values, indices), each (n, k),
        as :meth:`encode` selects them (for callers that edit ``pre`` first, e.g. a steering clamp)."""
        return self.topk(pre)

    def reconstruction_loss(self, x: torch.Tensor, out: SAEOutput, full_fvu: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss's reconstruction term: FVU(x, out.x_hat) (``full_fvu`` when already computed).
        Matryoshka SAEs add their inner prefixes (:mod:`mmsae.sae.batchtopk`)."""
        return fvu(x, out.x_hat) if full_fvu is None else full_fvu

    def decode(self, top_vals: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """(n, k) values and indices -> (n, d_model) reconstruction, without forming (n, d_sae).

        An ``embedding_bag`` over the k selected rows of W_dec: its backward gives W_dec a gradient
        in those rows only and ``top_vals`` its (n, k) gradient.
        """
        return self._decode_rows(top_vals, top_idx) + self.b_dec

    def _decode_rows(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(..., k) values and indices -> (..., d_model) sum of the selected W_dec rows."""
        lead, n = idx.shape[:-1], idx.shape[-1]
        rows = F.embedding_bag(idx.reshape(-1, n), self.W_dec, per_sample_weights=vals.reshape(-1, n).to(self.W_dec.dtype),
                               mode="sum")
        return rows.reshape(*lead, self.d_model)

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d_model) -> (n, d_sae) dense latents (zeros outside the top k)."""
        vals, idx = self.encode(x)
        # scatter_add_: BatchTopK's padding (index 0, value 0) must not overwrite an active latent 0
        return torch.zeros(*vals.shape[:-1], self.d_sae, dtype=vals.dtype, device=x.device).scatter_add_(-1, idx, vals)

    def forward(self, x: torch.Tensor) -> SAEOutput:
        """Training forward: (n, d_model) -> :class:`SAEOutput` (for TopK the same latents as :meth:`encode`)."""
        vals, idx, pre = self._select(x)
        return SAEOutput(self.decode(vals, idx), vals, idx, pre)

    def auxk_loss(self, x: torch.Tensor, out: SAEOutput, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
        """AuxK loss (Gao et al. 2024 §A.2): dead latents reconstruct the detached residual.

        Args:
            x: (n, d_model) input; out: this batch's forward output.
            dead: (d_sae,) bool mask of dead latents.
            k_aux: latents used (typically d_model // 2); capped at the number of dead latents.

        Returns:
            Scalar: ||e - e_hat||^2 / ||e - mean(e)||^2 with e = x - x_hat (detached), e_hat the
            decoder (without b_dec) applied to the top ``k_aux`` dead pre-activations (ReLU'd); 0
            when no latent is dead. The selection reads only the dead latents' columns of
            ``out.pre``; gradients reach the k_aux selected latents per token only.
        """
        dead_idx = dead.nonzero().flatten()
        if len(dead_idx) == 0:
            return x.new_zeros(())
        k_aux = min(k_aux, len(dead_idx))
        residual = (x - out.x_hat).detach()
        with torch.no_grad():
            pre_dead = out.pre if len(dead_idx) == self.d_sae else out.pre.index_select(1, dead_idx)
            _, local = pre_dead.topk(k_aux, dim=-1, sorted=False)
            idx = dead_idx[local]
        vals = gather_selected(self, x, out.pre, idx).relu()
        loss = fvu(residual, self._decode_rows(vals, idx))
        return torch.nan_to_num(loss, nan=0.0)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale each decoder row (one latent's direction) to unit L2 norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Remove from W_dec.grad the component parallel to each (unit) decoder row."""
        if self.W_dec.grad is None:
            return
        # Row-wise dot products as a batched (1 x d_model) @ (d_model x 1) matmul, then one fused
        # in-place pass: no (d_sae, d_model) temporary (linalg.vecdot multiplies elementwise into
        # one first: 0.20 s against 0.04 s at d_sae 32768, d_model 2048 on 2 CPU cores).
        parallel = torch.bmm(self.W_dec.grad.unsqueeze(1), self.W_dec.unsqueeze(2)).squeeze(2)
        self.W_dec.grad.addcmul_(parallel, self.W_dec, value=-1.0)

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor, method: str = "geometric_median", iters: int = 100) -> None:
        """Initialise b_dec from a data sample (n, d_model): its ``mean`` or ``geometric_median``.

        The geometric median is computed with Weiszfeld's algorithm.
        """
        sample = sample.to(self.b_dec.device, torch.float32)
        center = sample.mean(0)
        if method == "geometric_median":
            for _ in range(iters):
                w = 1.0 / (sample - center).norm(dim=1).clamp_min(1e-6)
                new = (w[:, None] * sample).sum(0) / w.sum()
                if (new - center).norm() < 1e-6 * center.norm().clamp_min(1.0):
                    center = new
                    break
                center = new
        elif method != "mean":
            raise ValueError(f"sae.b_dec_init: {method!r} is not one of mean, geometric_median")
        self.b_dec.copy_(center.to(self.b_dec.dtype))
