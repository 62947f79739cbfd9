"""SAE training throughput (tokens/s) against the dense-matmul roof measured in the same run, and
against SAELens's TopK trainer on the same activations and hyperparameters when ``sae_lens`` can be
imported (it is not a project dependency: run this in an environment that has it, with this repo on
PYTHONPATH).

The roof: the same work as one training step done as plain dense matmuls - encoder forward
(batch x d_model @ d_model x d_sae), its backward (2 matmuls), and a dense decoder forward and
backward - timed with torch.matmul. Our step uses a sparse (gathered) decoder, so it can beat the
dense roof's FLOP count; the ratio printed is achieved tokens/s over the roof's tokens/s.

    .venv/bin/python bench/sae_throughput.py [--d-model 576] [--d-sae 4608] [--k 32] [--batch 1024]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from mmsae.shards import activation_schema
from mmsae.io import write_parquet
from mmsae.sae.data import ActivationStream
from mmsae.sae.model import fvu
from mmsae.sae.trainer import TrainConfig, train


def roof(d_model, d_sae, batch, steps=10):
    x, w = torch.randn(batch, d_model), torch.randn(d_model, d_sae)
    g, wd = torch.randn(batch, d_sae), torch.randn(d_sae, d_model)
    ops = [lambda: x @ w, lambda: g @ w.T, lambda: x.T @ g, lambda: g @ wd, lambda: (g @ wd) @ wd.T, lambda: g.T @ (g @ wd)]
    for op in ops:
        op()
    t0 = time.perf_counter()
    for _ in range(steps):
        for op in ops:
            op()
    dt = (time.perf_counter() - t0) / steps
    flops = 2 * batch * d_model * d_sae * 7  # 6 matmuls, one of them chained (7 products of that size)
    return batch / dt, flops / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n = args.batch * 8
    with tempfile.TemporaryDirectory() as d:
        x = rng.normal(size=(n, args.d_model)).astype(np.float32)
        table = pa.table({"sample_id": [f"s{i // 100}" for i in range(n)], "token_index": np.arange(n, dtype=np.int32),
                          "token_id": np.zeros(n, np.int32),
                          "modality": pa.array(["text"] * n).dictionary_encode().cast(pa.dictionary(pa.int8(), pa.string())),
                          "view": np.full(n, -1, np.int16), "patch_row": pa.nulls(n, pa.int16()), "patch_col": pa.nulls(n, pa.int16()),
                          "activation": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), args.d_model)},
                         schema=activation_schema(args.d_model))
        write_parquet(Path(d) / "shard-00000.parquet", table)
        stream = ActivationStream([Path(d) / "shard-00000.parquet"], batch_size=args.batch, buffer_tokens=4 * args.batch,
                                  heldout_fraction=0.0)
        cfg = TrainConfig(d_sae=args.d_sae, k=args.k, steps=args.steps, batch_size=args.batch, warmup_steps=1,
                          b_dec_init_tokens=1024, checkpoint_every=10**9, dead_tokens=10**9)
        train(stream, args.d_model, TrainConfig(**{**cfg.__dict__, "steps": 3}), Path(d) / "warm", progress=False)
        t0 = time.perf_counter()
        ours_sae, _ = train(stream, args.d_model, cfg, Path(d) / "ck", progress=False)
        ours = args.steps * args.batch / (time.perf_counter() - t0)
    xt = torch.from_numpy(x[: args.batch])
    with torch.no_grad():
        ours_fvu = fvu(xt, ours_sae(xt).x_hat).item()
    roof_tps, roof_flops = roof(args.d_model, args.d_sae, args.batch)
    print(f"d_model {args.d_model} d_sae {args.d_sae} k {args.k} batch {args.batch} steps {args.steps} threads {args.threads}")
    print(f"ours    {ours:>9,.0f} tokens/s  FVU {ours_fvu:.3f}")
    print(f"roof    {roof_tps:>9,.0f} tokens/s  ({roof_flops / 1e9:.1f} GFLOP/s dense matmul)   ours/roof {ours / roof_tps:.2f}")
    sl = saelens(x, args)
    if sl is not None:
        print(f"SAELens {sl[0]:>9,.0f} tokens/s  FVU {sl[1]:.3f}   ours/SAELens {ours / sl[0]:.2f}")
    else:
        print("SAELens not importable here: comparison skipped")


def saelens(x: np.ndarray, args):
    """SAELens's TopKTrainingSAE + SAETrainer on the same batches; (tokens/s, FVU) or None."""
    try:
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer
    except ImportError:
        return None
    data = torch.from_numpy(x)
    n_batches = len(data) // args.batch

    def provider():
        i = 0
        while True:
            j = i % n_batches
            i += 1
            yield data[j * args.batch:(j + 1) * args.batch]

    def run(steps):
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_model, d_sae=args.d_sae, k=args.k, dtype="float32", device="cpu"))
        tcfg = SAETrainerConfig(total_training_samples=steps * args.batch, train_batch_size_samples=args.batch,
                                lr=2e-4 / (args.d_sae / 2**14) ** 0.5, lr_end=0.0, lr_warm_up_steps=1, device="cpu")
        t0 = time.perf_counter()
        SAETrainer(cfg=tcfg, sae=sae, data_provider=provider()).fit()
        return sae, time.perf_counter() - t0

    run(3)  # warm-up
    sae, dt = run(args.steps)
    with torch.no_grad():
        xt = data[: args.batch]
        x_hat = sae.decode(sae.encode(xt))
    return args.steps * args.batch / dt, fvu(xt, x_hat).item()


if __name__ == "__main__":
    main()
