"""SAE training throughput (tokens/s) and held-out FVU: ours, SAELens, eai-sparsify and the roof,
on the same activations, d_model, d_sae, k, batch and steps, measured in one process.

Contestants (each as its own trainer runs a step; none is a project dependency - see
``bench/requirements.txt`` for the pinned versions and the install command):

``--architecture`` picks the SAE (``sae.architecture``): ``topk`` (default), ``batchtopk`` or
``matryoshka_batchtopk`` (:mod:`mmsae.sae.batchtopk`; ``--prefixes`` its nested prefix lengths,
default d_sae/32, d_sae/8, d_sae/2); SAELens runs its own training SAE of that architecture
(``BatchTopKTrainingSAE``, ``MatryoshkaBatchTopKTrainingSAE`` with ``matryoshka_widths`` = the same
prefixes); sparsify has no BatchTopK and sits those out.

- ours: the SAE of :func:`mmsae.sae.batchtopk.make_sae` stepped by :func:`mmsae.sae.trainer.train_step`, the
  function :func:`mmsae.sae.trainer.train` calls (forward, FVU + AuxK, backward, parallel-gradient
  removal, clipping, Adam, unit-norm decoder), then the trainer's dead-latent counters
  (:func:`~mmsae.sae.trainer.update_since_fired`) and fire counts (:func:`~mmsae.sae.trainer.count_fires`); optimiser from
  :func:`~mmsae.sae.trainer.make_optimizer`, hyperparameters from
  :class:`~mmsae.sae.trainer.TrainConfig`, b_dec from the geometric median as the trainer does. The
  trainer's checkpoint I/O and per-step log are left out.
- SAELens: ``TopKTrainingSAE`` driven by ``SAETrainer._train_step`` (its own step: forward, loss,
  backward, clipping, Adam), default TopK config, the same learning rate.
- sparsify: ``SparseCoder`` (fused sparse encoder, embedding_bag decoder) with the step its
  ``Trainer`` takes (b_dec = first batch's mean, FVU loss, parallel-gradient removal, Adam,
  unit-norm decoder), the same learning rate.
- roof: the encoder forward matmul alone (batch x d_model @ d_model x d_sae, plus bias), the one
  dense product a TopK step cannot avoid; its tokens/s bounds any TopK step from above.

Activations: synthetic, from a sparse ground-truth dictionary (each token a non-negative sum of 16
of 4*d_model unit directions, plus noise), so that FVU falls as an SAE learns. Held-out FVU is
measured on 4096 tokens never trained on, through each SAE as its trainer saves it for inference:
ours through ``encode``/``decode``; SAELens's BatchTopK SAEs through ``save_inference_model`` and
``SAE.load_from_disk`` (a ``jumprelu`` SAE with its estimated threshold), so L0 there is whatever
the threshold keeps and is printed beside the FVU. For the BatchTopK architectures the held-out FVU
of the training forward (the batch's top k x n latents, L0 exactly k for both) is printed as well,
``fvu_batch_*``: that is the comparison at equal L0. Timing is interleaved: each round runs ``--chunk`` steps
of every contestant in turn (ours, SAELens, sparsify, roof), after one untimed warm-up step each;
tokens/s is the median over rounds of each chunk's rate, so a busy shared CPU hits all alike.
The process runs under the allocator setting rule train_sae applies
(:func:`mmsae.sae.malloc.keep_freed_memory`: freed large blocks are reused, not unmapped), which every
contestant shares; ``--glibc-default`` runs them all without it.

    PYTHONPATH=. .venv/bin/python bench/sae_throughput.py --rounds 7 --chunk 5 --threads 1   # demo size
    PYTHONPATH=. .venv/bin/python bench/sae_throughput.py --d-model 2048 --d-sae 32768 --k 64 \
        --rounds 2 --chunk 1 --threads 1                                                    # larger size

On a CPU shared with other jobs prefer ``--threads 1``: with more OpenMP threads than free cores,
every parallel region waits on a descheduled thread and the figures turn to noise.
    ... --profile    # also print the top operators of two of our steps (torch.profiler)

    PYTHONPATH=. .venv/bin/python bench/sae_throughput.py --architecture batchtopk --d-model 256 \
        --d-sae 2048 --k 16 --batch 512 --rounds 10 --chunk 10 --threads 2                    # BatchTopK vs SAELens

Last line (machine-readable): ``sae_throughput architecture= d_model= d_sae= k= batch= steps= threads= malloc= ours_tok_s=
saelens_x= sparsify_x= roof_fraction= fvu_ours= fvu_saelens= fvu_sparsify= fvu_x= l0_ours= l0_saelens=
fvu_batch_ours= fvu_batch_saelens=``, where ``saelens_x`` and ``sparsify_x`` are our tokens/s over
theirs, ``roof_fraction`` ours over the roof's and ``fvu_x`` our held-out FVU over SAELens's; ``nan``
where a baseline cannot be imported or has no such architecture.
"""

