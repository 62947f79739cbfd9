"""Helpers shared by the tests (not a test module: no test imports another ``test_*.py``).

- :data:`REPO`, :data:`SNAKEMAKE`, :data:`TINY`: the checkout, the Snakemake command line and the
  tiny end-to-end config of the workflow tests.
- :func:`smk`, :func:`jobs`, :func:`workdir_with`: Snakemake as a subprocess in a working directory
  made from a config, and the job counts of its run.
- :func:`run_dir_for`: the ``results/runs/<run_name>`` folder a config's SAE-dependent results go to.
- :func:`dry_run`: one in-process Snakemake DAG through its API, what it would run and every job's
  declared files and params; :func:`fake_complete_tree` makes a results tree that is up to date.
- :func:`imports`, :func:`distribution`, :data:`PROJECT`, :func:`extra_requirements`,
  :func:`requirements_txt`: what a script imports and what pyproject.toml/requirements.txt declare
  (the packaging and conda-env tests).
- :class:`FixedBatches`: a fixed list of activation batches for the trainer (the SAE-training tests).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

TINY = {
    "model": {"source": "demo", "hook_point": "model.language_model.layers.6"},
    "corpus": {"source": "skimage", "names": ["chelsea", "rocket", "coffee"], "prompts": ["Describe this image."],
               "text_prompts": ["What is the capital of France?", "Write a haiku about the sea."]},
    "extract": {"shard_tokens": 400, "parts": 2},
    "sae": {"d_sae": 256, "k": 8, "steps": 30, "batch_size": 64, "warmup_steps": 3, "buffer_tokens": 256,
            "b_dec_init_tokens": 256, "checkpoint_every": 10, "dead_tokens": 2000, "heldout_fraction": 0.2},
    "features": {"top_n": 3, "select": {"n": 4, "min_samples": 1, "per_modality": True}},
    "explain": {"server": "local", "max_tokens": 8, "concurrency": 1},
    "steer": {"auto": 1, "values": [10], "max_new_tokens": 6, "prompts": [{"prompt": "Tell me a story."}]},
    "attribution": {"validate_top": 4, "cases": [
        {"name": "capital", "prompt": "What is the capital of France?", "answer_prefix": "The capital of France is",
         "answer": " Paris", "baseline": " London"},
        {"name": "cat", "prompt": "Is there a cat?", "image": "chelsea", "answer": "Yes", "baseline": "No"}]},
    "neurons": {"max_images": 1, "max_new_tokens": 8, "text_prompts": ["Describe a cat in few words."], "top_k": 50,
                "causal_cases": 1, "causal_k": 5, "opt_steps": 3, "edits": [{"name": "e", "source": "auto", "target": "dog"}],
                "locality_prompts": ["Hi"]},
}


def run_dir_for(cfg: dict) -> str:
    """``results/runs/<run_name>`` for ``cfg`` (a config file's content) as the Snakefile names it: the
    schema's defaults filled in (Snakemake's ``validate``; no check of paths or models, so it works
    before a test's working directory exists), then :func:`mmsae.workflow.run_name.run_dir`."""
    import copy

    from snakemake.utils import validate

    from mmsae.workflow.config_check import normalise_corpus
    from mmsae.workflow.run_name import run_dir

    filled = copy.deepcopy(cfg)
    normalise_corpus(filled)
    validate(filled, str(REPO / "config/schema.yaml"))
    return run_dir(filled)


def default_run_dir() -> str:
    """:func:`run_dir_for` the demo's ``config.yaml``."""
    return run_dir_for(yaml.safe_load((REPO / "config.yaml").read_text()))


# ---- Snakemake as a subprocess -------------------------------------------------------------------

def smk(workdir, *args, check=True):
    """Run Snakemake on the checkout's Snakefile in ``workdir`` (a subprocess); fail with its output
    unless ``check`` is false."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args],
                          capture_output=True, text=True, env=env, cwd=workdir)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def jobs(proc) -> dict:
    """Parse the 'Job stats' table of a (dry-)run into {rule: count}."""
    out, table = {}, False
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("job ") and "count" in line:
            table = True
            continue
        if table:
            parts = line.split()
            if not parts or parts[0] == "total":
                break
            if len(parts) == 2 and parts[1].isdigit():
                out[parts[0]] = int(parts[1])
    return out


def workdir_with(tmp_path, cfg) -> Path:
    """``tmp_path`` with ``cfg`` as its config.yaml and the corpus folders/files it names (empty)."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    corpus = cfg.get("corpus", {})
    for c in [corpus.get(r, {}) for r in ("train", "interpret")] + [corpus]:  # the two roles, or a legacy single corpus
        if c.get("path") and not Path(c["path"]).is_absolute():
            if c.get("source") == "folder":
                (tmp_path / c["path"]).mkdir(parents=True, exist_ok=True)
            elif c.get("source") == "table":  # the paper config's conversations file (dry runs do not read it)
                (tmp_path / c["path"]).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / c["path"]).write_text("[]")
    return tmp_path


