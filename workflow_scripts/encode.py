"""Entry point of rule encode: run the model with the SAE over one part of corpus.interpret; write its
sparse codes (no dense activations).

The part's output is a directory: the codes are written into a fresh sibling folder that is renamed
into place once complete, so a failed job leaves no half-written folder (Snakemake also removes a
failed job's directory output and reruns it)."""

import os
import shutil
from pathlib import Path

from mmsae.data import build_corpus, corpus_part
from mmsae.codes.encode import EncodeConfig, encode_corpus
from mmsae.core.io import config_hash
from mmsae.models import load_subject_model
from mmsae.sae import load_sae
from mmsae.core.job import setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
p = sm.params
part = int(sm.wildcards.part)
out = Path(sm.output[0])
for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a job that was killed
    shutil.rmtree(stale, ignore_errors=True)
tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
samples = corpus_part(build_corpus(p.corpus), part, p.parts)
subject = load_subject_model(p.model, dtype=p.dtype, device=p.device)
sae, sae_cfg = load_sae(sm.input.cfg.rsplit("/", 1)[0], device=str(subject.device))
cfg = EncodeConfig(hook_point=p.hook_point, max_image_pixels=p.max_image_pixels, **p.encode)
chash = config_hash({"model": p.model, "dtype": p.dtype, "hook_point": p.hook_point, "corpus": p.corpus, "encode": p.encode,
                     "max_image_pixels": p.max_image_pixels, "sae": sae_cfg, "part": part, "parts": p.parts})
try:
    manifest = encode_corpus(subject, sae, sae_cfg, samples, tmp, cfg, chash)
except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
shutil.rmtree(out, ignore_errors=True)
os.replace(tmp, out)
log.info("encoded %d tokens (%d image, %d text) of %d samples into %d code shards; %d images skipped", manifest["n_tokens"],
         manifest["n_image_tokens"], manifest["n_text_tokens"], manifest["n_samples"], len(manifest["shards"]),
         manifest["n_images_skipped"])