import argparse
import math
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from mmsae.sae.malloc import keep_freed_memory
from mmsae.sae.batchtopk import ARCHITECTURES, make_sae, matryoshka_prefixes
from mmsae.sae.model import fvu
from mmsae.sae.trainer import TrainConfig, count_fires, make_optimizer, train_step, update_since_fired

try:
    from sae_lens import SAE as SAELensSAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer
except ImportError as exc:  # not a project dependency
    SAELENS_MISSING = f"sae_lens not importable ({exc}); install bench/requirements.txt"
else:
    SAELENS_MISSING = None
try:
    from sparsify import SparseCoder, SparseCoderConfig
except ImportError as exc:
    SPARSIFY_MISSING = f"sparsify (eai-sparsify) not importable ({exc}); install bench/requirements.txt"
else:
    SPARSIFY_MISSING = None


def synthetic(n: int, d_model: int, seed: int) -> torch.Tensor:
    """(n, d_model) activations: 16 of 4*d_model unit directions per token, exp(1) weights, noise."""
    gen = torch.Generator().manual_seed(seed)
    n_true = 4 * d_model
    dirs = torch.randn(n_true, d_model, generator=torch.Generator().manual_seed(1234))
    dirs /= dirs.norm(dim=1, keepdim=True)
    offset = torch.randn(d_model, generator=torch.Generator().manual_seed(4321))
    # Zipf-like feature frequencies, as in real activations
    probs = 1.0 / torch.arange(1, n_true + 1, dtype=torch.float64) ** 0.7
    idx = torch.multinomial(probs.expand(n, -1), 16, generator=gen)
    weights = torch.empty(n, 16).exponential_(generator=gen)
    x = F.embedding_bag(idx, dirs, per_sample_weights=weights, mode="sum")
    return x + 0.05 * torch.randn(n, d_model, generator=gen) + offset


class Ours:
    name = "ours"

    def __init__(self, args, first: torch.Tensor):
        self.cfg = TrainConfig(d_sae=args.d_sae, k=args.k, batch_size=args.batch, lr=args.lr, architecture=args.architecture,
                               matryoshka_prefixes=args.prefixes)
        self.sae = make_sae(args.architecture, args.d_model, args.d_sae, args.k, prefixes=args.prefixes, seed=self.cfg.seed)
        self.sae.init_b_dec(first, self.cfg.b_dec_init)
        self.opt = make_optimizer(self.sae, self.cfg)
        self.since_fired = torch.zeros(3, args.d_sae, dtype=torch.long)
        self.fire_counts = torch.zeros(args.d_sae, dtype=torch.long)
        self.is_image = torch.zeros(args.batch, dtype=torch.bool)

    def step(self, x: torch.Tensor) -> float:
        """The trainer's own step (:func:`mmsae.sae.trainer.train_step`), dead-latent counters and fire counts."""
        res = train_step(self.sae, self.opt, x, self.since_fired[0] >= self.cfg.dead_tokens, self.cfg)
        update_since_fired(self.since_fired, res["out"], self.is_image[:len(x)])
        count_fires(self.fire_counts, res["out"])
        return res["loss"].item()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Held-out reconstruction and L0 through the inference encoder (BatchTopK: the threshold)."""
        vals, idx = self.sae.encode(x)
        return self.sae.decode(vals, idx), (vals > 0).sum(1).float().mean().item()

    @torch.no_grad()
    def reconstruct_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Through the training forward (BatchTopK over the held-out batch)."""
        return self.sae(x).x_hat


