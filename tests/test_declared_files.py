"""Every file an entry script reads or writes is declared by its rule: a file name that a script
spells out must be one of its job's declared inputs or outputs, or lie inside a declared directory.
Path arithmetic on a declared file (``Path(input.x).parent / "samples.parquet"``) is what this
catches: Snakemake neither waits for such a file nor reruns when it changes."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml
from snakemake.api import SnakemakeApi
from snakemake.io import is_flagged
from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings, Quietness, ResourceSettings,
                                      StorageSettings)

REPO = Path(__file__).resolve().parents[1]
DATA_SUFFIXES = (".parquet", ".json", ".pt", ".safetensors", ".sqlite", ".tsv", ".html", ".md", ".csv")


def jobs_of(workdir: Path) -> list:
    """(rule name, script path, declared input files, declared output files, has a directory) per job."""
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        wf = api.workflow(resource_settings=ResourceSettings(cores=1), config_settings=ConfigSettings(),
                          storage_settings=StorageSettings(), snakefile=REPO / "Snakefile", workdir=workdir)
        wf.dag(DAGSettings()).execute_workflow(executor="dryrun")
        jobs = wf._workflow.dag.jobs
        dirs = {str(f) for j in jobs for f in j.output if is_flagged(f, "directory")}
        out = []
        for j in jobs:
            if j.rule.script:
                files = [*j.input, *j.output]
                out.append((j.rule.name, Path(j.rule.basedir.get_path_or_uri(secret_free=True), j.rule.script).resolve(),
                            {Path(str(f)).name for f in files}, any(str(f) in dirs for f in files)))
    return out


def file_names_in(script: Path) -> set[str]:
    """String constants (f-string parts included) of ``script`` that name a data file."""
    names = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            tail = node.value.rsplit("/", 1)[-1]
            if tail.endswith(DATA_SUFFIXES) and not tail.startswith("."):  # ".md" etc. alone are suffixes
                names.add(tail)
    return names


def test_scripts_open_only_declared_files(tmp_path):
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    undeclared = []
    for rule, script, declared, has_dir in jobs_of(tmp_path):
        for name in sorted(file_names_in(script)):
            if name not in declared and not has_dir:
                undeclared.append(f"{rule} ({script.name}): {name}")
    assert not undeclared, "files that scripts open but their rules do not declare:\n" + "\n".join(undeclared)


def test_every_results_file_the_default_run_writes_is_declared(tmp_path):
    """The extraction merge's samples table and the neuron tables the report reads are declared."""
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    declared = {rule: names for rule, _, names, _ in jobs_of(tmp_path)}
    assert "samples.parquet" in declared["merge_activations"] and "samples.parquet" in declared["select_top"]
    assert {"captions.parquet", "neurons.parquet", "tokens.parquet"} <= declared["report"]
