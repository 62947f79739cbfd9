"""One listing of the corpus's images, shared by the stages that need images but not activations.

``find_neurons`` (multimodal neurons) pairs the corpus's images with its own prompt; it must meet
exactly the images that extraction could use, and it must not rerun when only extraction's prompts
change. The listing depends only on where the images come from (source, names or path, max_images)
and the pixel cap, and marks each image used or skipped with the reason, by the same
:func:`~mmsae.data.corpus.load_image` that extraction uses.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from mmsae.data.corpus import build_corpus, load_image, table_samples

LISTING_SCHEMA = pa.schema([("image_key", pa.string()), ("image_path", pa.string()), ("status", pa.string()),
                            ("reason", pa.string())])


def list_images(corpus: dict, max_image_pixels: int | None, base_dir: str | os.PathLike = ".") -> pa.Table:
    """Every distinct image of ``corpus`` with its status, in corpus order.

    Args:
        corpus: the ``corpus`` config section (``source``, ``names``/``path``, ``max_images``; prompts
            are ignored: the listing is about images).
        max_image_pixels: ``extract.max_image_pixels`` (None: Pillow's limit), as extraction applies it.

    Returns:
        A table with :data:`LISTING_SCHEMA`: ``status`` is ``used``, ``converted`` (usable after a
        conversion; ``reason`` says which) or ``skipped`` (``reason`` says why). Images inside
        Parquet rows (:mod:`mmsae.data.parquet_images`) are listed by their reference, read in
        row order (each row group once).

    Raises:
        ValueError / FileNotFoundError: as :func:`~mmsae.data.corpus.build_corpus`, naming the field.
    """
    images = {}
    if corpus.get("source") == "table":  # a stream: no list of the table's samples (conversations) is built
        samples = table_samples(Path(base_dir, corpus["path"]), corpus.get("max_images"))
    else:
        samples = build_corpus({**corpus, "prompts": ["-"], "text_prompts": [], "text_source": None}, base_dir)
    for s in samples:
        if s.image_path is not None:
            images.setdefault(s.image_key or s.image_path, s.image_path)
    rows = []
    for key, path in images.items():
        image, status = load_image(path, max_image_pixels)
        kind = "skipped" if image is None else "used" if status == "ok" else "converted"
        rows.append({"image_key": key, "image_path": str(path), "status": kind, "reason": None if status == "ok" else status})
    return pa.Table.from_pylist(rows, schema=LISTING_SCHEMA)
