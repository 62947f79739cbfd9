"""Prompts and answer parsing of explanation scoring by detection and fuzzing, after EleutherAI
delphi's method (arXiv 2410.13928 §3), on our OpenAI-compatible client.

Two prompt sets (``scoring.prompts``):

* ``ours`` (default): our own wording and our own few-shot examples, following delphi's published
  method - the scorer reads a feature's explanation, then numbered examples (``Example {i}: ...``,
  0-based); detection asks which examples show the feature; fuzzing marks token runs with ``<<``
  ``>>`` and asks whether every marked run is what the explanation describes. In ``batch`` mode the
  answer is a bracketed list of 0/1, one per example (parsed by :func:`parse_predictions`); in
  ``logprob`` mode one example per request and the answer is a single ``1`` or ``0``, scored by the
  probability of ``1`` (:func:`probability_of_one`).
* ``delphi``: delphi's own system prompts and few-shot turns (``delphi/scorers/classifier/prompts/
  {detection,fuzz}_prompt.py`` of the ``eai-delphi`` package), read at run time from the installed
  package (:func:`delphi_prompt_texts`; never copied here). Text features in ``batch`` mode only.

Image features have no delphi prompt: both sets use our image prompts (same answer formats,
zero-shot, each image introduced by its ``Example {i}:`` label).

Changing :data:`SCORING_VERSION` or any text below changes every request (and its cache key); the
workflow passes :func:`prompt_params` (a hash of the text used) as a param, so scores are redone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re

from mmsae.explain.prompts import png_data_url

SCORING_VERSION = "v2"
PROMPT_SETS = ("ours", "delphi")
MODES = ("batch", "logprob")
DELPHI_PACKAGE = "eai-delphi"
L, R = "<<", ">>"  # delphi's markers (a notation, not text)

_LIST_ANSWER = ("Reply with a list in square brackets holding one 0 or 1 per example, in the order of the "
                "examples, and nothing else.")
_ONE_ANSWER = "Reply with the single character 1 or 0 and nothing else."

DETECTION_SYSTEM = """You check descriptions of features of a neural network against text.

Each request gives one feature description and some numbered text snippets. Some snippets come from places where the feature fires; the others were picked at random where it does not.

Decide, snippet by snippet, whether the snippet contains what the description says the feature responds to: 1 if it does, 0 if it does not.
{answer}"""

FUZZING_SYSTEM = """You check descriptions of features of a neural network against text.

Each request gives one feature description and some numbered text snippets. In every snippet one or more stretches are marked, each written between << and >>. For some snippets the marks sit where the feature fires; for others they were placed at random.

Decide, snippet by snippet, whether every marked stretch is an instance of what the description says: 1 if all of them are, 0 if any marked stretch is not.
{answer}"""

DETECTION_FEWSHOT = [
    ("""Feature description: names of rivers.

Text examples:

Example 0: we rented a boat and drifted down the Danube past Vienna
Example 1: the recipe calls for two cups of flour and a pinch of salt
Example 2: the Mekong floods every monsoon season, feeding the rice fields
Example 3: please restart the router before calling support
""", [1, 0, 1, 0]),
    ("""Feature description: a closing parenthesis that ends a function call in code.

Text examples:

Example 0: the committee will meet again next Thursday at noon
Example 1: birds migrate south once the days grow shorter
Example 2: she wrapped the gift in blue paper and tied a bow
""", [0, 0, 0]),
]

FUZZING_FEWSHOT = [
    ("""Feature description: units of time such as minutes and hours.

Text examples:

Example 0: bake for forty<< minutes>> until golden
Example 1: the train was two<< hours>> late again
Example 2: she painted the<< fence>> bright green
Example 3: wait a few<< seconds>> and then<< press>> the button
""", [1, 1, 0, 0]),
    ("""Feature description: negation words such as "not" and "never".

Text examples:

Example 0: I would<< never>> have guessed the ending
Example 1: this is<< not>> what we ordered
""", [1, 1]),
]

GENERATION_PROMPT = """Feature description: {explanation}

Text examples:

{examples}
"""

IMAGE_DETECTION_SYSTEM = """You check descriptions of features of a vision-language network against images.

Each request gives one feature description and some numbered images. Some images come from places where the feature fires; the others were picked at random among images where it never fires.

Decide, image by image, whether the image contains what the description says the feature responds to: 1 if it does, 0 if it does not.
{answer}"""

IMAGE_FUZZING_SYSTEM = """You check descriptions of features of a vision-language network against images.

Each request gives one feature description and some numbered images. In every image one region is left bright and the rest is darkened. For some images the bright region is where the feature fires; for others it was placed at random.

Decide, image by image, whether the bright region shows what the description says: 1 if it does, 0 if it does not.
{answer}"""

OUR_TEXTS = (DETECTION_SYSTEM, FUZZING_SYSTEM, GENERATION_PROMPT, IMAGE_DETECTION_SYSTEM, IMAGE_FUZZING_SYSTEM,
             _LIST_ANSWER, _ONE_ANSWER, *(u + str(a) for u, a in DETECTION_FEWSHOT + FUZZING_FEWSHOT))

# the module files of eai-delphi that hold its classifier prompts, and the names read from them
DELPHI_MODULES = {"detection": "delphi/scorers/classifier/prompts/detection_prompt.py",
                  "fuzzing": "delphi/scorers/classifier/prompts/fuzz_prompt.py"}
DELPHI_NAMES = ("DSCORER_SYSTEM_PROMPT", "default", "GENERATION_PROMPT")


def delphi_prompt_texts() -> dict[str, dict]:
    """delphi's classifier prompts, read from the installed ``eai-delphi`` package at run time:
    ``{"detection" | "fuzzing": {"system": str, "fewshot": [chat turns], "generation": str}}``.

    The two prompt modules are loaded from their files (``importlib.metadata`` locates them), so
    delphi's package ``__init__`` (which imports torch and its clients) is not run.

    Raises:
        ImportError: ``eai-delphi`` is not installed (``pip install eai-delphi``), or its prompt
            modules lack the expected names.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(DELPHI_PACKAGE)
    except metadata.PackageNotFoundError as exc:
        raise ImportError(f"scoring.prompts: delphi needs the package {DELPHI_PACKAGE!r} installed "
                          f"(pip install {DELPHI_PACKAGE}); use scoring.prompts: ours without it") from exc
    out = {}
    for method, rel in DELPHI_MODULES.items():
        path = dist.locate_file(rel)
        spec = importlib.util.spec_from_file_location(f"_mmsae_delphi_{method}_prompt", str(path))
        if spec is None or not path.exists():
            raise ImportError(f"{DELPHI_PACKAGE} {dist.version}: no prompt module {rel} at {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        missing = [n for n in DELPHI_NAMES if not hasattr(module, n)]
        if missing:
            raise ImportError(f"{DELPHI_PACKAGE} {dist.version}: {rel} lacks {missing}")
        out[method] = {"system": module.DSCORER_SYSTEM_PROMPT, "fewshot": list(module.default),
                       "generation": module.GENERATION_PROMPT}
    return out


def _shown(token: str) -> str:
    """A token as the scorer sees it: line breaks written ``\\n``, so each example stays on its
    ``Example {i}:`` line."""
    return token.replace("\r", "").replace("\n", "\\n")


def highlight_tokens(tokens: list[str], marked: set[int] | list[bool]) -> str:
    """Join tokens, wrapping each run of marked positions in ``<<`` ``>>`` (adjacent marked tokens
    share one pair of markers, as in delphi's fuzzing). ``<image>`` placeholders are dropped, line
    breaks shown as ``\\n``."""
    flags = [i in marked for i in range(len(tokens))] if isinstance(marked, set) else list(marked)
    out, open_ = [], False
    for t, m in zip(tokens, flags):
        if t == "<image>":
            continue
        if m and not open_:
            out.append(L)
        elif not m and open_:
            out.append(R)
        open_ = m
        out.append(_shown(t))
    if open_:
        out.append(R)
    return "".join(out)


def plain_text(tokens: list[str]) -> str:
    """The context as the detection scorer sees it: the tokens joined, unmarked (``<image>``
    placeholders dropped, line breaks shown as ``\\n``)."""
    return "".join(_shown(t) for t in tokens if t != "<image>")


def _check(method: str, mode: str, prompts: str) -> None:
    if method not in ("detection", "fuzzing"):
        raise ValueError(f"scoring method {method!r} is not one of detection, fuzzing")
    if mode not in MODES:
        raise ValueError(f"scoring.mode {mode!r} is not one of {', '.join(MODES)}")
    if prompts not in PROMPT_SETS:
        raise ValueError(f"scoring.prompts {prompts!r} is not one of {', '.join(PROMPT_SETS)}")
    if prompts == "delphi" and mode == "logprob":
        raise ValueError("scoring.prompts: delphi asks for a list of answers; scoring.mode: logprob (one example, "
                         "a one-token answer) needs scoring.prompts: ours")


def _fewshot_turns(shots: list[tuple[str, list[int]]], mode: str) -> list[dict]:
    """Our few-shot turns: in batch mode each example set with its list; in logprob mode each
    example of each set on its own, answered ``1`` or ``0``."""
    turns = []
    for user, answers in shots:
        if mode == "batch":
            turns += [{"role": "user", "content": user}, {"role": "assistant", "content": "[" + ",".join(map(str, answers)) + "]"}]
            continue
        head, body = user.split("Text examples:\n\n")
        for line, a in zip(body.strip().splitlines(), answers):
            text = line.split(": ", 1)[1] if ": " in line else ""
            turns += [{"role": "user", "content": f"{head}Text examples:\n\nExample 0: {text}\n"},
                      {"role": "assistant", "content": str(a)}]
    return turns


def text_messages(method: str, explanation: str, texts: list[str], mode: str = "batch", prompts: str = "ours",
                  delphi: dict | None = None) -> list[dict]:
    """The chat for one request of text examples: system prompt, few-shot turns, then the
    explanation and ``Example {i}: {text}`` lines.

    Args:
        method: ``detection`` or ``fuzzing``; mode: ``batch`` (any number of texts, a list answer)
            or ``logprob`` (exactly one text, a ``1``/``0`` answer); prompts: ``ours`` or ``delphi``.
        delphi: :func:`delphi_prompt_texts` (read once by the caller); read here when None.

    Raises:
        ValueError: an unknown method, mode or prompt set; delphi's prompts in logprob mode; more
            than one text in logprob mode.
        ImportError: ``prompts="delphi"`` without the eai-delphi package.
    """
    _check(method, mode, prompts)
    if mode == "logprob" and len(texts) != 1:
        raise ValueError(f"logprob mode shows one example per request, not {len(texts)}")
    examples = "\n".join(f"Example {i}: {t}" for i, t in enumerate(texts))
    if prompts == "delphi":
        d = (delphi or delphi_prompt_texts())[method]
        return [{"role": "system", "content": d["system"]}, *d["fewshot"],
                {"role": "user", "content": d["generation"].format(explanation=explanation, examples=examples)}]
    system, shots = (DETECTION_SYSTEM, DETECTION_FEWSHOT) if method == "detection" else (FUZZING_SYSTEM, FUZZING_FEWSHOT)
    system = system.format(answer=_LIST_ANSWER if mode == "batch" else _ONE_ANSWER)
    return [{"role": "system", "content": system}, *_fewshot_turns(shots, mode),
            {"role": "user", "content": GENERATION_PROMPT.format(explanation=explanation, examples=examples)}]


def image_messages(method: str, explanation: str, pngs: list[bytes], mode: str = "batch") -> list[dict]:
    """The chat for one request of image examples (both prompt sets): our image system prompt, the
    explanation, then ``Example {i}:`` and the image (a PNG data URL) for each example; zero-shot.

    Raises:
        ValueError: an unknown method or mode; more than one image in logprob mode.
    """
    _check(method, mode, "ours")
    if mode == "logprob" and len(pngs) != 1:
        raise ValueError(f"logprob mode shows one example per request, not {len(pngs)}")
    system = (IMAGE_DETECTION_SYSTEM if method == "detection" else IMAGE_FUZZING_SYSTEM).format(
        answer=_LIST_ANSWER if mode == "batch" else _ONE_ANSWER)
    content = [{"type": "text", "text": f"Feature description: {explanation}\n\nImage examples:"}]
    for i, png in enumerate(pngs):
        content += [{"type": "text", "text": f"Example {i}:"}, {"type": "image_url", "image_url": {"url": png_data_url(png)}}]
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


_LIST = re.compile(r"\[.*?\]", re.S)
_ENTRY = {"0": 0, "1": 1, "false": 0, "true": 1}


def parse_predictions(text: str | None, n: int) -> tuple[list[int] | None, str]:
    """The scorer's 0/1 per example (batch mode): the first ``[...]`` in the answer must hold exactly
    ``n`` entries, each 0 or 1 (``True``/``False`` are accepted too), as delphi parses its answers.

    Returns:
        ``(predictions, "ok")``, or ``(None, "malformed")`` for no list, a list of another length,
        or an entry that is not 0/1 - the whole request then has no prediction. Never raises.
    """
    m = _LIST.search(text or "")
    if m is None:
        return None, "malformed"
    inner = m.group(0)[1:-1].strip()
    entries = [e.strip().strip("'\"").lower() for e in inner.split(",")] if inner else []
    if len(entries) != n or any(e not in _ENTRY for e in entries):
        return None, "malformed"
    return [_ENTRY[e] for e in entries], "ok"


def probability_of_one(logprobs: list[dict] | None) -> float | None:
    """P("1") / (P("0") + P("1")) from the first answer token's ``top_logprobs`` (OpenAI chat
    completions' ``choices[0].logprobs.content``: ``[{"token", "logprob", "top_logprobs": [{"token",
    "logprob"}]}]``); candidates are compared stripped of whitespace, as delphi normalises over the
    two answers.

    Returns:
        The probability in [0, 1]; None without logprobs or when neither ``0`` nor ``1`` is among
        the top candidates.
    """
    if not logprobs:
        return None
    first = logprobs[0] or {}
    cands = first.get("top_logprobs") or [{"token": first.get("token"), "logprob": first.get("logprob")}]
    p = {"0": 0.0, "1": 0.0}
    for c in cands:
        tok = str(c.get("token") or "").strip()
        if tok in p and c.get("logprob") is not None:
            p[tok] += math.exp(c["logprob"])
    total = p["0"] + p["1"]
    return p["1"] / total if total > 0 else None


def parse_single(text: str | None) -> int | None:
    """A logprob-mode answer's text as a prediction: 1 or 0 when it is (stripped) ``1``/``0``, else None."""
    t = (text or "").strip().strip("'\".").lower()
    return _ENTRY.get(t)


def prompt_params(prompts: str = "ours", mode: str = "batch") -> dict:
    """The prompt set, mode, version and a hash of the prompt text used: a rule's ``prompt`` param, so
    that changing any of them redoes the answers.

    For ``delphi`` the hash covers the text read from the installed eai-delphi package; when the
    package is absent (e.g. where the Snakefile is loaded) it covers the choice only
    (``text_sha256`` is then ``"delphi-not-installed"``), and the scoring job itself fails with
    :func:`delphi_prompt_texts`' error.
    """
    if prompts not in PROMPT_SETS:
        raise ValueError(f"scoring.prompts {prompts!r} is not one of {', '.join(PROMPT_SETS)}")
    texts = list(OUR_TEXTS[3:5]) + [_LIST_ANSWER, _ONE_ANSWER]  # image prompts: used by both sets
    if prompts == "ours":
        texts = list(OUR_TEXTS)
    else:
        try:
            d = delphi_prompt_texts()
        except ImportError:
            return {"version": SCORING_VERSION, "prompts": prompts, "mode": mode, "text_sha256": "delphi-not-installed"}
        texts += [repr(d[m]) for m in sorted(d)]
    return {"version": SCORING_VERSION, "prompts": prompts, "mode": mode,
            "text_sha256": hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]}
