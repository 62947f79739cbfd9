"""Corpora of (image, prompt) and text-only samples, and tolerant image loading.

Three image sources, chosen by ``corpus.source`` in config:

* ``skimage``: colour photographs that scikit-image ships inside its wheel (no download);
* ``folder``: every image file under a directory (recursively);
* ``table``: a Parquet/CSV table with columns ``image``, ``prompt`` and optionally ``response``, or
  LLaVA-format conversations in JSON/JSONL or as published Parquet (LLaVA-NeXT-Data: images inside the
  rows), read as a stream (see :mod:`mmsae.data.tables`).

Each image is paired with every prompt of ``corpus.prompts`` (``folder``/``skimage``); the
``corpus.text_prompts`` are added as text-only samples. Images are loaded by :func:`load_image`,
which converts odd modes and rejects what cannot be used, with a reason.

Sample ids are unique and stable: ``img-<key>-p<j>`` with ``key`` the photo's name (``skimage``) or
the file's path relative to the folder, extension included (``folder``: ``cat.png`` and
``cat.jpg`` are two samples); ``row-<i>`` for table rows; ``txt-<i>`` for text prompts; ``text-<name>-<i>`` for the passages of
``corpus.text_source`` (natural English text, :mod:`mmsae.data.text_source`).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import skimage
from PIL import Image, ImageFile, UnidentifiedImageError

from mmsae.data.sample import Sample
from mmsae.data.parquet_images import parse_image_ref, read_image_bytes
from mmsae.data.tables import iter_table
from mmsae.data.text_source import text_samples

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


def skimage_photo_paths(names: list[str] | None = None) -> dict[str, Path]:
    """Paths of scikit-image's bundled colour photographs, by name.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
        FileNotFoundError: the file is not inside the installed wheel.
    """
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


def _folder_images(root: Path) -> dict[str, str]:
    """Image files under ``root`` by their path relative to it (extension included); other files are logged."""
    images, other = {}, []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if p.suffix.lower() in IMAGE_SUFFIXES:
            images[rel] = str(p)
        else:
            other.append(rel)
    if other:
        log.warning("corpus.path %s: %d files without an image suffix %s are not in the corpus: %s",
                    root, len(other), sorted(IMAGE_SUFFIXES), other[:20])
    return images


def table_samples(path: str | os.PathLike, max_images: int | None = None,
                  counts: dict[str, int] | None = None) -> Iterator[Sample]:
    """Samples of a ``table`` corpus (:func:`mmsae.data.tables.iter_table`), one row at a time.

    Row ``i`` (0-based, over the files in order) becomes ``row-<i>`` (at least 6 digits), with its
    image (a path or a Parquet image reference, loaded only by :func:`load_image`) or none. Every row
    is counted in ``counts`` (``rows``, ``image``, ``text``, ``skipped: over corpus.max_images``),
    and one log line gives the counts when the table is exhausted. Images that cannot be loaded are
    skipped (with the reason) by whoever loads them (extraction, the listing).
    """
    counts = {} if counts is None else counts
    for key in ("rows", "image", "text"):
        counts.setdefault(key, 0)
    over = "skipped: over corpus.max_images"
    for i, row in enumerate(iter_table(path)):
        counts["rows"] += 1
        if row.image and max_images is not None and counts["image"] >= max_images:
            counts[over] = counts.get(over, 0) + 1
            continue
        counts["image" if row.image else "text"] += 1
        sid = f"row-{i:06d}"
        yield Sample(sid, row.prompt, row.image, sid if row.image else None, row.turns)
    log.info("corpus table %s: %d rows: %d image samples, %d text-only samples%s", path, counts["rows"],
             counts["image"], counts["text"], f", {counts[over]} {over}={max_images}" if counts.get(over) else "")


def build_corpus(corpus: dict, base_dir: str | os.PathLike = ".") -> list[Sample]:
    """Turn the ``corpus`` section of the config into a list of samples.

    Args:
        corpus: ``{"source": "skimage"|"folder"|"table", "names": [...], "path": ..., "prompts": [...],
            "text_prompts": [...], "max_images": int|None, "text_source": dict|None}``; ``text_source``
            appends passages of natural text (:func:`mmsae.data.text_source.text_samples`).
        base_dir: relative ``path`` values are resolved against it.

    The result is a list (extraction, encoding and training index, slice and shuffle it). A
    ``table`` corpus is read as a stream (:func:`table_samples`); the list is built here. A sample
    holds no image, only its path or Parquet reference: about 0.7 KB of Python objects plus its text
    (prompt, turns, reference; measured 0.9 KB for a 4-turn conversation of 235 characters), so a
    LLaVA-NeXT-Data-sized list (779k conversations) takes a few GB, against 92 GB of Parquet.

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
            images = _folder_images(root)
        if images and not prompts:
            raise ValueError("corpus.prompts: at least one prompt is needed to pair with the images")
        for key, path in list(images.items())[:max_images]:
            for j, prompt in enumerate(prompts):
                samples.append(Sample(f"img-{key}-p{j}", prompt, path, key))
    elif source == "table":
        samples.extend(table_samples(Path(base_dir, corpus["path"]), max_images))
    else:
        raise ValueError(f"corpus.source: {source!r} is not one of skimage, folder, table")
    for i, prompt in enumerate(corpus.get("text_prompts") or []):
        samples.append(Sample(f"txt-{i:04d}", prompt, None))
    if corpus.get("text_source"):
        text_source = dict(corpus["text_source"])
        if text_source.get("path"):
            text_source["path"] = str(Path(base_dir, text_source["path"]))
        samples.extend(text_samples(text_source))  # tokens estimated from characters (no tokenizer here)
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"corpus: sample ids are not unique: {dup[:10]}")
    return samples