# ---- Snakemake DAGs, in-process ------------------------------------------------------------------

def _named(namedlist) -> dict:
    """A Snakemake Namedlist's named entries as {name: str or list of str}."""
    return {k: [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in namedlist.items()}


@dataclass(frozen=True)
class Job:
    """One job of a DAG: its rule, entry script (None for a rule without ``script:``), declared input
    and output paths (as strings, relative to the working directory), the named ones by name, and its params."""

    rule: str
    script: Path | None
    input: list[str]
    output: list[str]
    named_input: dict
    named_output: dict
    params: dict


@dataclass(frozen=True)
class DryRun:
    """What one DAG build reports: ``rerun`` the rules of the jobs that would run, ``outputs``
    {output path: declared as a directory} over the whole DAG, and every job of the DAG."""

    rerun: set[str]
    outputs: dict[str, bool]
    jobs: list[Job] = field(default_factory=list)

    @property
    def directories(self) -> set[str]:
        """The outputs declared with ``directory()``."""
        return {p for p, is_dir in self.outputs.items() if is_dir}


def dry_run(workdir: Path, snakefile: Path | None = None, executor: str = "dryrun", forceall: bool = False) -> DryRun:
    """Build the DAG of ``snakefile`` (the checkout's by default) for ``workdir`` (which holds its
    config.yaml) through Snakemake's API, in this process, and run it with ``executor``: ``dryrun``
    runs nothing, ``touch`` marks the jobs' outputs up to date. ``forceall`` makes every job run.

    Raises whatever Snakemake raises for a bad config or workflow (e.g. WorkflowError)."""
    from snakemake.api import SnakemakeApi
    from snakemake.io import is_flagged
    from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings, Quietness, ResourceSettings,
                                          StorageSettings)

    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        wf = api.workflow(resource_settings=ResourceSettings(cores=1), config_settings=ConfigSettings(),
                          storage_settings=StorageSettings(), snakefile=snakefile or REPO / "Snakefile", workdir=workdir)
        dag = wf.dag(DAGSettings(forceall=forceall))
        updated: list[str] = []
        dag.execute_workflow(executor=executor, updated_files=updated)
        jobs = wf._workflow.dag.jobs
        producer = {str(f): j.rule.name for j in jobs for f in j.output}
        outputs = {str(f): is_flagged(f, "directory") for j in jobs for f in j.output}
        records = [Job(rule=j.rule.name,
                       script=(Path(j.rule.basedir.get_path_or_uri(secret_free=True), j.rule.script).resolve()
                               if j.rule.script else None),
                       input=[str(f) for f in j.input], output=[str(f) for f in j.output],
                       named_input=_named(j.input), named_output=_named(j.output), params=dict(j.params.items()))
                   for j in jobs]
    return DryRun(rerun={producer[f] for f in updated}, outputs=outputs, jobs=records)


