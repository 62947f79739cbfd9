"""Image/text corpora -> samples (see :mod:`mmsae.data.corpus`)."""

from mmsae.data.corpus import (  # noqa: F401
    Sample, build_corpus, corpus_part, load_image, resolve_image_ref, skimage_photo_paths, usable_samples,
)
from mmsae.data.listing import list_images  # noqa: F401
