"""Entry point of rule extract: run the subject model over the corpus, write activation shards."""

from mmsae.extract.run import ExtractConfig, extract
from mmsae.data import build_corpus, corpus_part
from mmsae.core.io import config_hash
from mmsae.models import load_subject_model
from mmsae.core.job import setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
p = sm.params
part = int(sm.wildcards.part)
samples = corpus_part(build_corpus(p.corpus), part, p.parts)
subject = load_subject_model(p.model, dtype=p.dtype, device=p.device)
cfg = ExtractConfig(hook_point=p.hook_point, **p.extract)
chash = config_hash({"model": p.model, "dtype": p.dtype, "hook_point": p.hook_point, "corpus": p.corpus, "extract": p.extract,
                     "part": part, "parts": p.parts})
out_dir = sm.output.manifest.rsplit("/", 1)[0]
# whether to check free space changes no output: read at run time, not a param
manifest = extract(subject, samples, out_dir, cfg, chash, check_disk=sm.config["extract"]["check_disk"], disk_parts=p.parts)
log.info("%d tokens (%d image, %d text) from %d samples; %d images skipped",
         manifest["n_tokens"], manifest["n_image_tokens"], manifest["n_text_tokens"], manifest["n_samples"], manifest["n_images_skipped"])
