"""One trainer loop for the SAE (TopK, BatchTopK or Matryoshka BatchTopK, ``sae.architecture``): Adam
with warm-up and linear decay (:mod:`mmsae.sae.schedule`), AuxK, checkpoints, resume.

Hyperparameters follow Gao et al. 2024 and the paper's reference code (docs/methods.md, 'TopK SAE'):
lr = 2e-4 / sqrt(d_sae / 2^14) unless set, gradient clipping 1.0, AuxK with k_aux = d_model // 2 and
coefficient 1/32, a latent is dead after ``dead_tokens`` training tokens without firing.

Under ``torch.distributed`` (torchrun, see :mod:`mmsae.sae.run`) each rank trains on its own stream
with batch_size / world_size rows; the SAE is wrapped in DistributedDataParallel, which averages the
gradients; the "tokens since fired" counters use global token counts and a latent fired on any rank,
the logged scalars are averaged over ranks (:mod:`mmsae.sae.distributed`), and rank 0 writes the
checkpoints.

Resume: a checkpoint (SAE, optimiser, step, dead-latent counters, per-latent fire counts, the per-step log, training seconds
so far, every random state and the CPU thread count; :mod:`mmsae.sae.checkpoint`) is written
atomically every ``checkpoint_every`` steps; a new :func:`train` call with the same checkpoint
directory loads it and replays the data stream up to that step. On CPU the resumed run's weights are
bit-identical to an uninterrupted run's (same torch build); on GPU they agree up to the
non-determinism of the CUDA kernels.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import torch
from tqdm import tqdm

from mmsae.core.io import config_hash
from mmsae.sae.checkpoint import load_checkpoint, reproducible, save_checkpoint
from mmsae.sae.data import ActivationStream
from mmsae.sae.distributed import maybe_all_reduce, maybe_barrier, maybe_ddp, rank_world
from mmsae.sae.batchtopk import make_sae, smallest_kept
from mmsae.sae.model import SAEOutput, TopKSAE, fvu
from mmsae.sae.schedule import lr_at

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 5  # hashed with the config: checkpoints of another layout are not resumed (3: W_enc_T, contiguous Adam moments; 4: tokens_seen_* in the log; 5: fire_counts)


@dataclass
class TrainConfig:
    """The ``sae`` section of the config (less ``name`` and ``gpus``) plus the device: everything the
    trained SAE depends on (hashed into the checkpoint). The defaults are ``config/schema.yaml``'s,
    which documents each key (a test keeps the two equal)."""

    d_sae: int = 4608
    """Number of latents."""
    k: int = 32
    """Latents kept per token (TopK); per token on average over the batch (BatchTopK)."""
    architecture: str = "topk"
    """topk, batchtopk or matryoshka_batchtopk (:mod:`mmsae.sae.batchtopk`)."""
    matryoshka_prefixes: list[int] | None = None
    """matryoshka_batchtopk: the nested prefix lengths; None = d_sae/32, d_sae/8, d_sae/2."""
    steps: int = 1000
    """Optimiser steps."""
    batch_size: int = 1024
    """Tokens per step, over all ranks."""
    lr: float | None = None
    """Peak learning rate; None = 2e-4 / sqrt(d_sae / 2^14)."""
    warmup_steps: int = 100
    """Steps of linear warm-up."""
    lr_schedule: str = "flat_then_decay"
    """After warm-up: flat_then_decay or linear_decay (:mod:`mmsae.sae.schedule`)."""
    decay_start: float = 0.8
    """flat_then_decay: fraction of steps after which lr decays linearly to 0."""
    lr_decay_steps: int | None = None
    """linear_decay: the horizon (in steps) the decay reaches 0 at; None = ``steps``."""
    aux_coef: float = 1 / 32
    """AuxK coefficient; 0 turns AuxK off."""
    k_aux: int | None = None
    """Dead latents used by AuxK; None = d_model // 2."""
    dead_tokens: int = 100_000
    """A latent is dead after this many training tokens without firing."""
    grad_clip: float = 1.0
    """Gradient-norm clip; 0 turns clipping off."""
    b_dec_init: str = "geometric_median"
    """b_dec initialisation: geometric_median or mean of a training sample."""
    b_dec_init_tokens: int = 8192
    """Training tokens that sample has."""
    heldout_fraction: float = 0.1
    """Share of images (and text prompts) held out (:func:`mmsae.sae.data.heldout_sample_ids`)."""
    heldout_max_tokens: int = 65536
    """Held-out tokens evaluated at most."""
    buffer_tokens: int = 65536
    """Shuffle-buffer rows, over all ranks."""
    exclude_special_tokens: bool = True
    """Leave the manifest's special tokens out of training and evaluation."""
    normalize_activations: str = "none"
    """none or expected_average_only_in (SAELens; :mod:`mmsae.sae.norms`)."""
    exclude_norm_above: float | None = None
    """Leave out tokens with a norm above this multiple of the median; None keeps all."""
    seed: int = 0
    """Seeds the initial weights and the shuffling."""
    checkpoint_every: int = 200
    """Steps between checkpoints."""
    device: str = "cpu"
    """The resolved torch device to train on (``model.device`` after :func:`mmsae.core.gpu.resolve_device`)."""

    def learning_rate(self) -> float:
        """The peak learning rate: ``lr``, or Gao et al.'s 2e-4 / sqrt(d_sae / 2^14) when None."""
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.d_sae / 2**14)


