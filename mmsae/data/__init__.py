"""Image/text corpora -> samples (see :mod:`mmsae.data.corpus`)."""

from mmsae.data.corpus import Sample, build_corpus, load_image, skimage_photo_paths  # noqa: F401
