"""Extraction throughput on corpus.text_source passages: tokens per second of `extract` (forward up to
the hooked layer, token layout, Parquet shards) with the demo model on this machine's CPU threads,
and how many text tokens fit in a given extraction time budget.

    PYTHONPATH=. .venv/bin/python bench/text_extract_throughput.py [--model results/models/demo]
        [--tokens 8000] [--batch-sizes 1 4] [--as assistant] [--budget-s 90]

Last line (machine-readable):
    text_extract tokens_per_s_b<B>=<tok/s wall> tokens_per_cpu_s_b<B>=<tok per CPU-s> ... tokens_in_budget_b1=<tokens>
        threads=<n> load1=<1-minute load average at the end> omp_wait_policy=<OMP_WAIT_POLICY or default>

On a shared machine the wall figure depends on the load (note `uptime`); tokens per CPU-second with
--threads 1 is the steadier figure (it is the wall rate of one uncontended core). With more threads
than free cores, OpenMP's default spin-waiting makes --threads 2 several times slower than 1; compare
with OMP_WAIT_POLICY=PASSIVE in the environment (it must be set before torch is imported).
"""

import argparse
import os
import tempfile
import time

import torch

from mmsae.extract.run import ExtractConfig, extract
from mmsae.data.text_source import text_samples
from mmsae.models import load_subject_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="results/models/demo")
    ap.add_argument("--hook-point", default="model.language_model.layers.15")
    ap.add_argument("--tokens", type=int, default=8000, help="estimated text tokens to extract per setting")
    ap.add_argument("--passage-tokens", type=int, default=256)
    ap.add_argument("--as", dest="role", default="assistant", choices=["user", "assistant"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=90.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = load_subject_model(args.model)
    samples = text_samples({"name": "python-topics", "path": None, "max_tokens": args.tokens, "skip_tokens": 0,
                            "passage_tokens": args.passage_tokens, "as": args.role,
                            "prompt": "Explain a topic from the Python documentation."})
    cfg = ExtractConfig(hook_point=args.hook_point, shard_tokens=4096, dtype="float32")
    with tempfile.TemporaryDirectory() as d:  # warm-up
        extract(s, samples[:2], d, cfg, "warm", progress=False)
    rates = {}
    for b in args.batch_sizes:
        cfg = ExtractConfig(hook_point=args.hook_point, shard_tokens=4096, dtype="float32", batch_size=b)
        with tempfile.TemporaryDirectory() as d:
            t0, c0 = time.perf_counter(), time.process_time()
            m = extract(s, samples, d, cfg, f"b{b}", progress=False)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
        rates[b] = (m["n_tokens"] / dt, m["n_tokens"] / dc)
        print(f"batch_size={b}: {len(samples)} samples, {m['n_tokens']} tokens ({m['n_text_tokens']} text) in {dt:.1f} s wall, "
              f"{dc:.1f} s CPU = {rates[b][0]:.0f} tokens/s wall, {rates[b][1]:.0f} tokens per CPU-second", flush=True)
    figures = " ".join(f"tokens_per_s_b{b}={w:.0f} tokens_per_cpu_s_b{b}={c:.0f}" for b, (w, c) in rates.items())
    b0 = args.batch_sizes[0]
    print(f"text_extract {figures} tokens_in_budget_b{b0}={rates[b0][0] * args.budget_s:.0f} threads={args.threads} "
          f"load1={os.getloadavg()[0]:.1f} omp_wait_policy={os.environ.get('OMP_WAIT_POLICY', 'default')}")


if __name__ == "__main__":
    main()
