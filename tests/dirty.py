"""A "dirty folder" of images: every kind of file a real image folder holds, and what extraction must
make of each (used, converted with a reason, or skipped with a reason).

:func:`make_dirty_folder` is reusable by any test (and by hand: ``python -m tests.dirty DIR``).
"""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def header_bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` RGB pixels (a decompression bomb to Pillow)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _png_chunk(b"IEND", b"")


def make_dirty_folder(d: str | Path) -> dict[str, str]:
    """Write the dirty folder into ``d``; return ``{relative path: expected outcome}``.

    Outcomes: ``ok``, ``converted ...`` (the status starts with it) or ``skip: <reason prefix>``.
    Name collisions: ``cat.png``/``cat.jpg`` (same stem) and ``my cup.png``/``my_cup.png`` (same
    slug) must stay four samples.
    """
    d = Path(d)
    (d / "sub").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    out = {}

    def save(name, img, expect, **kw):
        img.save(d / name, **kw)
        out[name] = expect

    save("cat.png", Image.fromarray(rgb), "ok")
    save("cat.jpg", Image.fromarray(rgb[::-1]), "ok", quality=95)
    save("my cup.png", Image.fromarray(rgb[:, ::-1]), "ok")
    save("my_cup.png", Image.fromarray(255 - rgb), "ok")
    save("sub/cat.png", Image.fromarray(rgb[::-1, ::-1]), "ok")
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), "converted from CMYK")
    save("deep16.png", Image.fromarray(rng.integers(0, 65535, (40, 50)).astype(np.uint16)), "converted from I")
    rgba = np.concatenate([rgb, np.full((48, 64, 1), 100, np.uint8)], -1)
    save("alpha.png", Image.fromarray(rgba, "RGBA"), "converted from RGBA")
    frames = [Image.fromarray(np.roll(rgb, 8 * i, axis=1)).convert("P") for i in range(3)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["animated.gif"] = "converted from P, first of 3 frames"
    save("one_pixel.png", Image.fromarray(rgb[:1, :1]), "skip: degenerate size")
    Image.fromarray(rgb).save(d / "full.jpg", quality=95)
    data = (d / "full.jpg").read_bytes()
    (d / "full.jpg").unlink()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    out["truncated.jpg"] = "skip: truncated"
    (d / "empty.jpg").write_bytes(b"")
    out["empty.jpg"] = "skip: unreadable"
    (d / "notes.png").write_text("this is a text file renamed .png\n")
    out["notes.png"] = "skip: unreadable"
    (d / "bomb.png").write_bytes(header_bomb_png())
    out["bomb.png"] = "skip: decompression bomb"
    return out


if __name__ == "__main__":
    for name, expect in make_dirty_folder(sys.argv[1]).items():
        print(f"{name}\t{expect}")
