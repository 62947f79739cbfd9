# mmsae: sparse autoencoders for large multimodal models.
# Run: snakemake --cores all   (config.yaml describes the run; config/schema.yaml documents every key)
import os
import sys

from snakemake.utils import min_version, validate

from mmsae.workflow.config_check import config_errors, normalise_corpus

min_version("9.0")
# envs/*.yaml install this checkout as -e ${MMSAE_ROOT}[<stage>] (--sdm conda runs pip from .snakemake/conda/)
os.environ.setdefault("MMSAE_ROOT", workflow.basedir)


configfile: "config.yaml"


_note = normalise_corpus(config)  # a single legacy corpus section -> corpus.train and corpus.interpret
if _note:
    print(_note, file=sys.stderr)
validate(config, "config/schema.yaml")
_errors = config_errors(config)
if _errors:
    raise ValueError("config.yaml: " + "; ".join(_errors))


include: "rules/common.smk"
include: "rules/model.smk"
include: "rules/extract.smk"
include: "rules/sae.smk"
include: "rules/features.smk"
include: "rules/explain.smk"
include: "rules/evaluate.smk"
include: "rules/steer.smk"
include: "rules/neurons.smk"
include: "rules/report.smk"
include: "rules/export.smk"


rule all:
    input:
        "results/report/index.html",
        export_targets(),
    default_target: True
