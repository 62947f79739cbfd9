"""Extraction overhead: `extract` (hook, token layout, Parquet shards on disk) versus the bare forward
pass up to the hooked layer on the same samples, in the same process.

    .venv/bin/python bench/extract_overhead.py [--model results/models/demo] [--images 4]
"""

import argparse
import tempfile
import time

import torch

from mmsae.activations import ExtractConfig, extract
from mmsae.data import build_corpus
from mmsae.data.corpus import load_image
from mmsae.models import ActivationCapture, load_subject_model, prepare_inputs, resolve_hook_point


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="results/models/demo")
    ap.add_argument("--hook-point", default="model.language_model.layers.15")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    s = load_subject_model(args.model)
    samples = build_corpus({"source": "skimage", "prompts": ["Describe this image."], "max_images": args.images,
                            "text_prompts": ["What is the capital of France?", "Write a haiku about the sea."]})
    loaded = [(x, load_image(x.image_path)[0] if x.image_path else None) for x in samples]
    module = resolve_hook_point(s.model, args.hook_point)

    def bare():
        with ActivationCapture(module, stop=True) as cap, torch.inference_mode():
            for x, img in loaded:
                cap.run(s.model, **prepare_inputs(s, [(x, img)]))

    def ours():
        with tempfile.TemporaryDirectory() as d:
            # batch_size 1, like the bare loop (and the default config): padding would be measured otherwise
            extract(s, samples, d, ExtractConfig(hook_point=args.hook_point, shard_tokens=4096, batch_size=1), "bench",
                    progress=False)

    bare(), ours()  # warm-up
    t_bare = min(_time(bare) for _ in range(args.repeats))
    t_ours = min(_time(ours) for _ in range(args.repeats))
    print(f"samples {len(samples)}  bare forward {t_bare:.3f}s  extract {t_ours:.3f}s  overhead {100 * (t_ours / t_bare - 1):+.1f}%")


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