def fake_complete_tree(wd: Path, snakefile: Path):
    """Create every output of the DAG and record the jobs' metadata as Snakemake's --touch does."""
    outputs = dry_run(wd, snakefile).outputs
    for path, is_dir in outputs.items():
        p = wd / path
        if is_dir:
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
    dry_run(wd, snakefile, executor="touch", forceall=True)  # every job, so that every job has metadata
    rerun = dry_run(wd, snakefile).rerun
    assert rerun == set(), f"a touched tree should be complete, but these rules would run: {sorted(rerun)}"


# ---- imports and declared dependencies -------------------------------------------------------------

# import name -> distribution, where the distribution's own metadata does not say (editable/odd installs)
ALIASES = {"PIL": "pillow", "yaml": "pyyaml", "skimage": "scikit-image"}
OPTIONAL = {"open_clip", "snakemake"}  # an optional CLIP backend; snakemake runs the scripts


def guarded(tree) -> set[int]:
    """ids of import nodes inside ``try:`` blocks that catch ImportError (optional imports)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def imports(path: Path, seen: set) -> set[str]:
    """Top-level third-party modules imported by ``path`` and, recursively, by the mmsae modules it imports."""
    if path in seen:
        return set()
    seen.add(path)
    found = set()
    tree = ast.parse(path.read_text())
    skip = guarded(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        for name in names:
            top = name.split(".")[0]
            if top == "mmsae":
                mod = REPO / Path(*name.split("."))
                for cand in (mod.with_suffix(".py"), mod / "__init__.py"):
                    if cand.is_file():
                        found |= imports(cand, seen)
                if isinstance(node, ast.ImportFrom):  # from mmsae.x import submodule
                    for a in node.names:
                        sub = mod / f"{a.name}.py"
                        if sub.is_file():
                            found |= imports(sub, seen)
            elif top not in sys.stdlib_module_names and top not in OPTIONAL:
                found.add(top)
    return found


def distribution(module: str) -> str:
    """The installed distribution that provides the top-level ``module`` (AssertionError if none)."""
    if module in ALIASES:
        return ALIASES[module]
    dists = md.packages_distributions().get(module)
    assert dists, f"no installed distribution provides {module!r}"
    return dists[0].lower()


PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def extra_requirements(extra: str) -> list:
    """The requirements of ``mmsae[extra]`` beyond the base list, self-references (``mmsae[a,b]``) expanded."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    out = []
    for line in PROJECT["optional-dependencies"][extra]:
        req = Requirement(line)
        if canonicalize_name(req.name) == "mmsae":
            for sub in sorted(req.extras):
                out += extra_requirements(sub)
        else:
            out.append(req)
    return out


def requirements_txt() -> dict[str, tuple[str, str]]:
    """requirements.txt as {canonical name: (version, trailing comment)}; every line must be ``name==version``."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    out = {}
    for n, line in enumerate((REPO / "requirements.txt").read_text().splitlines(), 1):
        spec, _, comment = line.partition("#")
        if not spec.strip():
            continue
        req = Requirement(spec.strip())
        pins = [s for s in req.specifier if s.operator == "=="]
        assert len(pins) == 1 and len(req.specifier) == 1, f"requirements.txt:{n}: {line!r} is not pinned as name==version"
        out[canonicalize_name(req.name)] = (pins[0].version, comment.strip())
    return out


class FixedBatches:
    """A stand-in for :class:`mmsae.sae.data.ActivationStream` in :func:`mmsae.sae.trainer.train`: the
    same list of (n, d_model) ``batches`` every pass, each with the (n,) bool mask ``is_image``; with
    lr 0 the firing of every step can be recomputed afterwards from the returned SAE."""

    def __init__(self, batches: list, is_image, name: str = "fixed"):
        self.batches, self.is_image, self.name = batches, is_image, name

    def identity(self) -> dict:
        return {self.name: len(self.batches)}

    def sample(self, n: int):
        import torch

        return torch.cat(self.batches)[:n]

    def train_batches(self):
        for x in self.batches:
            yield x, self.is_image.clone()
