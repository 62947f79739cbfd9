"""Natural English text as text-only samples: ``corpus.text_source``.

The built-in source ``python-topics`` is the topic help of CPython's own documentation
(``pydoc_data.topics``: the Language Reference and the built-in types' pages that ``help("if")``
prints). It ships inside every CPython (no install, no download), is modern technical English prose
(465k characters and 113k SmolLM2 tokens in CPython 3.11; 351k characters, 80k tokens, 398 passages
of at most 256 tokens after cleanup), and is under the PSF License Agreement version 2, which covers
CPython's documentation (code examples in it are also under Zero-Clause BSD). Its text differs
slightly between CPython releases, so the passages do too; :func:`text_samples` logs a fingerprint
of the text it used. ``file`` reads a UTF-8 plain-text file of the user's (``path``), paragraphs
separated by blank lines.

Cleanup (deterministic, :func:`prose_paragraphs`): the text is split into blocks at blank lines;
heading underlines (``*****``, ``=====``, ``-----``) are dropped and the heading kept as its own
paragraph; a block that is not prose is dropped: a grammar production (``::=``), an interactive
session (``>>>``), a table, a block in which fewer than :data:`MIN_WORD_FRACTION` of the
whitespace-separated tokens are words (code, signatures such as ``object.__init__(self)``), a block
of six or more tokens of which fewer than :data:`MIN_FUNCTION_WORD_FRACTION` are English function
words (:data:`FUNCTION_WORDS`, none a Python keyword: code made of words), and a shorter non-heading
block unless it is all words ending in ``.:!?``. A kept block is unwrapped (its lines joined with
single spaces; a bullet item starts a new line) and reStructuredText emphasis (``*word*``,
``**word**``) loses its asterisks.

Passages (:func:`passages`) are runs of whole paragraphs of one document, at most ``passage_tokens``
long (a longer paragraph is split at sentence ends). Token counts are exact with a tokenizer, else
``ceil(characters / CHARS_PER_TOKEN)`` (the corpus builder has no tokenizer; on ``python-topics``
the estimate's total is within 1% of SmolLM2's count, a single passage's within about 30%). Passages
are numbered in text order; a slice skips passages until ``skip_tokens`` have been passed over and
takes passages while the total stays within ``max_tokens``, so ``{skip_tokens: 0, max_tokens: N}``
and ``{skip_tokens: N, ...}`` are disjoint. Sample ids are ``text-<name>-<index>`` with the
passage's index in the whole text, stable whatever the slice.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from pathlib import Path

from pydoc_data.topics import topics as PYTHON_TOPICS

from mmsae.data.sample import Sample

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4.4  # SmolLM2: 4.38 characters per token on the cleaned python-topics text
MIN_WORD_FRACTION = 0.6
MIN_FUNCTION_WORD_FRACTION = 0.08
# English function words that are not Python keywords (code written in words has few of them)
FUNCTION_WORDS = frozenset(
    "the a an of to are be been being that this it its by on can which at was were when may must will would should "
    "has have had also than then there they their these those such but only any all each into does do other".split())
SOURCES = ("python-topics", "file")
ROLES = ("user", "assistant")
KEYS = ("name", "path", "max_tokens", "skip_tokens", "passage_tokens", "as", "prompt")

_UNDERLINE = re.compile(r"^\s*([*=\-~^\"'`#+])\1{2,}\s*$")
_TABLE = re.compile(r"^\s*(\+[-=+]+\+|\|.*\||=+(\s+=+)+)\s*$")
_BULLET = re.compile(r"^(\*|-|\d+\.|\(\d+\))\s+")
_WORD = re.compile(r"^[\"'(\[“‘*]*[A-Za-z][A-Za-z'’-]*[\"')\]”’*.,;:!?]*$")
_EMPHASIS = re.compile(r"(?<![\w*])(\*\*?)([^\s*][^*]*?)\1(?![\w*])")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z“\"(])")


def _is_prose(lines: list[str], heading: bool) -> bool:
    text = " ".join(lines)
    if "::=" in text or any(ln.lstrip().startswith((">>>", "...")) for ln in lines):
        return False
    if any(_TABLE.match(ln) for ln in lines):
        return False
    tokens = text.split()
    if not tokens or sum(bool(_WORD.match(t)) for t in tokens) / len(tokens) < MIN_WORD_FRACTION:
        return False
    if heading:
        return True
    if len(tokens) < 6:  # a short line of prose is a word run that ends like a sentence ("See also:")
        return all(_WORD.match(t) for t in tokens) and text.rstrip()[-1] in ".:!?"
    # code can be made of words too (``def f(name, bases):``); prose has English function words
    function_words = sum(t.lower().strip(".,;:!?\"'()“”‘’") in FUNCTION_WORDS for t in tokens)
    return function_words / len(tokens) >= MIN_FUNCTION_WORD_FRACTION


def _unwrap(lines: list[str]) -> str:
    out: list[str] = []
    for ln in lines:
        ln = ln.strip()
        if out and not _BULLET.match(ln):
            out[-1] = f"{out[-1]} {ln}"
        else:
            out.append(ln)
    return "\n".join(_EMPHASIS.sub(r"\2", re.sub(r"[ \t]+", " ", ln)) for ln in out)


def prose_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of a plain-text document, cleaned as the module docstring says.

    Args:
        text: the document; paragraphs separated by blank lines.

    Returns:
        Paragraphs in order, each unwrapped to single lines (one line per bullet item).
    """
    blocks: list[tuple[list[str], bool]] = []  # (lines, is a heading)
    current: list[str] = []
    lines = text.splitlines()
    for i, ln in enumerate(lines):
        underlined = i + 1 < len(lines) and bool(_UNDERLINE.match(lines[i + 1])) and bool(ln.strip())
        if not ln.strip() or (_UNDERLINE.match(ln) and i > 0 and lines[i - 1].strip()) or underlined:
            if current:
                blocks.append((current, False))
            current = []
            if underlined:
                blocks.append(([ln], True))
            continue
        current.append(ln)
    if current:
        blocks.append((current, False))
    return [_unwrap(b) for b, heading in blocks if _is_prose(b, heading)]


