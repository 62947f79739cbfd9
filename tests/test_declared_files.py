"""Every file an entry script reads or writes is declared by its rule: a file name that a script
spells out must be one of its job's declared inputs or outputs, or lie inside a declared directory.
Path arithmetic on a declared file (``Path(input.x).parent / "samples.parquet"``) is what this
catches: Snakemake neither waits for such a file nor reruns when it changes.

Jobs with a directory among their files are checked too: a name joined onto a declared directory
(``Path(params.model, "config.json")`` where params.model is the job's directory input) lies inside
it and counts as declared; a name joined onto ``.parent`` of a declared file lies beside that file
and does not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO, Job, dry_run

pytestmark = pytest.mark.workflow

DATA_SUFFIXES = (".parquet", ".json", ".pt", ".safetensors", ".sqlite", ".tsv", ".html", ".md", ".csv")
NAMESPACES = ("input", "output", "params")  # the parts of the snakemake object a path can come from


def jobs_of(workdir: Path, snakefile: Path | None = None) -> list:
    """(job, declared file names, declared directories) per job with a script; the directories are
    the job's inputs and outputs that some rule declares with ``directory()``."""
    run = dry_run(workdir, snakefile)
    out = []
    for j in run.jobs:
        if j.script:
            files = [*j.input, *j.output]
            dirs = {f for f in files if f in run.directories}
            out.append((j, {Path(f).name for f in files if f not in dirs}, dirs))
    return out


def _is_data_name(value: str) -> str | None:
    tail = value.rsplit("/", 1)[-1]
    return tail if tail.endswith(DATA_SUFFIXES) and not tail.startswith(".") else None  # ".md" alone is a suffix


def file_names_in(script: Path) -> list[tuple[str, ast.AST | None]]:
    """Each string constant (f-string parts included) of ``script`` that names a data file, with the
    expression it is joined onto as a path (``base / "x"``, ``Path(base, "x")``, ``f"{base}/x"``), or None."""
    tree = ast.parse(script.read_text())
    parent = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or not _is_data_name(node.value):
            continue
        up, base = parent.get(id(node)), None
        if isinstance(up, ast.BinOp) and isinstance(up.op, ast.Div) and up.right is node:
            base = up.left
        elif isinstance(up, ast.Call) and isinstance(up.func, ast.Name) and up.func.id == "Path" \
                and len(up.args) == 2 and up.args[1] is node:
            base = up.args[0]
        elif isinstance(up, ast.JoinedStr) and node.value.startswith("/"):
            k = up.values.index(node)
            if k and isinstance(up.values[k - 1], ast.FormattedValue):
                base = up.values[k - 1].value
        found.append((_is_data_name(node.value), base))
    return found


def _aliases(script: Path) -> dict[str, ast.AST]:
    """Module-level names bound once to an expression (``i = sm.input``, ``p = sm.params``)."""
    counts: dict[str, list] = {}
    for stmt in ast.parse(script.read_text()).body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            counts.setdefault(stmt.targets[0].id, []).append(stmt.value)
    return {name: values[0] for name, values in counts.items() if len(values) == 1}


def declared_value(node: ast.AST, job: Job, aliases: dict) -> str | None:
    """The declared path (or param) ``node`` evaluates to in ``job``: ``sm.input.x``, ``sm.params.x``,
    ``sm.output["x"]``, through ``Path(...)``/``str(...)`` and module-level aliases. None when it is
    anything else, ``.parent`` of something included (a path beside a declared one is not declared)."""
    if isinstance(node, ast.Name):
        return declared_value(aliases[node.id], job, {}) if node.id in aliases else None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("Path", "str") \
            and len(node.args) == 1:
        return declared_value(node.args[0], job, aliases)
    key = node.attr if isinstance(node, ast.Attribute) else \
        node.slice.value if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) else None
    if key is None:
        return None
    space = _namespace(node.value, aliases)
    named = {"input": job.named_input, "output": job.named_output, "params": job.params}.get(space, {})
    value = named.get(key) if isinstance(key, str) else None
    return value if isinstance(value, str) else None


def _namespace(node: ast.AST, aliases: dict) -> str | None:
    """``input``/``output``/``params`` when ``node`` is ``sm.input`` (``snakemake.input``, an alias of either)."""
    if isinstance(node, ast.Name) and node.id in aliases:
        return _namespace(aliases[node.id], {})
    if isinstance(node, ast.Attribute) and node.attr in NAMESPACES and isinstance(node.value, ast.Name) \
            and node.value.id in ("sm", "snakemake"):
        return node.attr
    return None


def undeclared_files(workdir: Path) -> list[str]:
    """'rule (script): name' for each data file a script spells that is neither a declared file nor
    joined onto a declared directory of its job."""
    undeclared = []
    for job, declared, dirs in jobs_of(workdir):
        aliases = _aliases(job.script)
        for name, base in sorted(file_names_in(job.script), key=lambda nb: nb[0]):
            inside = base is not None and declared_value(base, job, aliases) in dirs
            if name not in declared and not inside:
                undeclared.append(f"{job.rule} ({job.script.name}): {name}")
    return sorted(set(undeclared))


def test_scripts_open_only_declared_files(tmp_path):
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    undeclared = undeclared_files(tmp_path)
    assert not undeclared, "files that scripts open but their rules do not declare:\n" + "\n".join(undeclared)


def test_a_file_beside_a_declared_file_is_not_declared_but_one_inside_a_directory_is(tmp_path):
    """The check itself, on a two-rule workflow: the reader's rule declares a directory and a file,
    and its script reads one file inside the directory and one beside the file."""
    (tmp_path / "make.py").write_text("")
    (tmp_path / "read.py").write_text(
        "from pathlib import Path\nsm = snakemake\ni = sm.input\n"
        "inside = Path(sm.params.model, 'config.json')\n"
        "beside = Path(i.metrics).parent / 'heldout.json'\n"
        "also_inside = f'{sm.input.model}/weights.safetensors'\n")
    (tmp_path / "Snakefile").write_text(
        "rule all:\n    input: 'out.json'\n"
        "rule make:\n    output: directory('model'), 'metrics.json'\n    script: 'make.py'\n"
        "rule read:\n    input: model='model', metrics='metrics.json'\n    output: 'out.json'\n"
        "    params: model='model'\n    script: 'read.py'\n")
    jobs = {job.rule: (job, declared, dirs) for job, declared, dirs in jobs_of(tmp_path, tmp_path / "Snakefile")}
    job, declared, dirs = jobs["read"]
    aliases = _aliases(job.script)
    verdict = {name: name in declared or (base is not None and declared_value(base, job, aliases) in dirs)
               for name, base in file_names_in(job.script)}
    assert verdict == {"config.json": True, "heldout.json": False, "weights.safetensors": True}


def test_every_results_file_the_default_run_writes_is_declared(tmp_path):
    """The extraction merge's samples table and the neuron tables the report reads are declared."""
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    declared = {job.rule: names for job, names, _ in jobs_of(tmp_path)}
    assert "samples.parquet" in declared["merge_activations"] and "samples.parquet" in declared["select_top"]
    assert {"captions.parquet", "neurons.parquet", "tokens.parquet"} <= declared["report"]
