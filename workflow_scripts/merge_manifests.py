"""Entry point of rules merge_activations and merge_codes: one manifest over the parts."""

from mmsae.shards import merge_manifests
from mmsae.workflow import setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads)
merged = merge_manifests(list(sm.input), sm.output[0], samples=sm.rule == "merge_activations")
log.info("%d parts, %d shards, %d tokens", len(merged["parts"]), merged["n_shards"], merged["n_tokens"])
