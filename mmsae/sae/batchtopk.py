"""BatchTopK and Matryoshka BatchTopK SAEs: the TopK SAE of :mod:`mmsae.sae.model` with another
sparsity rule in training, a threshold at inference, and (Matryoshka) a loss over nested prefixes.

Shapes as in :mod:`mmsae.sae.model`: ``x`` (n, d_model), ``pre`` (n, d_sae) pre-activations.

BatchTopK (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders", arXiv 2412.06410 §3).
In training the k * n largest ReLU'd pre-activations of the whole batch of n tokens are kept, not
the k largest of each token: L0 is k on average over the batch, higher on some tokens and lower on
others. That rule needs a batch, so inference replaces it with one threshold theta for every latent,

    z_i = pre_i  if pre_i > theta  else 0                       (a JumpReLU, theta >= 0)

theta estimates the expected smallest kept activation of a training batch (the paper's
E[min{z_i | z_i > 0}]): after each step, theta <- (1 - r) theta + r m with m the step's smallest
kept activation and r = :data:`THRESHOLD_RATE` = 0.01, SAELens's ``BatchTopKTrainingSAE.
update_topk_threshold`` rule and rate. SAELens starts theta at 0, so after t steps its theta is
still (1 - r)^t short of the average (37 % at 100 steps); ours starts at the first step's m.

Matryoshka BatchTopK (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level Features
with Matryoshka Sparse Autoencoders", arXiv 2503.17547; Nabeshima 2024). The encoder and the
BatchTopK rule are the same; the reconstruction loss is summed over nested prefixes of the
dictionary, m_1 < m_2 < ... < m_L = d_sae (``sae.matryoshka_prefixes``):

    loss = sum_l FVU(x, b_dec + sum_{i < m_l} z_i W_dec[i])      (+ AuxK on the full reconstruction)

so the first m_1 latents must reconstruct x on their own, the first m_2 must do better, and so on:
general features settle in the early latents instead of being absorbed into specific ones. At
inference it is a BatchTopK SAE (the same threshold, the full dictionary).

Sparse form. Each token's kept latents are returned as (n, w) values and indices, w the largest
number kept on any token of the batch (at least 1); shorter rows are padded with value 0 (index 0),
so the rest of the code reads them exactly as TopK's (n, k), where a ReLU'd zero can also sit: a
latent is active where its value is > 0. w can be many times k (one token keeps 200 latents where
the median keeps 4), so the arithmetic skips the padding: the encoder's sparse backward
(:class:`~mmsae.sae.model.EncoderGather`, which takes the kept (token, latent) pairs as a flat
list) and the ``embedding_bag`` decoder (one bag per token, nonzero values only) cost
k n d_model multiply-adds, as TopK's do.

Files. SAELens 6 saves both architectures for inference as ``jumprelu`` (``get_inference_config_class``
of ``BatchTopKTrainingSAEConfig``) with a ``threshold`` (d_sae,) tensor holding theta for every
latent (``process_state_dict_for_saving_inference``), and names the training architecture in
``metadata.training_architecture`` with its settings (``k``, ``matryoshka_widths``) in
``metadata.training_architecture_details``; :mod:`mmsae.sae.io` writes and reads that layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmsae.sae.model import EncoderGather, SAEOutput, TopKSAE, fvu

THRESHOLD_RATE = 0.01  # SAELens's BatchTopKTrainingSAEConfig.topk_threshold_lr
ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk")


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """BatchTopK's selection (Bussmann et al. 2024 §3): of the k * n largest entries of the whole
    (n, d_sae) batch ``pre``, those that are positive (a ReLU'd zero is not active).

    Returns their flat indices into ``pre`` (row * d_sae + latent), ascending, int64. The same set as
    ``pre.flatten().topk(k * n)`` (up to ties) but faster on a CPU (1024 x 4608, k = 32: that top-k
    alone takes 0.2 s): a strided sample's quantile gives a value ``lo`` about 2 k n entries deep;
    when at least k n entries reach ``lo`` (checked; otherwise every entry is a candidate) the top
    k n all do, so the exact top-k runs over those candidates only.
    """
    d_sae = pre.shape[-1]
    flat = pre.reshape(-1)
    n_keep = k * (flat.numel() // d_sae)
    if n_keep >= flat.numel():
        return (flat > 0).nonzero().squeeze(1)
    stride = max(1, flat.numel() // 65536)
    while math.gcd(stride, d_sae) != 1:  # a stride sharing a factor with d_sae would sample some latents only
        stride += 1
    sample = flat[::stride]
    rank = min(len(sample), math.ceil(2 * n_keep * len(sample) / flat.numel()) + 16)
    lo = sample.kthvalue(len(sample) - rank + 1).values
    cand = (flat >= lo).nonzero().squeeze(1)
    if len(cand) < n_keep:
        cand = torch.arange(flat.numel(), device=pre.device)
    top = cand[flat[cand].topk(n_keep, sorted=False).indices]
    return top[flat[top] > 0].sort().values


def padded(flat_idx: torch.Tensor, n: int, d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending flat indices (row * d_sae + latent) of the kept entries of an (n, d_sae) batch ->
    (idx, keep), each (n, w) with w = max(1, most kept in a row): row r's latents in ascending order
    in idx[r, :count_r] (keep True there), then index 0 with keep False."""
    rows, cols = flat_idx // d_sae, flat_idx % d_sae
    counts = torch.bincount(rows, minlength=n)
    w = max(1, int(counts.max())) if len(rows) else 1
    pos = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    idx = torch.zeros(n, w, dtype=torch.long, device=rows.device)
    keep = torch.zeros(n, w, dtype=torch.bool, device=rows.device)
    idx[rows, pos] = cols
    keep[rows, pos] = True
    return idx, keep


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE: :class:`~mmsae.sae.model.TopKSAE`'s parameters and initialisation, plus the
    inference threshold ``threshold`` (d_sae,), a buffer (every entry theta; 0 before training).

    :meth:`forward` is the training forward (BatchTopK over the batch); :meth:`encode` and
    :meth:`select` are the inference encoder (the threshold), which every stage after training uses.
    Both return the padded (n, w) form of the module docstring.

    Raises:
        ValueError: k is not in [1, d_sae].
    """

    architecture = "batchtopk"

    def __init__(self, d_model: int, d_sae: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__(d_model, d_sae, k, seed=seed, dtype=dtype)
        self.register_buffer("threshold", torch.zeros(d_sae, dtype=dtype))

    def _gather(self, x: torch.Tensor, pre: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (n, w) values (sparse backward, :class:`~mmsae.sae.model.EncoderGather`) and indices of the entries of
        ``pre`` whose ascending flat indices are ``kept``."""
        n, d_sae = pre.shape
        idx, keep = padded(kept, n, d_sae)
        vals = EncoderGather.apply(x, self.W_enc, self.b_enc, self.b_dec, pre, kept // d_sae, kept % d_sae)
        return vals.new_zeros(keep.shape).masked_scatter(keep, vals), idx  # row-major order = ascending kept

    def _select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training selection: BatchTopK over all tokens of ``x`` (..., d_model) -> values (n, w),
        indices (n, w), pre (n, d_sae), with n the number of tokens."""
        x = x.reshape(-1, self.d_model)
        with torch.no_grad():
            pre = self.pre_acts(x)
            kept = batch_topk(pre, self.k)
        vals, idx = self._gather(x, pre, kept)
        return vals, idx, pre

    def active(self, pre: torch.Tensor) -> torch.Tensor:
        """(n, d_sae) pre-activations -> ascending flat indices of the entries above the threshold (and
        above 0: SAELens's JumpReLU is ReLU(pre) * (pre > threshold))."""
        return (pre > self.threshold.clamp_min(0)).reshape(-1).nonzero().squeeze(1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference encoder: (n, d_model) -> values, indices (n, w): the latents above the threshold."""
        x = x.reshape(-1, self.d_model)
        with torch.no_grad():
            pre = self.pre_acts(x)
            kept = self.active(pre)
        return self._gather(x, pre, kept)

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference activation on dense (n, d_sae) pre-activations -> values, indices (n, w)."""
        idx, keep = padded(self.active(pre), *pre.shape)
        return pre.gather(1, idx).masked_fill(~keep, 0.0), idx

    def _decode_rows(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(..., w) values and indices -> (..., d_model) sum of the decoder rows of the nonzero values
        (one ``embedding_bag`` bag per token; the padding costs nothing)."""
        lead, w = idx.shape[:-1], idx.shape[-1]
        vals, idx = vals.reshape(-1, w), idx.reshape(-1, w)
        nz = vals.detach() != 0
        counts = nz.sum(1)
        rows = F.embedding_bag(idx[nz], self.W_dec, counts.cumsum(0) - counts, per_sample_weights=vals[nz].to(self.W_dec.dtype),
                               mode="sum")
        return rows.reshape(*lead, self.d_model)

    @torch.no_grad()
    def update_threshold(self, min_kept: torch.Tensor) -> None:
        """One step of the threshold estimate: theta <- (1 - r) theta + r * min_kept (r =
        :data:`THRESHOLD_RATE`); theta = min_kept at the first update (while theta is 0).

        Args:
            min_kept: 0-d tensor, the step's smallest kept activation (:func:`smallest_kept`); NaN
                (no latent kept) leaves theta as it is.
        """
        m = min_kept.to(self.threshold.dtype)
        new = torch.where(self.threshold == 0, m, (1 - THRESHOLD_RATE) * self.threshold + THRESHOLD_RATE * m)
        self.threshold.copy_(torch.where(m.isnan(), self.threshold, new))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_sae={self.d_sae}, k={self.k}"


def smallest_kept(out: SAEOutput) -> torch.Tensor:
    """0-d tensor: the smallest positive value among a forward's kept latents, NaN when none is."""
    v = out.top_vals.detach()
    m = torch.where(v > 0, v, torch.full_like(v, math.inf)).min()
    return torch.where(torch.isinf(m), torch.full_like(m, math.nan), m)


def matryoshka_prefixes(d_sae: int, prefixes: list[int] | None) -> list[int]:
    """The nested prefix lengths m_1 < ... < m_L = d_sae of a Matryoshka SAE.

    Args:
        d_sae: number of latents.
        prefixes: ``sae.matryoshka_prefixes``, strictly increasing lengths below d_sae (d_sae itself
            may end the list); None = d_sae/32, d_sae/8, d_sae/2 (each level 4x the last; levels below
            1 dropped).

    Returns:
        The lengths, ending with d_sae (SAELens's ``matryoshka_widths``).

    Raises:
        ValueError: a length outside [1, d_sae], or not strictly increasing.
    """
    if prefixes is None:
        prefixes = sorted({d_sae // 32, d_sae // 8, d_sae // 2} - {0})
    out = [int(m) for m in prefixes]
    if out and out[-1] == d_sae:
        out = out[:-1]
    if any(not 1 <= m < d_sae for m in out) or any(a >= b for a, b in zip(out, out[1:])):
        raise ValueError(f"sae.matryoshka_prefixes: {list(prefixes)} must be strictly increasing lengths in [1, d_sae={d_sae})")
    return out + [d_sae]


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE: a :class:`BatchTopKSAE` whose training loss sums the FVU of the
    nested prefixes ``prefixes`` (m_1 < ... < m_L = d_sae; :func:`matryoshka_prefixes`)."""

    architecture = "matryoshka_batchtopk"

    def __init__(self, d_model: int, d_sae: int, k: int, prefixes: list[int] | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        super().__init__(d_model, d_sae, k, seed=seed, dtype=dtype)
        self.prefixes = matryoshka_prefixes(d_sae, prefixes)

    def prefix_reconstructions(self, vals: torch.Tensor, idx: torch.Tensor) -> list[torch.Tensor]:
        """(n, w) values and indices -> one (n, d_model) reconstruction per inner prefix m_1..m_{L-1}:
        b_dec plus the decoder rows of the kept latents with index < m_l."""
        return [self.decode(vals.masked_fill(idx >= m, 0.0), idx) for m in self.prefixes[:-1]]

    def reconstruction_loss(self, x: torch.Tensor, out: SAEOutput, full_fvu: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar: sum over the prefixes of FVU(x, prefix reconstruction), the last being the full
        ``out.x_hat`` (its FVU ``full_fvu`` when already computed)."""
        full = fvu(x, out.x_hat) if full_fvu is None else full_fvu
        return full + sum(fvu(x, x_hat) for x_hat in self.prefix_reconstructions(out.top_vals, out.top_idx))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prefixes={self.prefixes}"


def make_sae(architecture: str, d_model: int, d_sae: int, k: int, *, prefixes: list[int] | None = None, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> TopKSAE:
    """The SAE of ``sae.architecture``: ``topk`` (:class:`~mmsae.sae.model.TopKSAE`), ``batchtopk``
    (:class:`BatchTopKSAE`) or ``matryoshka_batchtopk`` (:class:`MatryoshkaBatchTopKSAE`, with
    ``prefixes``; ignored by the others).

    Raises:
        ValueError: an unknown architecture; k outside [1, d_sae]; bad prefixes.
    """
    if architecture == "topk":
        return TopKSAE(d_model, d_sae, k, seed=seed, dtype=dtype)
    if architecture == "batchtopk":
        return BatchTopKSAE(d_model, d_sae, k, seed=seed, dtype=dtype)
    if architecture == "matryoshka_batchtopk":
        return MatryoshkaBatchTopKSAE(d_model, d_sae, k, prefixes, seed=seed, dtype=dtype)
    raise ValueError(f"sae.architecture: {architecture!r} is not one of {', '.join(ARCHITECTURES)}")
