"""Entry point of rule encode: sparse codes for every activation shard.

The part's output is a directory: the codes are written into a fresh sibling folder that is renamed
into place once complete, so a failed job leaves no half-rewritten folder (Snakemake also removes a
failed job's directory output and reruns it)."""

import os
import shutil
from pathlib import Path

from mmsae.shards import shard_paths
from mmsae.sae.encode import encode_shards
from mmsae.gpu import resolve_device
from mmsae.sae import load_sae
from mmsae.workflow import setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
out = Path(sm.output[0])
for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a job that was killed
    shutil.rmtree(stale, ignore_errors=True)
tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
sae, _ = load_sae(sm.input.cfg.rsplit("/", 1)[0], device=resolve_device(sm.params.device))
manifest = encode_shards(sae, shard_paths(sm.input.activations), tmp)
shutil.rmtree(out, ignore_errors=True)
os.replace(tmp, out)
log.info("encoded %d tokens into %d code shards", manifest["n_tokens"], len(manifest["shards"]))
