"""A stand-in for the ``conda`` command, enough for Snakemake's ``--sdm conda`` to deploy envs/*.yaml
on a machine without conda or a reachable conda channel (tests/test_envs.py).

It answers ``conda --version``, ``conda clean``, ``conda info --json`` and ``conda config --get channel_priority --json``
as Snakemake's checks expect, and ``conda env create --file F --prefix P`` the way conda's pip
installer handles an env file's ``pip:`` section: the lines go to a ``condaenv.*.requirements.txt``
written next to F (the copy Snakemake made in .snakemake/conda/), and ``pip install -U -r`` runs with
that directory as its working directory, so relative paths resolve from there as they would under
conda. The conda packages themselves (python=X.Y, pip) are not installed: the env's Python is the
interpreter running this script, whose version must equal the env's pin.

FAKE_CONDA_MODE=dry: pip resolves with --dry-run and writes its JSON report to P/report.json; P/bin/python
passes --dry-run to whatever it runs (a post-deploy script's pip install), logging the call to
P/calls.log. FAKE_CONDA_MODE=venv: P becomes a virtual environment and pip installs into it.
``bin/activate`` (next to this script, where Snakemake looks for it) puts P/bin first on PATH.
"""

import json
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import yaml

PREFIX = Path(__file__).resolve().parent.parent  # conda_prefix: this script is <prefix>/bin/conda


def install(binary_dir: Path) -> Path:
    """Write ``conda`` and ``activate`` into ``binary_dir`` (the fake conda_prefix's bin); returns it."""
    binary_dir.mkdir(parents=True, exist_ok=True)
    conda = binary_dir / "conda"
    conda.write_text(f"#!{sys.executable}\n" + Path(__file__).read_text())
    conda.chmod(0o755)
    (binary_dir / "activate").write_text('export PATH="$1/bin:$PATH"\n')
    return binary_dir


def create(env_file: Path, prefix: Path, mode: str) -> None:
    spec = yaml.safe_load(env_file.read_text())
    deps = spec["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.split("=")[0] == "python").split("=", 1)[1]
    here = "%d.%d" % sys.version_info[:2]
    if python != here:
        sys.exit(f"fake conda: {env_file} pins python={python}, this interpreter is {here}")
    lines = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    workdir = env_file.resolve().parent  # as conda's pip installer: the env file's directory
    with tempfile.NamedTemporaryFile("w", prefix="condaenv.", suffix=".requirements.txt", dir=workdir,
                                     delete=False) as req:
        req.write("\n".join(lines))
    try:
        if mode == "dry":
            (prefix / "bin").mkdir(parents=True)
            shim = prefix / "bin" / "python"
            shim.write_text(f'#!/bin/sh\necho "$@" >> "{prefix}/calls.log"\n'
                            f'exec "{sys.executable}" "$@" --dry-run --ignore-installed\n')
            shim.chmod(0o755)
            cmd = [sys.executable, "-m", "pip", "install", "-U", "--dry-run", "--ignore-installed",
                   "--quiet", "--report", str(prefix / "report.json"), "-r", req.name]
        elif mode == "venv":
            venv.create(prefix, with_pip=True)
            cmd = [str(prefix / "bin" / "python"), "-m", "pip", "install", "-U", "--quiet", "-r", req.name]
        else:
            sys.exit(f"fake conda: FAKE_CONDA_MODE={mode!r}, expected dry or venv")
        subprocess.run(cmd, cwd=workdir, check=True)
    finally:
        os.unlink(req.name)


def main(argv: list[str]) -> None:
    if argv == ["--version"]:
        print("conda 25.1.1")
    elif argv[:2] == ["info", "--json"]:
        print(json.dumps({"conda_prefix": str(PREFIX), "platform": "linux-64", "envs_dirs": [], "pkgs_dirs": []}))
    elif argv[:2] == ["config", "--get"]:
        print(json.dumps({"get": {"channel_priority": "strict"}, "rc_path": "", "success": True, "warnings": []}))
    elif argv[:2] == ["env", "create"]:
        create(Path(argv[argv.index("--file") + 1]), Path(argv[argv.index("--prefix") + 1]),
               os.environ.get("FAKE_CONDA_MODE", "dry"))
    elif argv[:1] == ["clean"]:
        pass  # Snakemake's --conda-cleanup-pkgs: no package cache here
    else:
        sys.exit(f"fake conda: unsupported command {argv}")


if __name__ == "__main__":
    main(sys.argv[1:])
