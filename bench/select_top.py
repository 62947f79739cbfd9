"""Top-activation selection versus a plain polars scan of the same code shards, and peak memory as
the number of shards grows (shards are copies of the default run's code shards).

Each measurement runs in a fresh subprocess so that peak RSS is its own.

    .venv/bin/python bench/select_top.py [--codes results/codes/manifest.json] [--copies 1 4 16]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import polars as pl
from mmsae.features import base_view_counts, feature_stats, scan_codes, top_samples
kind, d, acts = sys.argv[1], Path(sys.argv[2]), [Path(p) for p in json.loads(sys.argv[3])]
paths = sorted(d.glob("codes-*.parquet"))
t0 = time.perf_counter()
if kind == "scan":
    pl.scan_parquet([str(p) for p in paths]).select(pl.len(), pl.col("activation").sum()).collect(engine="streaming")
else:
    codes = scan_codes(paths)
    m = json.loads((d / "manifest.json").read_text())
    feature_stats(codes, m["n_tokens"], m["n_image_tokens"], m["n_text_tokens"])
    samples = pl.read_parquet(acts[0].parent / "samples.parquet")
    top_samples(codes, base_view_counts(acts, samples), n=5)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(kind, d, acts):
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(d), json.dumps([str(a) for a in acts])],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--codes", default="results/codes/manifest.json")
    ap.add_argument("--activations", default="results/activations/manifest.json")
    ap.add_argument("--copies", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args()
    src = Path(args.codes).parent
    manifest = json.loads(Path(args.codes).read_text())
    act_dir = Path(args.activations).parent
    acts = [act_dir / s["path"] for s in json.loads(Path(args.activations).read_text())["shards"]]
    print(f"{'shards':>6} {'rows':>10} {'scan_s':>7} {'select_s':>8} {'ratio':>6} {'scan_MB':>8} {'select_MB':>9}")
    for c in args.copies:
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            rows = 0
            for i in range(c):
                for s in manifest["shards"]:
                    shutil.copy(src / s["path"], d / f"codes-{i:03d}-{s['path'].split('-')[-1]}")
                    rows += s["n_rows"]
            m = {**manifest, "n_tokens": manifest["n_tokens"] * c, "n_image_tokens": manifest["n_image_tokens"] * c,
                 "n_text_tokens": manifest["n_text_tokens"] * c}
            (d / "manifest.json").write_text(json.dumps(m))
            scan, sel = run("scan", d, acts), run("select", d, acts)
            print(f"{c * len(manifest['shards']):>6} {rows:>10,} {scan['seconds']:>7.3f} {sel['seconds']:>8.3f} "
                  f"{sel['seconds'] / scan['seconds']:>6.1f} {scan['peak_rss_mb']:>8.0f} {sel['peak_rss_mb']:>9.0f}")


if __name__ == "__main__":
    main()
