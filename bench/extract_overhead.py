"""Extraction overhead: `extract` (image decode, hook, token layout, Parquet shards on disk) versus the
bare forward pass up to the hooked layer on the same samples (images decoded beforehand), in the same
process, timed interleaved (ours, bare, ours, bare, ...) so that load on the machine hits both alike.

Also: bytes per token on disk (everything extraction writes: shards, samples, vocabulary, summary), at
the model's d_model and projected to d_model 4096 (the paper's LLaVA-NeXT-8B, float16 storage): the
activation column scales with d_model, the rest per token does not.

    .venv/bin/python bench/extract_overhead.py [--model results/models/demo] [--images 4] [--repeats 7] [--profile]

Last line (machine-readable):
    extract_overhead median=<% wall> spread=<percentage points, max - min> bytes_per_token_576=<B> bytes_per_token_4096=<B>
"""

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from mmsae.extract.run import ExtractConfig, extract
from mmsae.data import build_corpus
from mmsae.data.corpus import load_image
from mmsae.models import ActivationCapture, load_subject_model, prepare_inputs, resolve_hook_point


def disk_bytes(out_dir: Path) -> tuple[int, int, int]:
    """(all bytes extraction wrote, bytes of the activation column, tokens) in ``out_dir``."""
    total = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    act, n = 0, 0
    for shard in out_dir.glob("shard-*.parquet"):
        md = pq.ParquetFile(shard).metadata
        n += md.num_rows
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            act += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns)
                       if rg.column(c).path_in_schema.startswith("activation"))
    return total, act, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="results/models/demo")
    ap.add_argument("--hook-point", default="model.language_model.layers.15")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="activation storage")
    ap.add_argument("--profile", action="store_true", help="print where extract spends its time (cProfile)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    s = load_subject_model(args.model)
    samples = build_corpus({"source": "skimage", "prompts": ["Describe this image."], "max_images": args.images,
                            "text_prompts": ["What is the capital of France?", "Write a haiku about the sea."]})
    loaded = [(x, load_image(x.image_path)[0] if x.image_path else None) for x in samples]
    module = resolve_hook_point(s.model, args.hook_point)
    # batch_size 1, like the bare loop (and the default config): padding would be measured otherwise
    cfg = ExtractConfig(hook_point=args.hook_point, shard_tokens=4096, batch_size=1, dtype=args.dtype)
    keep = Path(tempfile.mkdtemp(prefix="extract-bench-"))

    def bare():
        with ActivationCapture(module, stop=True) as cap, torch.inference_mode():
            for x, img in loaded:
                cap.run(s.model, **prepare_inputs(s, [(x, img)]))

    def ours(out=None):
        with tempfile.TemporaryDirectory() as d:
            extract(s, samples, out or d, cfg, "bench", progress=False)

    bare(), ours(keep)  # warm-up; keep one output to measure on disk
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        ours()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    overheads, cpu_overheads, t_b, t_o = [], [], [], []
    for _ in range(args.repeats):
        (wall_o, cpu_o), (wall_b, cpu_b) = _time(ours), _time(bare)
        t_o.append(wall_o)
        t_b.append(wall_b)
        overheads.append(100 * (wall_o / wall_b - 1))
        cpu_overheads.append(100 * (cpu_o / cpu_b - 1))
    med, spread = statistics.median(overheads), max(overheads) - min(overheads)
    total, act, n = disk_bytes(keep)
    d_model = s.model.config.get_text_config().hidden_size
    per_tok, act_per_tok = total / n, act / n
    projected = (per_tok - act_per_tok) + act_per_tok * 4096 / d_model
    print(f"samples {len(samples)}  tokens {n}  repeats {args.repeats}  storage {args.dtype}")
    print(f"bare forward  median {statistics.median(t_b):.3f}s  ({', '.join(f'{t:.3f}' for t in t_b)})")
    print(f"extract       median {statistics.median(t_o):.3f}s  ({', '.join(f'{t:.3f}' for t in t_o)})")
    print(f"overhead per pair (%): {', '.join(f'{o:+.1f}' for o in overheads)}")
    print(f"CPU-time overhead per pair (%, this process, all threads; steadier on a loaded machine): "
          f"{', '.join(f'{o:+.1f}' for o in cpu_overheads)}  median {statistics.median(cpu_overheads):+.1f}")
    print(f"on disk: {per_tok:.0f} B/token at d_model {d_model} ({act_per_tok:.0f} activation, {per_tok - act_per_tok:.0f} other); "
          f"projected {projected:.0f} B/token at d_model 4096 ({projected * 1e9 / 2**40:.2f} TiB per 1e9 tokens)")
    print(f"extract_overhead median={med:.1f}% spread={spread:.1f}pp bytes_per_token_{d_model}={per_tok:.0f} "
          f"bytes_per_token_4096={projected:.0f}")


def _time(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


if __name__ == "__main__":
    main()
