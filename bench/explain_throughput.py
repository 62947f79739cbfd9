"""Explanation throughput against a local endpoint that answers after a fixed latency.

For concurrency 1, 4 and 16, sends N fresh (uncached) requests with image payloads like the real
prompt's and prints achieved requests/s against the ideal concurrency / latency.

    .venv/bin/python bench/explain_throughput.py [--latency 0.2] [--requests 64]
"""

import argparse
import asyncio
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mmsae.explain import EndpointConfig, Explainer
from mmsae.explain.cache import ResponseCache
from mmsae.explain.prompts import image_messages

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the scripted server is test code, not package code
from fake_server import FakeEndpoint  # noqa: E402


def png(seed: int, side: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.2, help="server latency per request, seconds")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--image-side", type=int, default=224, help="side of each of the 5 images (0: text only)")
    args = ap.parse_args()
    # 5 random images (~150 kB PNG each at 224 px, incompressible: a worst case), like a feature's top 5
    images = [png(i, args.image_side) for i in range(5)] if args.image_side else []
    print(f"{'concurrency':>11} {'requests':>8} {'seconds':>8} {'req/s':>8} {'ideal':>8} {'ratio':>6}")
    for conc in (1, 4, 16):
        with FakeEndpoint(latency_s=args.latency) as ep, tempfile.TemporaryDirectory() as tmp:
            cfg = EndpointConfig(base_url=ep.base_url, model="bench", concurrency=conc)
            ex = Explainer(cfg, ResponseCache(Path(tmp) / "c.sqlite"), slots_dir=Path(tmp) / "slots")
            reqs = [image_messages(images, instruction=f"request {i} " + "{n}") for i in range(args.requests)]
            t0 = time.perf_counter()
            answers = asyncio.run(ex.complete_all(reqs))
            dt = time.perf_counter() - t0
            assert all(a["content"] for a in answers) and ep.max_in_flight <= conc
        rate, ideal = args.requests / dt, conc / args.latency
        print(f"{conc:>11} {args.requests:>8} {dt:>8.2f} {rate:>8.2f} {ideal:>8.2f} {rate / ideal:>6.2f}")


if __name__ == "__main__":
    main()
