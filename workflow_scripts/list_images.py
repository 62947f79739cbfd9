"""Entry point of rule list_images: every corpus image, used, converted or skipped (with the reason)."""

from mmsae.data.listing import list_images
from mmsae.core.io import write_parquet
from mmsae.core.job import setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads)
table = list_images(dict(sm.params.corpus), sm.params.max_image_pixels)
write_parquet(sm.output[0], table)
counts = {k: table.column("status").to_pylist().count(k) for k in ("used", "converted", "skipped")}
log.info("%d images: %s", table.num_rows, counts)
