"""Every rule's conda env lists, pinned, each third-party package its entry script imports - directly
or through the mmsae modules it reaches (imports inside functions included)."""

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
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
    if module in ALIASES:
        return ALIASES[module]
    dists = md.packages_distributions().get(module)
    assert dists, f"no installed distribution provides {module!r}"
    return dists[0].lower()


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