class SAELens:
    name = "saelens"

    def __init__(self, args, first: torch.Tensor):
        common = dict(d_in=args.d_model, d_sae=args.d_sae, k=args.k, dtype="float32", device="cpu")
        if args.architecture == "topk":
            self.sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common))
        elif args.architecture == "batchtopk":
            self.sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
        else:
            self.sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
                **common, matryoshka_widths=matryoshka_prefixes(args.d_sae, args.prefixes)))
        self.architecture = args.architecture
        # SAELens initialises b_dec to 0 and leaves a data-dependent init to its runner; without one
        # its FVU after a few steps measures the activations' offset, not the step: start from the
        # batch mean, as sparsify's trainer does (ours starts from the geometric median).
        self.sae.b_dec.data = first.mean(0)
        cfg = SAETrainerConfig(total_training_samples=10**9 * args.batch, train_batch_size_samples=args.batch,
                               lr=args.lr, lr_end=args.lr, lr_warm_up_steps=0, device="cpu")
        self.trainer = SAETrainer(cfg=cfg, sae=self.sae, data_provider=iter(()))

    def step(self, x: torch.Tensor) -> float:
        out = self.trainer._train_step(self.sae, x)
        self.trainer.n_training_steps += 1
        return out.loss.item()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Held-out reconstruction and L0 of the SAE as SAELens saves it for inference."""
        sae = self.sae
        if self.architecture != "topk":  # saved as jumprelu with its estimated threshold, and loaded back
            with tempfile.TemporaryDirectory() as tmp:
                self.sae.save_inference_model(tmp)
                sae = SAELensSAE.load_from_disk(tmp, device="cpu")
        z = sae.encode(x)
        return sae.decode(z), (z > 0).sum(1).float().mean().item()

    @torch.no_grad()
    def reconstruct_batch(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(self.sae.encode(x))  # the training SAE: BatchTopK over the held-out batch


class Sparsify:
    name = "sparsify"

    def __init__(self, args, first: torch.Tensor):
        torch.manual_seed(0)
        self.sae = SparseCoder(args.d_model, SparseCoderConfig(num_latents=args.d_sae, k=args.k), device="cpu")
        self.sae.b_dec.data = first.mean(0)  # as its Trainer does on the first batch
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=args.lr)

    def step(self, x: torch.Tensor) -> float:
        out = self.sae(x)
        out.fvu.backward()  # auxk_alpha defaults to 0 in sparsify
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        self.sae.set_decoder_norm_to_unit_norm()
        return out.fvu.item()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        return self.sae(x).sae_out, float(self.sae.cfg.k)


class Roof:
    """The encoder's forward matmul alone, in the faster of the two weight layouts."""

    name = "roof"

    def __init__(self, args, first: torch.Tensor):
        w = torch.randn(args.d_sae, args.d_model) / math.sqrt(args.d_model)
        self.b = torch.zeros(args.d_sae)
        self.w = min((w.T.contiguous(), w.T), key=lambda v: self._time(first, v))

    def _time(self, x, w):
        torch.addmm(self.b, x, w)
        t0 = time.perf_counter()
        torch.addmm(self.b, x, w)
        return time.perf_counter() - t0

    def step(self, x: torch.Tensor) -> float:
        return float(torch.addmm(self.b, x, self.w)[0, 0])


