"""Disk projection (mmsae.extract.disk) against the bytes extraction really writes, and the paper config's projection.

Extracts a few scikit-image photos (and a text prompt) with the demo model (SmolLM2-135M inside a
LLaVA-NeXT, d_model 576) for each storage type and token fraction, and prints projected vs actual
bytes and bytes per written token; then the projection for the paper's LLaVA-NeXT-Data setup
(779k conversations, 2,928 image tokens at most per image, d_model 4096) at fractions 1 and 0.1.

    .venv/bin/python bench/extract_disk.py [--model results/models/demo] [--images 3]

Without --model (or when it does not exist) the demo model is built in a temporary folder.

Last line (machine-readable):
    extract_disk ratio_min=<actual/projected> ratio_max=<...> paper_tb_1=<TB> paper_tb_0.1=<TB>
"""

import argparse
import tempfile
from pathlib import Path

import torch

from mmsae.extract.run import ExtractConfig, extract
from mmsae.data import build_corpus
from mmsae.extract.disk import project_extraction_bytes
from mmsae.models import load_subject_model
from mmsae.models.demo import build_demo_model

PAPER = {"n_image_samples": 779_000, "n_text_samples": 0, "image_tokens": 2_928, "text_tokens": 300, "d_model": 4096,
         "dtype": "float16"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="results/models/demo")
    ap.add_argument("--hook-point", default="model.language_model.layers.15")
    ap.add_argument("--images", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="extract-disk-"))
    model = Path(args.model)
    if not model.exists():
        model = build_demo_model(tmp / "demo")
    s = load_subject_model(model)
    samples = build_corpus({"source": "skimage", "prompts": ["Describe this image."], "max_images": args.images,
                            "text_prompts": ["What is the capital of France?"]})
    ratios = []
    print(f"{'dtype':9} {'fraction':>8} {'tokens':>7} {'projected B':>12} {'actual B':>10} {'actual/proj':>11} {'B/token':>8}")
    for dtype in ("float32", "float16", "bfloat16"):
        for fraction in (1.0, 0.25):
            cfg = ExtractConfig(hook_point=args.hook_point, dtype=dtype, token_fraction=fraction, shard_tokens=1 << 20)
            m = extract(s, samples, tmp / f"{dtype}-{fraction}", cfg, "bench", progress=False, check_disk=False)
            ratio = m["actual_bytes"] / m["projected_bytes"]
            ratios.append(ratio)
            print(f"{dtype:9} {fraction:8.2f} {m['n_tokens']:7d} {m['projected_bytes']:12d} {m['actual_bytes']:10d} "
                  f"{ratio:11.2f} {m['actual_bytes'] / m['n_tokens']:8.0f}")
    paper = {f: project_extraction_bytes(**PAPER, fraction=f) / 1e12 for f in (1.0, 0.1)}
    print(f"paper config (779k conversations, <=2,928 image + ~300 text tokens, d_model 4096, float16): "
          f"{paper[1.0]:.1f} TB at fraction 1, {paper[0.1]:.2f} TB at 0.1")
    print(f"extract_disk ratio_min={min(ratios):.2f} ratio_max={max(ratios):.2f} paper_tb_1={paper[1.0]:.1f} "
          f"paper_tb_0.1={paper[0.1]:.2f}")


if __name__ == "__main__":
    main()
