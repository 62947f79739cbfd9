"""pyproject.toml declares every third-party package mmsae imports, requirements.txt pins every
requirement pyproject.toml names (and says why it pins the others), and the Python version and the
license file agree with what pyproject.toml states."""

import re
import sys

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from helpers import PROJECT, REPO, distribution, extra_requirements, imports, requirements_txt


def test_every_import_of_the_package_is_declared():
    """``pip install .[all]`` must make every module of mmsae importable (mmsae.explain needs openai,
    mmsae.neurons lemminflect)."""
    found = set()
    for path in sorted((REPO / "mmsae").rglob("*.py")):
        found |= imports(path, set())
    declared = {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]}
    declared |= {canonicalize_name(r.name) for r in extra_requirements("all")}
    missing = sorted({canonicalize_name(distribution(m)) for m in found} - declared)
    assert not missing, f"pyproject.toml: mmsae imports {missing}, neither in dependencies nor in the 'all' extra"


def test_all_extra_is_every_stage():
    """``all`` lists every stage extra (one per envs/*.yaml), so the README's setup covers every rule."""
    stages = {p.stem for p in (REPO / "envs").glob("*.yaml")}
    (line,) = PROJECT["optional-dependencies"]["all"]
    assert Requirement(line).extras == stages
    assert stages <= set(PROJECT["optional-dependencies"]), "a stage env has no extra of its name in pyproject.toml"


def test_requirements_pin_every_declared_requirement():
    pins = requirements_txt()
    declared = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in PROJECT["optional-dependencies"]:
        declared += extra_requirements(extra)
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in pins, f"requirements.txt does not pin {req.name} (pyproject.toml requires {req})"
        assert req.specifier.contains(pins[name][0]), \
            f"requirements.txt pins {req.name}=={pins[name][0]}, outside pyproject.toml's {req}"
    named = {canonicalize_name(r.name) for r in declared}
    unexplained = sorted(n for n, (_, comment) in pins.items() if n not in named and not comment)
    assert not unexplained, f"requirements.txt pins {unexplained}, which pyproject.toml does not name, without a comment saying why"


def test_pytest_is_a_test_extra_not_a_runtime_requirement():
    runtime = {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]}
    runtime |= {canonicalize_name(r.name) for r in extra_requirements("all")}
    assert "pytest" not in runtime
    assert any(Requirement(r).name == "pytest" for r in PROJECT["optional-dependencies"]["test"])
    # still pinned for the README's second command, in requirements.txt's test section (last)
    text = (REPO / "requirements.txt").read_text()
    assert re.search(r"^# --- tests.*\n(.*\n)*pytest==", text, re.M), "requirements.txt: pytest belongs to the tests section"


def test_python_version_is_one_statement():
    """requires-python admits the tested interpreter and every env's python pin."""
    spec = SpecifierSet(PROJECT["requires-python"])
    assert spec.contains(".".join(map(str, sys.version_info[:3]))), f"this interpreter is outside requires-python {spec}"
    for env in sorted((REPO / "envs").glob("*.yaml")):
        deps = yaml.safe_load(env.read_text())["dependencies"]
        (python,) = [d for d in deps if isinstance(d, str) and d.startswith("python")]
        version = python.split("=", 1)[1]
        assert spec.contains(version + ".0"), f"{env.name}: {python} is outside requires-python {spec}"
        assert version == "3.11", f"{env.name}: {python}; the tested version is 3.11"


def test_license_file_is_the_apache_license():
    assert PROJECT["license"] == "Apache-2.0"
    for name in PROJECT["license-files"]:
        text = (REPO / name).read_text()
        assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"], f"{name} is not the Apache License 2.0"
        assert "END OF TERMS AND CONDITIONS" in text


@pytest.mark.parametrize("extra", ["features", "report"])
def test_light_stages_bring_no_torch(extra):
    names = {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]} | {canonicalize_name(r.name) for r in extra_requirements(extra)}
    assert not names & {"torch", "transformers"}, f"mmsae[{extra}] pulls {sorted(names & {'torch', 'transformers'})}"