def profile(ours: Ours, batches) -> None:
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for x in batches:
            ours.step(x)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=48))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--architecture", choices=ARCHITECTURES, default="topk")
    ap.add_argument("--prefixes", type=int, nargs="+", default=None,
                    help="matryoshka_batchtopk: nested prefix lengths (default d_sae/32, d_sae/8, d_sae/2)")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over these)")
    ap.add_argument("--chunk", type=int, default=4, help="steps per contestant per round")
    ap.add_argument("--lr", type=float, default=None, help="default: 2e-4 / sqrt(d_sae / 2^14), for all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="also profile two of our steps")
    ap.add_argument("--glibc-default", action="store_true",
                    help="leave glibc malloc as it is (train_sae applies mmsae.sae.malloc.keep_freed_memory)")
    args = ap.parse_args()
    # The process-wide allocator setting train_sae runs under; every contestant shares it.
    malloc = "glibc default" if args.glibc_default else f"keep_freed_memory {keep_freed_memory()}"
    args.lr = args.lr or TrainConfig(d_sae=args.d_sae).learning_rate()
    torch.set_num_threads(args.threads)
    steps = 1 + args.rounds * args.chunk  # one warm-up step, then rounds x chunk timed steps
    data = synthetic(steps * args.batch, args.d_model, seed=0)
    heldout = synthetic(4096, args.d_model, seed=1)
    batches = [data[i * args.batch:(i + 1) * args.batch] for i in range(steps)]

    kinds = [Ours]
    no_arch = None if args.architecture == "topk" else f"no {args.architecture} SAE"
    for kind, missing in ((SAELens, SAELENS_MISSING), (Sparsify, SPARSIFY_MISSING or no_arch)):
        if missing:
            print(f"{kind.name}: {missing}: reported as nan")
        else:
            kinds.append(kind)
    kinds.append(Roof)
    runs = [kind(args, batches[0]) for kind in kinds]
    rates: dict[str, list[float]] = {r.name: [] for r in runs}
    for r in runs:  # warm-up step
        r.step(batches[0])
    for rnd in range(args.rounds):
        chunk = batches[1 + rnd * args.chunk:1 + (rnd + 1) * args.chunk]
        for r in runs:
            t0 = time.perf_counter()
            for x in chunk:
                r.step(x)
            rates[r.name].append(len(chunk) * args.batch / (time.perf_counter() - t0))
    tok_s = {name: statistics.median(v) for name, v in rates.items()}
    fvus, l0s, fvus_batch = {}, {}, {}
    for r in runs:
        if r.name != "roof":
            x_hat, l0s[r.name] = r.reconstruct(heldout)
            fvus[r.name] = fvu(heldout, x_hat).item()
        if hasattr(r, "reconstruct_batch") and args.architecture != "topk":
            fvus_batch[r.name] = fvu(heldout, r.reconstruct_batch(heldout)).item()

    load = os.getloadavg()
    print(f"{args.architecture}: d_model {args.d_model} d_sae {args.d_sae} k {args.k} batch {args.batch} steps {steps} "
          f"threads {args.threads} lr {args.lr:.3g}  malloc: {malloc}  load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for name, v in rates.items():
        fv = f"held-out FVU {fvus[name]:.4f} L0 {l0s[name]:.1f}" if name in fvus else "(encoder forward matmul only)"
        if name in fvus_batch:
            fv += f" (training forward: FVU {fvus_batch[name]:.4f} at L0 {args.k})"
        print(f"{name:15s} {tok_s[name]:>10,.0f} tokens/s  {fv}  rounds: " + " ".join(f"{r:,.0f}" for r in v))
    nan = float("nan")
    ours = tok_s["ours"]
    fields = {
        "architecture": args.architecture, "d_model": args.d_model, "d_sae": args.d_sae, "k": args.k, "batch": args.batch, "steps": steps,
        "threads": args.threads, "malloc": "default" if args.glibc_default else "keep_freed", "ours_tok_s": f"{ours:.0f}",
        "saelens_x": f"{ours / tok_s['saelens']:.3f}" if "saelens" in tok_s else nan,
        "sparsify_x": f"{ours / tok_s['sparsify']:.3f}" if "sparsify" in tok_s else nan,
        "roof_fraction": f"{ours / tok_s['roof']:.3f}",
        "fvu_ours": f"{fvus['ours']:.4f}", "fvu_saelens": f"{fvus.get('saelens', nan):.4f}",
        "fvu_sparsify": f"{fvus.get('sparsify', nan):.4f}",
        "fvu_x": f"{fvus['ours'] / fvus['saelens']:.3f}" if "saelens" in fvus else nan,
        "l0_ours": f"{l0s['ours']:.2f}", "l0_saelens": f"{l0s.get('saelens', nan):.2f}",
        "fvu_batch_ours": f"{fvus_batch.get('ours', nan):.4f}", "fvu_batch_saelens": f"{fvus_batch.get('saelens', nan):.4f}",
    }
    if args.profile:
        profile(runs[0], batches[1:3])
    print("sae_throughput " + " ".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
