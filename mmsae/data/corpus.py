"""Corpora of (image, prompt) and text-only samples, and tolerant image loading.

Three image sources, chosen by ``corpus.source`` in config:

* ``skimage``: colour photographs that scikit-image ships inside its wheel (no download);
* ``folder``: every image file under a directory (recursively);
* ``table``: a Parquet or CSV table with columns ``image`` (path, relative to the table, or empty
  for a text-only sample) and ``prompt``.

Each image is paired with every prompt of ``corpus.prompts`` (``folder``/``skimage``); the
``corpus.text_prompts`` are added as text-only samples. Images are loaded by :func:`load_image`,
which converts odd modes and rejects what cannot be used, with a reason.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# Colour photographs inside scikit-image's wheel (skimage/data), by the name skimage.data uses.
SKIMAGE_PHOTOS = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "retina": "retina.jpg",
}
MIN_SIDE = 8  # pixels; smaller images are degenerate
MAX_ASPECT = 20.0


@dataclass(frozen=True)
class Sample:
    """One model input: an optional image and a user prompt.

    Attributes:
        sample_id: unique, stable id (used as the key in every table).
        prompt: the user's text.
        image_path: path of the image file, or None for a text-only sample.
    """

    sample_id: str
    prompt: str
    image_path: str | None = None


def skimage_photo_paths(names: list[str] | None = None) -> dict[str, Path]:
    """Paths of scikit-image's bundled colour photographs, by name.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
        FileNotFoundError: the file is not inside the installed wheel.
    """
    import skimage

    root = Path(skimage.__file__).parent / "data"
    names = list(SKIMAGE_PHOTOS) if not names else names
    out = {}
    for name in names:
        if name not in SKIMAGE_PHOTOS:
            raise ValueError(f"corpus.names: unknown scikit-image photo {name!r}; known: {sorted(SKIMAGE_PHOTOS)}")
        path = root / SKIMAGE_PHOTOS[name]
        if not path.is_file():
            raise FileNotFoundError(f"corpus.names: {name!r} is not inside the installed scikit-image ({path})")
        out[name] = path
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _image_table(path: Path) -> list[tuple[str | None, str]]:
    import polars as pl

    if not path.is_file():
        raise FileNotFoundError(f"corpus.path: table {path} does not exist")
    df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
    for col in ("image", "prompt"):
        if col not in df.columns:
            raise ValueError(f"corpus table {path}: missing column {col!r} (has {df.columns})")
    rows = []
    for image, prompt in df.select("image", "prompt").iter_rows():
        if image:
            image = str(image) if os.path.isabs(str(image)) else str(path.parent / str(image))
        rows.append((image or None, str(prompt)))
    return rows


def build_corpus(corpus: dict, base_dir: str | os.PathLike = ".") -> list[Sample]:
    """Turn the ``corpus`` section of the config into a list of samples.

    Args:
        corpus: ``{"source": "skimage"|"folder"|"table", "names": [...], "path": ..., "prompts": [...],
            "text_prompts": [...], "max_images": int|None}``.
        base_dir: relative ``path`` values are resolved against it.

    Raises:
        ValueError / FileNotFoundError: naming the offending config field.
    """
    source = corpus.get("source", "skimage")
    prompts = list(corpus.get("prompts") or [])
    max_images = corpus.get("max_images")
    samples: list[Sample] = []
    if source in ("skimage", "folder"):
        if source == "skimage":
            images = {name: str(p) for name, p in skimage_photo_paths(corpus.get("names")).items()}
        else:
            root = Path(base_dir, corpus["path"])
            if not root.is_dir():
                raise FileNotFoundError(f"corpus.path: folder {root} does not exist")
            files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            images = {_slug(str(p.relative_to(root).with_suffix(""))): str(p) for p in files}
        if images and not prompts:
            raise ValueError("corpus.prompts: at least one prompt is needed to pair with the images")
        for name, path in list(images.items())[:max_images]:
            for j, prompt in enumerate(prompts):
                samples.append(Sample(f"img-{name}-p{j}", prompt, path))
    elif source == "table":
        rows = _image_table(Path(base_dir, corpus["path"]))
        n_img = 0
        for i, (image, prompt) in enumerate(rows):
            if image and max_images is not None and n_img >= max_images:
                continue
            n_img += bool(image)
            samples.append(Sample(f"row-{i:06d}", prompt, image))
    else:
        raise ValueError(f"corpus.source: {source!r} is not one of skimage, folder, table")
    for i, prompt in enumerate(corpus.get("text_prompts") or []):
        samples.append(Sample(f"txt-{i:04d}", prompt, None))
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("corpus: sample ids are not unique (two images with the same name?)")
    return samples


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        img = Image.fromarray(np.nan_to_num(scaled).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_image(path: str | os.PathLike) -> tuple[Image.Image | None, str]:
    """Open an image as 8-bit RGB, converting odd modes (CMYK, 16-bit, palette, alpha, grey).

    Returns:
        ``(image, "ok")`` or ``(image, "converted from MODE")``; ``(None, reason)`` when the file
        is missing, unreadable, truncated or degenerate (a side under 8 px, an aspect ratio over
        20, or a single colour). Never raises for bad image data.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            rgb = _to_rgb(img)
    except FileNotFoundError:
        return None, "missing file"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else f"unreadable ({type(exc).__name__}: {exc})"
        return None, reason
    w, h = rgb.size
    if min(w, h) < MIN_SIDE:
        return None, f"degenerate size {w}x{h}"
    if max(w, h) / min(w, h) > MAX_ASPECT:
        return None, f"degenerate aspect ratio {w}x{h}"
    if all(lo == hi for lo, hi in rgb.getextrema()):
        return None, "degenerate: a single colour"
    return rgb, "ok" if mode == "RGB" else f"converted from {mode}"


def resolve_image_ref(ref: str | None, base_dir: str | os.PathLike = ".") -> str | None:
    """A config's image reference -> a file path: a scikit-image photo name or a path (or None)."""
    if not ref:
        return None
    if ref in SKIMAGE_PHOTOS:
        return str(skimage_photo_paths([ref])[ref])
    path = Path(base_dir, ref)
    if not path.is_file():
        raise FileNotFoundError(f"image {ref!r}: neither a scikit-image photo name nor a file")
    return str(path)
