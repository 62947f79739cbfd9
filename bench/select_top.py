"""Top-activation selection (feature statistics + top samples, as rule select_top runs it) versus a
plain polars scan that reads the same columns, as the number of code shards grows; then rows/s and
peak RSS at 10^8 code rows.

Code shards are generated with the real schema (``mmsae.codes.schema.CODE_SCHEMA``): each sample has
two 12x12 image views and 40 text tokens, each token k features drawn from d_sae with density ~ id^(-3/4) (low ids common), with
exponential activations; two samples share each image file. Every measurement runs in a fresh
subprocess so that its peak RSS is its own. The 10^8-row set (~1.6 GB) is written under --tmp and
deleted afterwards.

    .venv/bin/python bench/select_top.py [--shards 2 8 32] [--rows-per-shard 400000] [--big-rows 1e8]

Scan and selection run interleaved (scan, iterate, select, scan, ...; ``--repeats`` rounds) so a
busy shared CPU slows all alike; the ratio is the median of the per-round ratios. ``iterate`` is the
selection's own batched read (:func:`mmsae.codes.stats.code_batches`, the columns as numpy) with no
aggregation: the part of the ratio that is the engine's decoding and batching, not the selection's
work. ``--profile``
prints cProfile's top functions of one selection at the largest shard count.

Last line: ``select_top shards=N ratio_vs_scan=R iterate_vs_scan=I rows_per_s_1e8=X peak_rss_mb_1e8=M ratio_vs_scan_1e8=R``.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmsae.codes.schema import CODE_SCHEMA  # noqa: E402

SIDE, N_TEXT, N_VIEWS, K, D_SAE = 12, 40, 2, 32, 16384
TOKENS_PER_SAMPLE = SIDE * SIDE * N_VIEWS + N_TEXT

CHILD = r"""
import cProfile, io, json, pstats, resource, sys, time
from pathlib import Path
import polars as pl
from mmsae.codes.stats import code_batches
from mmsae.codes.schema import scan_codes
from mmsae.codes.select import base_view_counts, stats_and_top_samples
kind, d, prof = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
if prof:
    profiler = cProfile.Profile()
    profiler.enable()
paths = sorted(d.glob("codes-*.parquet"))
t0 = time.perf_counter()
if kind == "scan":  # every column the selection reads, decoded and reduced trivially
    pl.scan_parquet([str(p) for p in paths]).select(
        pl.len(), pl.col("sample_id").str.len_bytes().sum(), (pl.col("modality") == "image").sum(), pl.col("view").sum(),
        pl.col("feature").sum(), pl.col("token_index").sum(), pl.col("activation").sum()).collect(engine="streaming")
    pl.read_parquet(d / "samples.parquet")
elif kind == "iterate":  # the selection's own batched read with no aggregation: the floor of its engine side
    for b in code_batches(scan_codes(paths)):
        for c in ("feature", "activation", "kind", "token_index"):
            b[c].to_numpy()
else:
    m = json.loads((d / "manifest.json").read_text())
    samples = pl.read_parquet(d / "samples.parquet")
    stats_and_top_samples(scan_codes(paths), m["n_tokens"], m["n_image_tokens"], m["n_text_tokens"],
                          base_view_counts(samples), n=5, rank_by="max")
dt = time.perf_counter() - t0
if prof:
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
    print(out.getvalue(), file=sys.stderr)