def corpus_part(samples: list[Sample], part: int, parts: int) -> list[Sample]:
    """The samples of job ``part`` (0-based) of ``parts``: every ``parts``-th sample from index ``part``.

    The one split of a corpus over jobs (extraction and encoding), so that a part's samples do not
    depend on which rule runs them.

    Raises:
        ValueError: ``part`` is not in ``0..parts-1``.
    """
    if not 0 <= part < parts:
        raise ValueError(f"part {part} is not in 0..{parts - 1} (extract.parts is {parts})")
    return samples[part::parts]


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


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[Image.Image | None, str]:
    """Open an image as 8-bit RGB, converting odd modes (CMYK, 16-bit, palette, alpha, grey).

    Args:
        path: the image file, or an image inside a Parquet row
            (:func:`mmsae.data.parquet_images.image_ref`, decoded from the row's bytes).
        max_pixels: larger images (width x height) are skipped as decompression bombs before their
            pixels are decoded (``corpus.max_image_pixels``); None = Pillow's ``Image.MAX_IMAGE_PIXELS``.

    Returns:
        ``(image, "ok")``, or ``(image, "converted from MODE")`` and/or ``"... first of N frames"``
        for an animated file (only its first frame is used); ``(None, reason)`` when the file is
        missing, unreadable, truncated, too large or degenerate (a side under 8 px, an aspect
        ratio over 20, or a single colour). Never raises for bad image data.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    source = path
    ref = parse_image_ref(path)
    if ref is not None:  # an image inside a Parquet row: decoded from its bytes
        try:
            data, why = read_image_bytes(*ref)
        except FileNotFoundError:
            return None, "missing file"
        except (IndexError, ValueError, OSError) as exc:
            return None, f"unreadable ({type(exc).__name__}: {exc})"
        if data is None:
            return None, why
        source = io.BytesIO(data)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit  # Pillow refuses more than 2x this in open()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # sizes are checked below
            with Image.open(source) as img:
                w, h = img.size
                if limit is not None and w * h > limit:
                    return None, f"decompression bomb: {w}x{h} pixels, over max_image_pixels={limit}"
                frames = getattr(img, "n_frames", 1)
                img.load()
                mode = img.mode
                rgb = _to_rgb(img)
    except FileNotFoundError:
        return None, "missing file"
    except Image.DecompressionBombError as exc:
        return None, f"decompression bomb: {exc}"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else f"unreadable ({type(exc).__name__}: {exc})"
        return None, reason
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
    w, h = rgb.size
    if min(w, h) < MIN_SIDE:
        return None, f"degenerate size {w}x{h}"
    if max(w, h) / min(w, h) > MAX_ASPECT:
        return None, f"degenerate aspect ratio {w}x{h}"
    if all(lo == hi for lo, hi in rgb.getextrema()):
        return None, "degenerate: a single colour"
    status = "ok" if mode == "RGB" else f"converted from {mode}"
    if frames > 1:
        status = f"{'converted:' if mode == 'RGB' else status + ','} first of {frames} frames"
    return rgb, status


def resolve_image_ref(ref: str | None, base_dir: str | os.PathLike = ".", corpus: dict | None = None) -> str | None:
    """A config's image reference -> a file path (or None for no image).

    ``ref`` is a scikit-image photo name (``chelsea``), a path (relative to ``base_dir``), or, with
    a ``folder`` ``corpus``, a file of the corpus named by its path relative to the folder or by its
    stem when exactly one file has that stem (``cat`` for ``cat.png``).

    Raises:
        ValueError: the stem names several corpus files (the message lists them).
        FileNotFoundError: nothing matches.
    """
    if not ref:
        return None
    if ref in SKIMAGE_PHOTOS:
        return str(skimage_photo_paths([ref])[ref])
    path = Path(base_dir, ref)
    if path.is_file():
        return str(path)
    if corpus and corpus.get("source") == "folder" and Path(base_dir, corpus["path"]).is_dir():
        files = _folder_images(Path(base_dir, corpus["path"]))
        if ref in files:
            return files[ref]
        hits = sorted(k for k in files if Path(k).with_suffix("").as_posix() == ref or Path(k).stem == ref)
        if len(hits) == 1:
            return files[hits[0]]
        if hits:
            raise ValueError(f"image {ref!r} is ambiguous in corpus.path {corpus['path']}: {hits}; name one with its extension")
    raise FileNotFoundError(f"image {ref!r}: neither a scikit-image photo name, a file, nor an image of the corpus")


def usable_samples(samples_table: str | os.PathLike, prompts: list[str], text_prompts: list[str],
                   max_images: int | None) -> list[Sample]:
    """Samples over the usable images, read from a table (never a fresh scan).

    The table is either the corpus listing (:func:`mmsae.data.listing.list_images`, with a
    ``status`` column: ``skipped`` rows are left out) or the extraction's samples table (images
    that extraction skipped are not in it). Each distinct image (in table order, at most
    ``max_images``) is paired with every prompt as ``img-<key>-p<j>``; ``text_prompts`` are added as
    ``txt-<i>``.

    Args:
        samples_table: a Parquet file with columns image_path and image_key (tables written before
            image_key existed fall back to image_path), and optionally status.

    Raises:
        ValueError: prompts is empty while the table has images.
    """
    cols = pq.read_schema(samples_table).names
    t = pq.read_table(samples_table, columns=[c for c in ("image_key", "image_path", "status") if c in cols])
    paths = t.column("image_path").to_pylist()
    keys = t.column("image_key").to_pylist() if "image_key" in cols else paths
    usable = [st != "skipped" for st in t.column("status").to_pylist()] if "status" in cols else [True] * len(paths)
    images = {}
    for key, path, ok in zip(keys, paths, usable):
        if path is not None and ok:
            images.setdefault(key or path, path)
    if images and not prompts:
        raise ValueError("usable_samples: at least one prompt is needed to pair with the images")
    samples = [Sample(f"img-{k}-p{j}", prompt, p, k) for k, p in list(images.items())[:max_images]
               for j, prompt in enumerate(prompts)]
    return samples + [Sample(f"txt-{i:04d}", prompt, None) for i, prompt in enumerate(text_prompts)]
