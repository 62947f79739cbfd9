"""Entry point of rules merge_activations and merge_codes: one manifest over the parts."""

from mmsae.core.shards import merge_manifests
from mmsae.core.job import setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads)
if sm.rule == "merge_activations":  # the parts' samples.parquet are concatenated into output.samples
    merged = merge_manifests(list(sm.input.manifests), sm.output.manifest, samples=True)
else:  # each code part is a directory output holding its manifest.json and samples.parquet (-> output.samples)
    merged = merge_manifests([f"{d}/manifest.json" for d in sm.input], sm.output.manifest, samples=True)
log.info("%d parts, %d shards, %d tokens", len(merged["parts"]), merged["n_shards"], merged["n_tokens"])