print(json.dumps({"seconds": dt, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def generate(out: Path, n_shards: int, samples_per_shard: int, seed: int = 0) -> int:
    """Write code shards and the codes' samples.parquet (with n_base_tokens); returns code rows."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    img = SIDE * SIDE * N_VIEWS
    view1 = np.concatenate([np.repeat(np.arange(N_VIEWS), SIDE * SIDE), np.full(N_TEXT, -1)]).astype(np.int16)
    prow1 = np.concatenate([np.tile(np.repeat(np.arange(SIDE), SIDE), N_VIEWS), np.full(N_TEXT, -1)]).astype(np.int16)
    pcol1 = np.concatenate([np.tile(np.arange(SIDE), SIDE * N_VIEWS), np.full(N_TEXT, -1)]).astype(np.int16)
    rows = n_img = 0
    for s in range(n_shards):
        sids = pa.array([f"s{s:04d}-{j:06d}" for j in range(samples_per_shard)])
        T = samples_per_shard * TOKENS_PER_SAMPLE
        token_sample = np.repeat(np.arange(samples_per_shard), TOKENS_PER_SAMPLE)  # (T,) sample of each token
        token_pos = np.tile(np.arange(TOKENS_PER_SAMPLE), samples_per_shard)  # (T,) position in its sample
        row_token = np.repeat(np.arange(T), K)  # (T*K,) token of each code row
        feats = (rng.random(T * K, dtype=np.float32) ** 4 * D_SAE).astype(np.int32)  # skewed: low ids common
        acts = rng.standard_exponential(T * K, dtype=np.float32)
        pos = token_pos[row_token]
        table = pa.table({"sample_id": sids.take(pa.array(token_sample[row_token])), "token_index": pos.astype(np.int32),
                          "modality": pa.array(["image", "text"]).take(pa.array((pos >= img).astype(np.int8))),
                          "view": view1[pos], "patch_row": prow1[pos], "patch_col": pcol1[pos],
                          "feature": feats, "activation": acts}).cast(CODE_SCHEMA)
        pq.write_table(table, out / f"codes-{s:05d}.parquet", row_group_size=65536)
        rows += table.num_rows
        n_img += samples_per_shard * img
    ids = [f"s{s:04d}-{j:06d}" for s in range(n_shards) for j in range(samples_per_shard)]
    pq.write_table(pa.table({"sample_id": ids, "image_path": [f"{i // 2}.jpg" for i in range(len(ids))],
                             "n_base_tokens": pa.array([SIDE * SIDE] * len(ids), pa.int32())}), out / "samples.parquet")
    n_tok = len(ids) * TOKENS_PER_SAMPLE
    (out / "manifest.json").write_text(json.dumps({"n_tokens": n_tok, "n_image_tokens": n_img, "n_text_tokens": n_tok - n_img}))
    return rows


def run(kind: str, d: Path, profile: bool = False) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(d), str(int(profile))], capture_output=True, text=True, check=True)
    if profile:
        print(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(d: Path, repeats: int) -> tuple[dict, dict, list[float], float]:
    """Interleaved scan, iterate, select, scan, ...: the medians of scan and select, the per-repeat
    select/scan ratios and the median iterate/scan ratio."""
    scans, iters, sels = [], [], []
    for _ in range(repeats):
        scans.append(run("scan", d))
        iters.append(run("iterate", d))
        sels.append(run("select", d))
    med = lambda xs: sorted(xs, key=lambda r: r["seconds"])[len(xs) // 2]  # noqa: E731
    it = sorted(b["seconds"] / a["seconds"] for a, b in zip(scans, iters))[len(scans) // 2]
    return med(scans), med(sels), [b["seconds"] / a["seconds"] for a, b in zip(scans, sels)], it


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--rows-per-shard", type=float, default=4e5)
    ap.add_argument("--big-rows", type=float, default=1e8, help="0 to skip the large run")
    ap.add_argument("--big-shards", type=int, default=64)
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--repeats", type=int, default=3, help="interleaved scan/select pairs per size (median)")
    ap.add_argument("--profile", action="store_true", help="print cProfile's top functions of one selection run")
    args = ap.parse_args()
    print(f"uptime: {Path('/proc/loadavg').read_text().split()[:3]} (load averages)")
    per_shard = max(1, round(args.rows_per_shard / (TOKENS_PER_SAMPLE * K)))
    print(f"{'shards':>6} {'rows':>12} {'scan_s':>7} {'select_s':>8} {'ratio':>6} {'ratios':>16} {'iterate':>7} {'scan_MB':>8} "
          f"{'select_MB':>9}")
    ratio = iterate = None
    for n in args.shards:
        with tempfile.TemporaryDirectory(dir=args.tmp) as d:
            rows = generate(Path(d), n, per_shard)
            scan, sel, ratios, iterate = measure(Path(d), args.repeats)
            ratio = sorted(ratios)[len(ratios) // 2]
            print(f"{n:>6} {rows:>12,} {scan['seconds']:>7.2f} {sel['seconds']:>8.2f} {ratio:>6.1f} "
                  f"{' '.join(f'{r:.1f}' for r in ratios):>16} {iterate:>7.2f} {scan['peak_rss_mb']:>8.0f} {sel['peak_rss_mb']:>9.0f}",
                  flush=True)
            if args.profile and n == args.shards[-1]:
                run("select", Path(d), profile=True)
    rate = rss = big_ratio = float("nan")
    if args.big_rows:
        d = Path(tempfile.mkdtemp(prefix="select-top-1e8-", dir=args.tmp))
        try:
            samples = max(1, round(args.big_rows / (TOKENS_PER_SAMPLE * K * args.big_shards)))
            rows = generate(d, args.big_shards, samples)
            scan, sel, ratios, _ = measure(d, 1)
            rate, rss, big_ratio = rows / sel["seconds"], sel["peak_rss_mb"], ratios[0]
            print(f"{rows:,} rows in {args.big_shards} shards: select {sel['seconds']:.1f} s, {rate:,.0f} rows/s, peak RSS {rss:.0f} MB; "
                  f"scan {scan['seconds']:.1f} s, {rows / scan['seconds']:,.0f} rows/s, peak RSS {scan['peak_rss_mb']:.0f} MB; "
                  f"ratio {big_ratio:.1f}")
        finally:
            shutil.rmtree(d, ignore_errors=True)
    print(f"uptime after: {Path('/proc/loadavg').read_text().split()[:3]}")
    print(f"select_top shards={args.shards[-1]} ratio_vs_scan={ratio:.2f} iterate_vs_scan={iterate:.2f} rows_per_s_1e8={rate:.0f} "
          f"peak_rss_mb_1e8={rss:.0f} ratio_vs_scan_1e8={big_ratio:.2f}")


if __name__ == "__main__":
    main()
