"""Entry point of rule render_maps: highlight/heatmap PNGs and top text contexts per feature."""

import json

import polars as pl

from mmsae.core.shards import shard_paths
from mmsae.codes.schema import scan_codes, write_table
from mmsae.codes.maps import render_feature_maps
from mmsae.core.job import setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
manifest = json.loads(open(sm.input.codes).read())  # the interpretation corpus's grid side
samples = pl.read_parquet(sm.input.samples)
selected = json.loads(open(sm.input.selected).read())["features"]
maps, contexts = render_feature_maps(
    scan_codes(shard_paths(sm.input.codes)), samples, pl.read_parquet(sm.input.top), selected,
    side=manifest.get("grid_side") or 1, out_dir=sm.output.maps.rsplit("/", 1)[0], threshold=sm.params.threshold,
)
write_table(sm.output.maps, maps)
write_table(sm.output.contexts, contexts)
log.info("%d image maps, %d text contexts for %d features", maps.height, contexts.height, len(selected))
