"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Shapes: ``x`` is ``(n, d_model)``; latents are ``(n, d_sae)``. Parameters use SAELens's layout:
``W_enc (d_model, d_sae)``, ``b_enc (d_sae,)``, ``W_dec (d_sae, d_model)``, ``b_dec (d_model,)``.

    pre  = (x - b_dec) @ W_enc + b_enc                                   (encoder)
    z    = TopK_k(ReLU(pre))               keep the k largest, zero the rest
    x_hat = z @ W_dec + b_dec                                            (decoder)

Loss = FVU(x, x_hat) + aux_coef * AuxK, where FVU = ||x - x_hat||^2 / ||x - mean(x)||^2 over the
batch and AuxK reconstructs the detached residual e = x - x_hat from the top ``k_aux`` pre-activations
among dead latents (Gao et al. §A.2). Decoder rows stay at unit norm: after each optimiser step
:meth:`TopKSAE.normalize_decoder`, and before it :meth:`TopKSAE.remove_parallel_grads`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class SAEOutput(NamedTuple):
    """Result of :meth:`TopKSAE.forward`.

    x_hat: (n, d_model) reconstruction; top_vals, top_idx: (n, k) the kept latents;
    pre: (n, d_sae) pre-activations (for AuxK).
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


class TopKSAE(nn.Module):
    """TopK SAE with ReLU before TopK, unit-norm decoder rows and W_enc initialised as W_dec^T.

    Args:
        d_model: input width (the hooked layer's hidden size).
        d_sae: number of latents.
        k: latents kept per token (L0 = k, or fewer when fewer pre-activations are positive).
        seed: seeds the initial weights.

    Raises:
        ValueError: k is not in [1, d_sae].
    """

    def __init__(self, d_model: int, d_sae: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not 1 <= k <= d_sae:
            raise ValueError(f"sae.k: {k} must be between 1 and d_sae={d_sae}")
        self.d_model, self.d_sae, self.k = d_model, d_sae, k
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(d_sae, d_model, generator=gen, dtype=torch.float32)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec.to(dtype))
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous().to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_model, dtype=dtype))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d_model) -> (n, d_sae) encoder pre-activations."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, d_model) -> (values, indices), each (n, k): the k largest ReLU'd pre-activations."""
        return self._topk(self.pre_acts(x))

    def _topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return vals.relu(), idx

    def decode(self, top_vals: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """(n, k) values and indices -> (n, d_model) reconstruction, without forming (n, d_sae)."""
        # Gather k decoder rows per token: (n, k, d_model); cheaper than a dense matmul when k << d_sae.
        return torch.einsum("nk,nkd->nd", top_vals, self.W_dec[top_idx]) + self.b_dec

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d_model) -> (n, d_sae) dense latents (zeros outside the top k)."""
        vals, idx = self.encode(x)
        return torch.zeros(x.shape[0], self.d_sae, dtype=vals.dtype, device=x.device).scatter_(-1, idx, vals)

    def forward(self, x: torch.Tensor) -> SAEOutput:
        pre = self.pre_acts(x)
        vals, idx = self._topk(pre)
        return SAEOutput(self.decode(vals, idx), vals, idx, pre)

    def auxk_loss(self, x: torch.Tensor, out: SAEOutput, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
        """AuxK loss (Gao et al. 2024 §A.2): dead latents reconstruct the detached residual.

        Args:
            x: (n, d_model) input; out: this batch's forward output.
            dead: (d_sae,) bool mask of dead latents.
            k_aux: latents used (typically d_model // 2); capped at the number of dead latents.

        Returns:
            Scalar: ||e - e_hat||^2 / ||e - mean(e)||^2 with e = x - x_hat (detached), e_hat the
            decoder (without b_dec) applied to the top ``k_aux`` dead pre-activations; 0 when no
            latent is dead.
        """
        n_dead = int(dead.sum())
        if n_dead == 0:
            return x.new_zeros(())
        k_aux = min(k_aux, n_dead)
        residual = (x - out.x_hat).detach()
        masked = out.pre.masked_fill(~dead, float("-inf"))
        vals, idx = masked.topk(k_aux, dim=-1, sorted=False)
        e_hat = torch.einsum("nk,nkd->nd", vals.relu(), self.W_dec[idx])
        loss = fvu(residual, e_hat)
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
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec

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
