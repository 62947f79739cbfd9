# mmsae: sparse autoencoders for large multimodal models.
# Run: snakemake --cores all   (config.yaml describes the run; config/schema.yaml documents every key)
import os
import sys

from snakemake.utils import min_version

from mmsae.workflow.config_check import normalise_corpus
from mmsae.workflow.config_load import (EFFECTIVE_CONFIG_NAME, check_config, describe_sources, in_file_order,
                                        write_effective_config)
from mmsae.workflow.run_name import run_dir

min_version("9.0")
# envs/*.yaml install this checkout as -e ${MMSAE_ROOT}[<stage>] (--sdm conda runs pip from .snakemake/conda/)
os.environ.setdefault("MMSAE_ROOT", workflow.basedir)


# config.yaml is the demo run's file. A command that names files (--configfile config/llava-next-8b.yaml)
# gets only those (and its --config values), never config.yaml's keys under them; to layer a file over the
# demo, name both: --configfile config.yaml mine.yaml.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"

    if not workflow.config_settings.replace_workflow_config:  # --config: keys in the file's order
        in_file_order(config, "config.yaml", workflow.config_settings.overwrite_config)


_sources = describe_sources(workflow.configfiles, workflow.config_settings.config)
_note = normalise_corpus(config)  # a single legacy corpus section -> corpus.train and corpus.interpret
if _note:
    print(_note, file=sys.stderr)
_schema = check_config(config, os.path.join(workflow.basedir, "config/schema.yaml"), _sources)
# Everything that depends on the SAE goes under results/runs/<run_name>/ (mmsae.workflow.run_name);
# the model, corpora, activations and neurons stay shared under results/.
RUN = run_dir(config)
EFFECTIVE_CONFIG = f"{RUN}/{EFFECTIVE_CONFIG_NAME}"
if workflow.is_main_process:  # job processes (cluster, --sdm) load the Snakefile too
    write_effective_config(EFFECTIVE_CONFIG, config, _sources, _schema)  # the report shows it
    print(f"This run's SAE, features, explanations, evaluation and report: {RUN}/", file=sys.stderr)


include: "rules/common.smk"
include: "rules/model.smk"
include: "rules/extract.smk"
include: "rules/sae.smk"
include: "rules/features.smk"
include: "rules/explain.smk"
include: "rules/evaluate.smk"
include: "rules/steer.smk"
include: "rules/repair.smk"
include: "rules/neurons.smk"
include: "rules/report.smk"
include: "rules/export.smk"


rule all:
    input:
        REPORT,
        export_targets(),
    default_target: True
