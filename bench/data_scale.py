"""Data at paper scale, measured: bytes per token on disk, train_sae's peak memory as data grows, and
extraction speed.

1. Bytes per token of dense activation shards (the real writer, :class:`mmsae.extract.run._ShardWriter`:
   the shard and its samples file, per token) at d_model 576 and 4096, float16 / bfloat16 / float32, with
   Gaussian activations (their mantissas do not compress, like real ones). bfloat16 goes through the real
   writer when the shard schema knows it; otherwise the raw 2-byte values are written as uint16 in the
   same schema and the figure is marked ``bf16_own=1`` (the storage the issue specifies, not the
   project's writer).
2. Bytes per token of sparse code shards (:data:`mmsae.codes.schema.CODE_SCHEMA`, k rows per token, written
   as :func:`mmsae.codes.rows.encode_shards` writes them) at k 32 and 256, d_sae 131072.
3. Peak RSS of train_sae (``python -m mmsae.sae.run``, the rule's entry into
   :func:`mmsae.sae.run.train_from_manifest`, in a child process; ``ru_maxrss`` of the child) streaming
   10^6 and 10^7 generated rows (real-schema shards, d_model 64, float32, one pass of training over the
   training rows), in a temporary folder deleted afterwards (about 3 GB for 10^7 rows: check ``df``).
4. Extraction images/s on this machine with the demo model (built into a temporary folder), a few
   scikit-image photos under one prompt, through :func:`mmsae.extract.run.extract`.

    PYTHONPATH=. .venv/bin/python bench/data_scale.py [--rows 1e6 1e7] [--images 4] [--tmp /tmp]

Last line (machine-readable):
    data_scale bpt_576_f16=… bpt_576_bf16=… bpt_576_f32=… bpt_4096_f16=… … codes_bpt_k32=… codes_bpt_k256=…
    rss_1e6_mb=… rss_1e7_mb=… images_s=… bf16_own=0|1
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from mmsae.extract.run import ExtractConfig, _ShardWriter, extract, write_manifest
from mmsae.data import build_corpus
from mmsae.codes.schema import CODE_SCHEMA
from mmsae.core.io import write_parquet
from mmsae.models import load_subject_model
from mmsae.models.demo import build_demo_model
from mmsae.core.shards import shard_schema

TOKENS_PER_SAMPLE = 1000
RSS_CHILD = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); " \
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def _sample_cols(i: int, n: int, x: np.ndarray, rng) -> tuple[dict, dict]:
    """One synthetic sample's shard columns and samples row (half image tokens, then text)."""
    n_img = n // 2
    view = np.where(np.arange(n) < n_img, 0, -1).astype(np.int16)
    cols = {"sample_id": f"img-{i:07d}-p0", "token_index": np.arange(n, dtype=np.int32),
            "token_id": rng.integers(0, 49152, n).astype(np.int32),
            "modality": np.where(view >= 0, "image", "text"), "view": view,
            "patch_row": np.where(view >= 0, np.arange(n) // 24, -1).astype(np.int16),
            "patch_col": np.where(view >= 0, np.arange(n) % 24, -1).astype(np.int16),
            "role": np.array(["user"] * n), "activation": x}
    row = {"sample_id": cols["sample_id"], "prompt": "Describe this image.", "image_path": f"/data/img/{i:07d}.jpg",
           "image_key": f"{i:07d}", "image_status": None, "image_height": 336, "image_width": 336, "n_tokens": n,
           "input_ids": cols["token_id"]}
    return cols, row


def write_shards(out: Path, d: int, dtype: str, n_tokens: int, shard_tokens: int, seed: int = 0) -> tuple[int, bool]:
    """Real-schema activation shards of ``n_tokens`` Gaussian rows; returns (bytes on disk, own bf16 fallback)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    meta = {"model": "bench", "revision": None, "hook_point": "model.language_model.layers.0", "layer": 0, "d_model": d,
            "dtype": dtype, "config_hash": "bench", "grid_side": 24}
    own = False
    try:
        schema = shard_schema(d, dtype)
    except KeyError:  # no bfloat16 in this branch's schema: raw 2-byte values as uint16
        own = True
        schema = shard_schema(d, "float32")
        schema = schema.set(schema.get_field_index("activation"), pa.field("activation", pa.list_(pa.uint16(), d)))
    writer = _ShardWriter(out, schema, meta, shard_tokens, 0)
    done, i = 0, 0
    while done < n_tokens:
        n = min(TOKENS_PER_SAMPLE, n_tokens - done)
        x = rng.standard_normal((n, d), dtype=np.float32)
        if dtype == "bfloat16":  # the raw 2-byte values the writer stores (truncated here; the size is what counts)
            x = (x.view(np.uint32) >> 16).astype(np.uint16)
        else:
            x = x.astype(np.float16 if dtype == "float16" else np.float32)
        writer.add(*_sample_cols(i, n, x, rng), {})
        done, i = done + n, i + 1
    writer.close()
    return sum(p.stat().st_size for p in out.iterdir()), own


def code_bytes_per_token(out: Path, k: int, d_sae: int = 131072, n_tokens: int = 4096) -> float:
    """Bytes per token of a code shard with k nonzero latents per token."""
    rng = np.random.default_rng(0)
    n = n_tokens * k
    tok = np.repeat(np.arange(n_tokens, dtype=np.int32), k)
    image = (tok % 2900) < 2300
    table = pa.table({
        "sample_id": pa.array([f"img-{t // 2900:07d}-p0" for t in tok.tolist()], pa.string()),
        "token_index": pa.array(tok % 2900, pa.int32()),
        "modality": pa.array(np.where(image, "image", "text"), pa.string()),
        "view": pa.array(np.where(image, 0, -1), pa.int16()),
        "patch_row": pa.array(np.where(image, (tok % 2900) // 24, 0), pa.int16(), mask=~image),
        "patch_col": pa.array(np.where(image, (tok % 2900) % 24, 0), pa.int16(), mask=~image),
        "feature": pa.array(rng.integers(0, d_sae, n).astype(np.int32)),
        "activation": pa.array(rng.exponential(1.0, n).astype(np.float32)),
    }).cast(CODE_SCHEMA)
    path = out / f"codes-k{k}.parquet"
    write_parquet(path, table, row_group_size=65536)
    return path.stat().st_size / n_tokens


def peak_rss_mb(tmp: Path, rows: int) -> tuple[float, float]:
    """(peak RSS in MB of train_sae streaming ``rows`` generated rows once, seconds)."""
    d = tmp / f"rss-{rows}"
    write_shards(d, 64, "float32", rows, shard_tokens=1 << 18)
    write_manifest(d, {"model": "bench", "revision": None, "hook_point": "model.language_model.layers.0", "layer": 0,
                       "d_model": 64, "dtype": "float32", "config_hash": "bench", "grid_side": 24}, [], [], lambda ids: [str(i[0]) for i in ids])
    batch = 16384
    opts = {"d_sae": 256, "k": 16, "batch_size": batch, "steps": max(1, int(rows * 0.9) // batch), "warmup_steps": 10,
            "checkpoint_every": 10**9, "dead_tokens": 10**6}
    cmd = [sys.executable, "-c", RSS_CHILD, sys.executable, "-m", "mmsae.sae.run", "--manifest", str(d / "manifest.json"),
           "--out", str(d / "sae"), "--ckpt", str(d / "ckpt"), "--opts", json.dumps(opts), "--device", "cpu"]
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - t
    shutil.rmtree(d)
    return int(out.stdout.strip().splitlines()[-1]) / 1024, seconds


def images_per_second(tmp: Path, n_images: int) -> float:
    """Extraction throughput (images/s, one prompt each) with the demo model on this machine."""
    model_dir = tmp / "demo"
    if not (model_dir / "config.json").is_file():
        build_demo_model(model_dir)
    subject = load_subject_model(str(model_dir), dtype="float32", device="cpu")
    samples = build_corpus({"source": "skimage", "names": ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left",
                                                           "retina"][:n_images], "prompts": ["Describe this image."]})
    hook = "model.language_model.layers.15"
    extract(subject, samples[:1], tmp / "warm", ExtractConfig(hook_point=hook), "w", progress=False)  # warm-up
    t = time.perf_counter()
    extract(subject, samples, tmp / "acts", ExtractConfig(hook_point=hook), "b", progress=False)
    return len(samples) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=float, nargs="*", default=[1e6, 1e7])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    args = ap.parse_args()
    print(f"load: {os.getloadavg()}, cpus: {os.cpu_count()}")
    fig, own_any = {}, False
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="data_scale-") as t:
        tmp = Path(t)
        for d in (576, 4096):
            for dtype, tag in (("float16", "f16"), ("bfloat16", "bf16"), ("float32", "f32")):
                n = 4096 if d == 576 else 2048
                size, own = write_shards(tmp / f"bpt-{d}-{dtype}", d, dtype, n, shard_tokens=n)
                own_any |= own
                fig[f"bpt_{d}_{tag}"] = size / n
                print(f"dense d_model {d} {dtype}{' (own uint16 writer)' if own else ''}: {size / n:,.0f} bytes/token")
        for k in (32, 256):
            fig[f"codes_bpt_k{k}"] = code_bytes_per_token(tmp, k)
            print(f"codes k {k}: {fig[f'codes_bpt_k{k}']:,.0f} bytes/token")
        for rows in args.rows:
            mb, s = peak_rss_mb(tmp, int(rows))
            fig[f"rss_{rows:.0e}".replace("+0", "").replace("+", "") + "_mb"] = mb
            print(f"train_sae streaming {int(rows):,} rows: peak RSS {mb:,.0f} MB ({s:.0f} s)")
        fig["images_s"] = images_per_second(tmp, args.images)
        print(f"extraction with the demo model: {fig['images_s']:.2f} images/s")
    fig["bf16_own"] = int(own_any)
    print(f"load: {os.getloadavg()}")
    print("data_scale " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fig.items()))


if __name__ == "__main__":
    main()