def cfg_lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of 0-based ``step`` under ``cfg`` (see :mod:`mmsae.sae.schedule`)."""
    return lr_at(step, base=cfg.learning_rate(), steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                 schedule=cfg.lr_schedule, decay_start=cfg.decay_start, decay_steps=cfg.lr_decay_steps)


@torch.no_grad()
def evaluate(sae: TopKSAE, x: torch.Tensor, is_image: torch.Tensor, batch_size: int = 4096) -> dict:
    """Held-out metrics: FVU (overall, image tokens, text tokens), L0, share of latents never active.

    x: (n, d_model); is_image: (n,) bool. FVU per subset uses that subset's own mean.
    """
    if len(x) == 0:
        return {"n_tokens": 0}
    device = sae.W_enc.device
    x_hats, n_active = [], []
    fired = torch.zeros(3, sae.d_sae, dtype=torch.bool, device=device)  # all, image, text
    for i in range(0, len(x), batch_size):
        xb, mb = x[i : i + batch_size].to(device), is_image[i : i + batch_size].to(device)
        vals, idx = sae.encode(xb)  # the inference encoder (BatchTopK: the threshold), as every later stage
        x_hats.append(sae.decode(vals, idx).cpu())
        active = vals > 0
        n_active.append(active.sum(1).cpu())
        for row, mask in enumerate((torch.ones_like(mb), mb, ~mb)):
            fired[row, idx[mask][active[mask]]] = True
    x_hat, n_active = torch.cat(x_hats), torch.cat(n_active).float()
    never = (1 - fired.float().mean(1)).tolist()
    res = {
        "n_tokens": len(x),
        "fvu": fvu(x, x_hat).item(),
        "l0": n_active.mean().item(),
        "never_active_fraction": never[0],
    }
    for row, (name, mask) in enumerate((("image", is_image), ("text", ~is_image)), start=1):
        res[f"n_{name}_tokens"] = int(mask.sum())
        res[f"fvu_{name}"] = fvu(x[mask], x_hat[mask]).item() if mask.sum() > 1 else None
        res[f"l0_{name}"] = n_active[mask].mean().item() if mask.any() else None
        res[f"never_active_fraction_{name}"] = never[row] if mask.any() else None
    return res


def _subset_l0(active, mask):
    return active[mask].sum().item() / int(mask.sum()) if mask.any() else float("nan")


def _subset_fvu(x, x_hat, mask):
    return fvu(x[mask], x_hat[mask]).item() if mask.sum() > 1 else float("nan")



def make_optimizer(sae: TopKSAE, cfg: TrainConfig) -> torch.optim.Adam:
    """The trainer's optimiser: Adam at ``cfg.learning_rate()``, betas (0.9, 0.999), eps 6.25e-10
    (Gao et al. 2024; the schedule then sets each step's lr).

    Fused (one kernel over all parameters) on CPU and CUDA: the same update as the default
    implementation to float rounding (held-out FVU equal to 4 digits in ``bench/sae_throughput.py``),
    and the step's largest lever after the encoder matmul: one Adam step over a contiguous
    (32768, 2048) parameter takes 0.055 s fused against 0.126 s with ``foreach`` on 2 CPU cores (the
    SAE keeps every parameter contiguous for this: see :class:`~mmsae.sae.model.TopKSAE`).
    Elementwise, so deterministic for any thread count."""
    fused = all(p.device.type in ("cpu", "cuda") for p in sae.parameters())
    return torch.optim.Adam(sae.parameters(), lr=cfg.learning_rate(), betas=(0.9, 0.999), eps=6.25e-10, fused=fused)


def train_step(sae: TopKSAE, opt: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor, cfg: TrainConfig,
               model: torch.nn.Module | None = None) -> dict:
    """One optimiser step of the SAE, exactly as :func:`train` takes it (the benchmark
    ``bench/sae_throughput.py`` times this function).

    Forward, loss = FVU (Matryoshka: summed over the nested prefixes) + ``cfg.aux_coef`` * AuxK
    (AuxK over the ``dead`` latents with k_aux = ``cfg.k_aux`` or d_model // 2; skipped when aux_coef
    is 0), backward, removal of the decoder gradient parallel to each decoder row, gradient-norm
    clipping at ``cfg.grad_clip`` (0 = off), ``opt.step()``, unit-norm decoder rows; BatchTopK
    architectures then update their inference threshold (:func:`update_threshold`). The learning
    rate is whatever ``opt`` holds (:func:`train` sets it from the schedule before each step).

    Args:
        sae: the SAE (its parameters are what ``opt`` updates).
        opt: the optimiser (:func:`make_optimizer`).
        x: (n, d_model) activations on the SAE's device.
        dead: (d_sae,) bool, latents dead before this step.
        cfg: hyperparameters.
        model: what the forward runs through: the DistributedDataParallel wrapper of ``sae`` under
            ``torch.distributed`` (gradients averaged over ranks); None = ``sae``.

    Returns:
        ``out`` (the :class:`~mmsae.sae.model.SAEOutput`), and the scalar tensors ``loss``,
        ``fvu`` (of the full reconstruction) and ``aux_loss`` (still attached to the graph, not
        synchronised to the host).
    """
    out = (sae if model is None else model)(x)
    loss_fvu = fvu(x, out.x_hat)
    recon = sae.reconstruction_loss(x, out, loss_fvu)  # FVU; Matryoshka: summed over the nested prefixes
    k_aux = cfg.k_aux or sae.d_model // 2
    aux = sae.auxk_loss(x, out, dead, k_aux) if cfg.aux_coef > 0 else x.new_zeros(())
    loss = recon + cfg.aux_coef * aux
    opt.zero_grad(set_to_none=True)
    loss.backward()  # under DDP, gradients arrive averaged over ranks
    sae.remove_parallel_grads()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    opt.step()
    sae.normalize_decoder()
    if sae.architecture != "topk":
        update_threshold(sae, out)
    return {"out": out, "loss": loss, "fvu": loss_fvu, "aux_loss": aux}


@torch.no_grad()
def update_threshold(sae, out: SAEOutput) -> None:
    """BatchTopK's inference threshold follows the step's smallest kept activation
    (:meth:`~mmsae.sae.batchtopk.BatchTopKSAE.update_threshold`), averaged over the ranks that kept one."""
    m = smallest_kept(out)
    found = ~m.isnan()
    both = maybe_all_reduce(torch.stack([torch.where(found, m, torch.zeros_like(m)), found.to(m.dtype)]), "sum")
    sae.update_threshold(both[0] / both[1])  # 0 / 0 = NaN: no rank kept a latent, theta stays


@torch.no_grad()
def update_since_fired(since_fired: torch.Tensor, out: SAEOutput, is_image: torch.Tensor) -> torch.Tensor:
    """Advance the "tokens since last fired" counters in place after a step.

    since_fired: (3, d_sae) int64, rows: all tokens, image tokens, text tokens; out: the step's
    forward output; is_image: (n,) bool. Each row grows by the number of tokens of its kind (summed
    over ranks) and is reset to 0 for latents active (value > 0) on such a token on any rank.
    Returns the step's global token counts, (3,) int64: all, image, text.
    """
    active = out.top_vals > 0
    fired = torch.zeros_like(since_fired, dtype=torch.int32)
    counts = torch.zeros(3, dtype=torch.long, device=since_fired.device)
    for row, mask in enumerate((torch.ones_like(is_image), is_image, ~is_image)):
        counts[row] = mask.sum()
        fired[row, out.top_idx[mask][active[mask]]] = 1
    counts = maybe_all_reduce(counts, "sum")  # global token counts
    since_fired += counts[:, None]
    since_fired[maybe_all_reduce(fired, "max").bool()] = 0  # fired on any rank
    return counts


@torch.no_grad()
def count_fires(fire_counts: torch.Tensor, out: SAEOutput) -> None:
    """Add the step's firings to ``fire_counts`` in place: (d_sae,) int64, for each latent the number of
    training tokens (summed over ranks) on which it was active (value > 0, SAELens's ``feature_acts``
    nonzero). Over a whole run these counts give ``sparsity.safetensors`` (:func:`mmsae.sae.io.save_sparsity`)."""
    active = (out.top_vals > 0).flatten().long()
    fired = torch.zeros_like(fire_counts).index_add_(0, out.top_idx.flatten(), active)  # 0.1 ms at (1024, 32) on 2 CPU cores; bincount of the masked ids 10 ms
    fire_counts += maybe_all_reduce(fired, "sum")


def windowed_dead_fractions(since_fired: torch.Tensor, seen: list[int], dead_tokens: int) -> list[float | None]:
    """Share of latents dead (``since_fired >= dead_tokens``) per row of ``since_fired`` (all, image,
    text), or None for a row whose kind has seen fewer than ``dead_tokens`` tokens in all (``seen``):
    its counters cannot have reached the window yet, so 0 would be so by construction."""
    dead = (since_fired >= dead_tokens).float().mean(1).tolist()
    return [d if n >= dead_tokens else None for d, n in zip(dead, seen)]

def train(
    stream: ActivationStream,
    d_model: int,
    cfg: TrainConfig,
    ckpt_dir: str | os.PathLike,
    progress: bool = True,
    stop_after: int | None = None,
    keep_checkpoint: bool = False,
) -> tuple[TopKSAE, list[dict], torch.Tensor]:
    """Train (or resume training) an SAE of ``cfg.architecture`` on ``stream``.

    Under ``torch.distributed`` the SAE is wrapped in DistributedDataParallel (gradients averaged
    over ranks) and the dead-latent counters and logged scalars go through
    :func:`~mmsae.sae.distributed.maybe_all_reduce`; in one process both are no-ops.

    Args:
        stream: batches of activations (deterministic for its seed).
        d_model: input width.
        cfg: hyperparameters.
        ckpt_dir: where ``checkpoint.pt`` lives; a checkpoint with the same config hash is resumed,
            one with another hash is ignored (and replaced at the next save).
        stop_after: stop (after checkpointing) once this step is reached; simulates a killed job.
        keep_checkpoint: keep ``checkpoint.pt`` after the last step (by default it is removed once
            training completes, so only a killed run is ever resumed).

    Returns:
        (sae, log, fire_counts): the trained SAE, one dict per step (step, tokens, loss, fvu, aux_loss, l0,
        dead_fraction, lr, fvu_image, fvu_text, l0_image, l0_text, dead_fraction_image,
        dead_fraction_text (None until that modality has seen ``dead_tokens`` tokens:
        :func:`windowed_dead_fractions`), tokens_seen_image, tokens_seen_text (summed over ranks), elapsed_s: wall seconds spent in :func:`train` up to this step, summed
        over a killed run and its resumption), and fire_counts: (d_sae,) int64 on the CPU, the training
        tokens each latent was active on over all steps run so far (:func:`count_fires`; out of
        ``log[-1]["tokens"]`` tokens).
    """
    device = torch.device(cfg.device)
    with reproducible(device):
        return _train(stream, d_model, cfg, device, Path(ckpt_dir) / CHECKPOINT, progress, stop_after, keep_checkpoint)


def _train(stream, d_model, cfg, device, ckpt_path, progress, stop_after, keep_checkpoint):
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rank, _ = rank_world()
    sae = make_sae(cfg.architecture, d_model, cfg.d_sae, cfg.k, prefixes=cfg.matryoshka_prefixes, seed=cfg.seed).to(device)
    opt = make_optimizer(sae, cfg)
    chash = config_hash({**asdict(cfg), "device": None, "checkpoint_version": CHECKPOINT_VERSION, "d_model": d_model,
                         "data": stream.identity()})
    state = load_checkpoint(ckpt_path, chash, device)
    if state is not None:
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["optimizer"])
    else:
        sae.init_b_dec(stream.sample(cfg.b_dec_init_tokens), cfg.b_dec_init)
        # Tokens since each latent last fired: row 0 over all tokens, row 1 image tokens, row 2 text.
        state = {"step": 0, "since_fired": torch.zeros(3, cfg.d_sae, dtype=torch.long), "log": [], "train_seconds": 0.0,
                 "fire_counts": torch.zeros(cfg.d_sae, dtype=torch.long)}
    start, rows, seconds_before = state["step"], state["log"], state["train_seconds"]
    since_fired, fire_counts = state["since_fired"].to(device), state["fire_counts"].to(device)
    model = maybe_ddp(sae, device)  # every rank starts from rank 0's parameters (b_dec came from rank 0's data)

    def save(step: int) -> None:
        if rank == 0:
            save_checkpoint(ckpt_path, {"config_hash": chash, "step": step, "sae": sae.state_dict(), "optimizer": opt.state_dict(),
                                        "since_fired": since_fired.cpu(), "fire_counts": fire_counts.cpu(), "log": rows,
                                        "train_seconds": seconds_before + time.perf_counter() - t_start})
        maybe_barrier()

    # tokens seen so far per kind (all, image, text), summed over ranks: from the resumed log
    seen = [rows[-1]["tokens"], rows[-1]["tokens_seen_image"], rows[-1]["tokens_seen_text"]] if rows else [0, 0, 0]
    batches = stream.train_batches()
    for _ in range(start):  # the stream's position: replay what the checkpoint has already seen
        next(batches)
    bar = tqdm(range(start, cfg.steps), desc="train_sae", unit="step", disable=not progress, initial=start, total=cfg.steps)
    for step in bar:
        x, is_image = next(batches)
        x, is_image = x.to(device), is_image.to(device)
        lr = cfg_lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        step_out = train_step(sae, opt, x, since_fired[0] >= cfg.dead_tokens, cfg, model=model)
        out, loss, loss_fvu, aux = step_out["out"], step_out["loss"], step_out["fvu"], step_out["aux_loss"]
        with torch.no_grad():
            active = out.top_vals > 0
            counts = update_since_fired(since_fired, out, is_image).tolist()
            count_fires(fire_counts, out)
            seen = [a + b for a, b in zip(seen, counts)]
            dead_now = windowed_dead_fractions(since_fired, seen, cfg.dead_tokens)
            x_hat = out.x_hat.detach()
            means = maybe_all_reduce(torch.stack([loss, loss_fvu, aux, active.sum() / len(x)]).detach().double(), "mean")
            rows.append(
                {
                    "step": step,
                    "tokens": (step + 1) * cfg.batch_size,
                    **dict(zip(("loss", "fvu", "aux_loss", "l0"), means.tolist())),
                    "dead_fraction": (since_fired[0] >= cfg.dead_tokens).float().mean().item(),  # as before: the window is steps x batch
                    "lr": lr,
                    "fvu_image": _subset_fvu(x, x_hat, is_image),
                    "fvu_text": _subset_fvu(x, x_hat, ~is_image),
                    "l0_image": _subset_l0(active, is_image),
                    "l0_text": _subset_l0(active, ~is_image),
                    "dead_fraction_image": dead_now[1],
                    "dead_fraction_text": dead_now[2],
                    "tokens_seen_image": seen[1],
                    "tokens_seen_text": seen[2],
                    "elapsed_s": seconds_before + time.perf_counter() - t_start,
                }
            )
        if progress and step % 20 == 0:
            bar.set_postfix(fvu=f"{rows[-1]['fvu']:.3f}", dead=f"{rows[-1]['dead_fraction']:.2f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or done == stop_after:
            save(done)
        if done == stop_after:
            break
    bar.close()
    if len(rows) >= cfg.steps and not keep_checkpoint and rank == 0:
        ckpt_path.unlink(missing_ok=True)
    return sae, rows, fire_counts.cpu()


def log_table(rows: list[dict]) -> pa.Table:
    """The per-step log as an Arrow table (for ``log.parquet``)."""
    return pa.Table.from_pylist(rows)
