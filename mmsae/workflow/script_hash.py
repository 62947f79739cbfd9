"""The code hash each rule carries in its params (``script=script_hash_of(...)`` in ``rules/common.smk``): a digest of the
code of the package modules the rule's entry script imports, directly or not, so that an edit of
that code reruns exactly the rules that reach it, and an edit of prose (comments, docstrings,
layout) reruns nothing.

Used by the Snakefile when it loads, never by a job: the jobs' own helpers are
:mod:`mmsae.core.job`, so that a change here does not count as a change of every rule's code.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tokenize
from pathlib import Path


IMPORT_RE = re.compile(
    r"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]+)|import[ \t]+([^\n#;]+))", re.M)
_IMPORTS: dict[tuple, list[tuple[int, str, list[str]]]] = {}


def _file_key(path: Path) -> tuple:
    """The memo key of a file's contents: path, size, modification and change times (a restore
    that keeps the old modification time, as ``cp -p`` does, still changes the change time)."""
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(relative level, module, imported names) of every import statement in ``path``; read with a
    regular expression (the Snakefile hashes at every load, and parsing the ASTs took seconds),
    memoised by :func:`_file_key`."""
    key = _file_key(path)
    if key not in _IMPORTS:
        out = []
        for m in IMPORT_RE.finditer(path.read_text()):
            if m.group(3):  # import a.b, c as d
                out += [(0, n.split(" as ")[0].strip(), []) for n in m.group(3).split(",")]
            else:
                mod = m.group(1)
                level = len(mod) - len(mod.lstrip("."))
                names = [n.split(" as ")[0].strip() for n in m.group(2).strip("()").replace("\\", "").split(",")]
                out.append((level, mod.lstrip("."), [n for n in names if n]))
        _IMPORTS[key] = out
    return _IMPORTS[key]


def module_files(script: str | Path, root: str | Path, package: str = "mmsae") -> list[Path]:
    """The files of ``package`` that ``script`` imports, directly or through other package modules.

    Imports are read from the source (``import p.x``, ``from p.x import y``, relative imports in the
    package, also inside functions), never executed; every parent ``__init__.py`` of an imported
    module counts. ``root`` is the folder that holds the package folder. Returns the sorted files.
    """
    root = Path(root)
    seen: set[Path] = set()

    def module_path(name: str) -> list[Path]:
        parts = name.split(".")
        if parts[0] != package:
            return []
        out = []
        for i in range(1, len(parts) + 1):
            base = root.joinpath(*parts[:i])
            if (base / "__init__.py").is_file():
                out.append(base / "__init__.py")
            elif base.with_suffix(".py").is_file():
                out.append(base.with_suffix(".py"))
        return out

    def visit(path: Path, modname: str | None):
        names = []
        for level, module, imported in _imports(path):
            if level and modname:
                pkg = modname.split(".")
                pkg = pkg[: len(pkg) - level + (path.name == "__init__.py")]
                base = ".".join(pkg + ([module] if module else []))
            else:
                base = module
            names.append(base)
            names += [f"{base}.{n}" for n in imported]  # a submodule imported by name
        for name in names:
            for f in module_path(name):
                if f not in seen:
                    seen.add(f)
                    rel = f.relative_to(root).with_suffix("")
                    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
                    visit(f, ".".join(parts))

    visit(Path(script), None)
    return sorted(seen)


_STATEMENT_START = (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
_CODE: dict[tuple, bytes] = {}


def source_tokens(path: Path) -> bytes:
    """The tokens of a Python file that can change what it does, one per line as ``type string``.

    Left out: comments, blank lines, line continuations, spacing, indentation width and string
    statements (docstrings, and any bare string literal that is a whole statement, which Python
    evaluates and drops); f-strings are kept (their expressions run). Read as Python reads it (its coding cookie or BOM,
    else UTF-8; :func:`tokenize.open`), token types by name, so one Python version gives one result
    (3.12 splits f-strings into more tokens). A file that does not tokenize (half edited, or not
    Python) is taken as its bytes, so that the Snakefile still loads and the rules reaching it rerun
    (and fail there, naming it). Memoised by :func:`_file_key`.
    """
    key = _file_key(path)
    if key in _CODE:
        return _CODE[key]
    try:
        with tokenize.open(path) as f:
            toks = [t for t in tokenize.generate_tokens(f.readline) if t.type not in (tokenize.COMMENT, tokenize.NL)]
    except (tokenize.TokenError, SyntaxError, UnicodeDecodeError) as e:
        logging.getLogger("mmsae").warning("%s does not tokenize (%s): its code hash is over its bytes", path, e)
        _CODE[key] = b"bytes\0" + path.read_bytes()
        return _CODE[key]
    kept: list[tuple[int, str]] = []
    i = 0
    while i < len(toks):
        j = i
        while j < len(toks) and toks[j].type == tokenize.STRING:
            j += 1
        plain = all("f" not in t.string[: len(t.string) - len(t.string.lstrip("rRbBuUfF"))].lower() for t in toks[i:j])
        if (j > i and plain and (not kept or kept[-1][0] in _STATEMENT_START)
                and (j == len(toks) or toks[j].type in (tokenize.NEWLINE, tokenize.ENDMARKER))):
            i = j + (j < len(toks) and toks[j].type == tokenize.NEWLINE)  # the string statement and its end
            continue
        kept += [(t.type, t.string) for t in toks[i: max(j, i + 1)]]
        i = max(j, i + 1)
    _CODE[key] = "\n".join(f"{tokenize.tok_name[t]} {'' if t == tokenize.INDENT else repr(s)}" for t, s in kept).encode()
    return _CODE[key]


def script_hash(script: str | Path, root: str | Path, package: str = "mmsae") -> str:
    """SHA-256 (16 hex digits) over the code of the package modules ``script`` imports (see
    :func:`module_files`; each module's :func:`source_tokens`, so an edit of its comments, docstrings or
    layout changes nothing), so that editing one reruns the rules whose scripts reach it."""
    h = hashlib.sha256()
    for f in module_files(script, root, package):
        h.update(str(f.relative_to(root)).encode() + b"\0" + source_tokens(f) + b"\0")
    return h.hexdigest()[:16]
