"""Entry point of rule encode: sparse codes for every activation shard."""

from mmsae.shards import shard_paths
from mmsae.sae.encode import encode_shards
from mmsae.gpu import resolve_device
from mmsae.sae import load_sae
from mmsae.workflow import setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
sae, _ = load_sae(sm.input.cfg.rsplit("/", 1)[0], device=resolve_device(sm.params.device))
manifest = encode_shards(sae, shard_paths(sm.input.activations), sm.output.manifest.rsplit("/", 1)[0])
log.info("encoded %d tokens into %d code shards", manifest["n_tokens"], len(manifest["shards"]))