def source_documents(source: dict) -> list[tuple[str, str]]:
    """``(document name, text)`` of a text source, in a fixed order.

    Raises:
        ValueError: an unknown ``name`` or a ``file`` source without ``path``.
        FileNotFoundError: ``path`` does not exist.
    """
    name = source["name"]
    if name == "python-topics":
        return [(k, PYTHON_TOPICS[k]) for k in sorted(PYTHON_TOPICS)]
    if name == "file":
        if not source.get("path"):
            raise ValueError("corpus.text_source.path: a file is required with name 'file'")
        path = Path(source["path"])
        if not path.is_file():
            raise FileNotFoundError(f"corpus.text_source.path: {path} does not exist")
        return [(path.name, path.read_text(encoding="utf-8"))]
    raise ValueError(f"corpus.text_source.name: {name!r} is not one of {list(SOURCES)}")


def _counter(tokenizer):
    if tokenizer is None:
        return lambda s: math.ceil(len(s) / CHARS_PER_TOKEN)
    return lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])


def _pieces(paragraph: str, limit: int, count) -> list[str]:
    """A paragraph, or its sentences grouped under ``limit`` tokens when it is longer."""
    if count(paragraph) <= limit:
        return [paragraph]
    out: list[str] = []
    for sentence in _SENTENCE_END.split(paragraph):
        if out and count(f"{out[-1]} {sentence}") <= limit:
            out[-1] = f"{out[-1]} {sentence}"
        else:
            out.append(sentence)
    return out


def passages(documents: list[tuple[str, str]], passage_tokens: int, tokenizer=None) -> list[tuple[str, int]]:
    """Every passage of the documents in order, with its token count.

    Args:
        documents: ``(name, text)`` pairs (:func:`source_documents`).
        passage_tokens: the most tokens of a passage (a single sentence longer than it stays whole).
        tokenizer: a Hugging Face tokenizer to count tokens exactly; None = ``ceil(chars / CHARS_PER_TOKEN)``.

    Returns:
        ``[(passage text, tokens)]``: whole paragraphs of one document joined by blank lines.
    """
    count = _counter(tokenizer)
    out: list[tuple[str, int]] = []
    for _, text in documents:
        current: list[str] = []
        for para in prose_paragraphs(text):
            for piece in _pieces(para, passage_tokens, count):
                if current and count("\n\n".join([*current, piece])) > passage_tokens:
                    out.append(("\n\n".join(current), count("\n\n".join(current))))
                    current = []
                current.append(piece)
        if current:
            out.append(("\n\n".join(current), count("\n\n".join(current))))
    return out


def text_samples(source: dict, tokenizer=None) -> list[Sample]:
    """Text-only samples from a ``corpus.text_source`` section.

    Args:
        source: ``{"name": "python-topics"|"file", "path": str|None, "max_tokens": int|None,
            "skip_tokens": int, "passage_tokens": int, "as": "user"|"assistant", "prompt": str}``
            (defaults in ``config/schema.yaml``). With ``as: user`` a passage is the user's prompt;
            with ``as: assistant`` it is the assistant's answer (``Sample.turns``) to ``prompt``, so
            its tokens have the answer role.
        tokenizer: counts tokens exactly; None estimates them from characters (module docstring).

    Returns:
        Samples ``text-<name>-<index>`` for the passages after the first ``skip_tokens`` tokens, in
        text order, whose tokens add up to at most ``max_tokens`` (None: all of them).

    Raises:
        ValueError: a missing or invalid key, naming it as ``corpus.text_source.<key>``.
        FileNotFoundError: a ``file`` source whose ``path`` does not exist.
    """
    missing = [k for k in KEYS if k not in source]
    unknown = sorted(set(source) - set(KEYS))
    if missing or unknown:
        raise ValueError(f"corpus.text_source: missing keys {missing}, unknown keys {unknown} (keys: {list(KEYS)})")
    for key, low in (("max_tokens", 1), ("passage_tokens", 1), ("skip_tokens", 0)):
        value = source[key]
        if not (value is None and key == "max_tokens") and (not isinstance(value, int) or value < low):
            raise ValueError(f"corpus.text_source.{key}: {value!r} is not an integer >= {low}")
    if source["as"] not in ROLES:
        raise ValueError(f"corpus.text_source.as: {source['as']!r} is not one of {list(ROLES)}")
    docs = source_documents(source)
    fingerprint = hashlib.sha256("\0".join(t for _, t in docs).encode()).hexdigest()[:12]
    samples, seen, taken = [], 0, 0
    for i, (text, n) in enumerate(passages(docs, source["passage_tokens"], tokenizer)):
        seen += n
        if seen <= source["skip_tokens"]:
            continue
        if source["max_tokens"] is not None and taken + n > source["max_tokens"]:
            break
        taken += n
        sid = f"text-{source['name']}-{i:05d}"
        samples.append(Sample(sid, source["prompt"], None, None, (("assistant", text),)) if source["as"] == "assistant"
                       else Sample(sid, text))
    log.info("corpus.text_source %s (text sha256 %s): %d passages, %d tokens (%s) after skipping %d",
             source["name"], fingerprint, len(samples), taken, "tokenizer" if tokenizer else "estimated", source["skip_tokens"])
    return samples
