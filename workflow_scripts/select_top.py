"""Entry point of rule select_top: feature statistics, top samples, selected features (polars), over the codes of
corpus.interpret."""

import json

import polars as pl

from mmsae.core.shards import shard_paths
from mmsae.codes.schema import scan_codes, write_table
from mmsae.codes.select import base_view_counts, select_features, stats_and_top_samples
from mmsae.core.io import write_json
from mmsae.core.job import setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
p = sm.params
codes_manifest = json.loads(open(sm.input.codes).read())
codes = scan_codes(shard_paths(sm.input.codes))
samples = pl.read_parquet(sm.input.samples)
stats, tops = stats_and_top_samples(codes, codes_manifest["n_tokens"], codes_manifest["n_image_tokens"], codes_manifest["n_text_tokens"],
                                    base_view_counts(samples), n=p.top_n, rank_by=p.rank_by)
chosen, info = select_features(stats, tops, **p.select)
write_table(sm.output.stats, stats)
write_table(sm.output.top, tops)
write_json(sm.output.selected, {"features": chosen, "info": info})
log.info("%d latents active; selected %d features: %s", stats.height, len(chosen), chosen)
