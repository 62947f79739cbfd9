"""Entry point of rule crossmodal: per feature, how often it fires on the image and on the text of the
same sample against shuffled pairs, and the top features' best pairs for the report."""

import json

import polars as pl

from mmsae.codes.crossmodal import CrossmodalConfig, crossmodal_scores, pair_examples
from mmsae.codes.schema import scan_codes, write_table
from mmsae.core.job import setup
from mmsae.core.shards import shard_paths

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
c = sm.params.crossmodal
manifest = json.loads(open(sm.input.codes).read())  # the interpretation corpus's grid side
codes = scan_codes(shard_paths(sm.input.codes))
cfg = CrossmodalConfig(threshold=c["threshold"], min_pairs=c["min_pairs"], n_boot=c["n_boot"], seed=c["seed"])
table = crossmodal_scores(codes, cfg)
samples = pl.read_parquet(sm.input.samples, columns=["sample_id", "image_path", "tokens"])
examples = pair_examples(codes, samples, table, c["show"], manifest.get("grid_side") or 1, sm.params.threshold)
write_table(sm.output.table, table)
write_table(sm.output.examples, examples)
n_pairs = table["n_pairs"][0] if table.height else 0
sig = table.filter(pl.col("excess_ci_low") > 0)
log.info("%d pairs (image + its own text); %d features fire on both sides somewhere; %d with matched rate above "
         "shuffled (interval above 0); top: %s", n_pairs, table.height, sig.height,
         ", ".join(f"{r['feature']} ({r['matched_rate']:.3f} vs {r['shuffled_rate']:.3f})" for r in sig.head(5).iter_rows(named=True)))
