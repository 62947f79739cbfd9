"""Entry point of rule build_demo_model: build the embedded LLaVA-NeXT demo model."""

from mmsae.models.demo import build_demo_model
from mmsae.core.job import setup

sm = snakemake  # noqa: F821 (injected by Snakemake's script directive)
setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
build_demo_model(sm.output[0], **sm.params.demo)
