"""Prompts and answer parsing of explanation scoring by detection and fuzzing (EleutherAI delphi,
arXiv 2410.13928 §3), on our OpenAI-compatible client.

The text prompts are delphi's (EleutherAI/delphi, ``delphi/scorers/classifier/prompts/
detection_prompt.py`` and ``fuzz_prompt.py``, commit 3c2e139): the same system prompt, the same three
few-shot user/assistant turns from Neuronpedia latents, the same ``Latent explanation: ...`` /
``Text examples:`` layout with ``Example {i}: {text}`` lines (0-based, as delphi's
``Classifier._build_prompt``) and, for fuzzing, the same ``<<`` ``>>`` markers
(``delphi/scorers/classifier/sample.py``). The answer is a Python list of 0/1, one per example, parsed
as delphi's ``Classifier._parse``: the first ``[...]`` in the answer, exactly one entry per example.

Image features have no delphi prompt: :func:`image_messages` keeps delphi's system prompt with
"text" replaced by "images", its answer format, and labels each image ``Example {i}:`` before it
(zero-shot: delphi's few-shot examples are text).

Changing :data:`SCORING_VERSION` or any text below changes every request (and its cache key); the
workflow passes a hash of the text as a param, so scores are redone.
"""

from __future__ import annotations

import re

from mmsae.explain.prompts import png_data_url

SCORING_VERSION = "v1"
L, R = "<<", ">>"  # delphi's markers

# delphi/scorers/classifier/prompts/detection_prompt.py, verbatim
DETECTION_SYSTEM = """You are an intelligent and meticulous linguistics researcher.

You will be given a certain latent of text, such as "male pronouns" or "text with negative sentiment".

You will then be given several text examples. Your task is to determine which examples possess the latent.

For each example in turn, return 1 if the sentence is correctly labeled or 0 if the tokens are mislabeled. You must return your response in a valid Python list. Do not return anything else besides a Python list.
"""
DETECTION_FEWSHOT = [
    ("""Latent explanation: Words related to American football positions, specifically the tight end position.

Test examples:

Example 0:<|endoftext|>Getty ImagesĊĊPatriots tight end Rob Gronkowski had his bossâĢĻ
Example 1: names of months used in The Lord of the Rings:ĊĊâĢľâĢ¦the
Example 2: Media Day 2015ĊĊLSU defensive end Isaiah Washington (94) speaks to the
Example 3: shown, is generally not eligible for ads. For example, videos about recent tragedies,
Example 4: line, with the left side âĢĶ namely tackle Byron Bell at tackle and guard Amini
""", "[1,0,0,0,1]"),
    ("""Latent explanation: The word "guys" in the phrase "you guys".

Test examples:

Example 0: enact an individual health insurance mandate?âĢĿ, Pelosi's response was to dismiss both
Example 1: birth control access<|endoftext|> but I assure you women in Kentucky aren't laughing as they struggle
Example 2: du Soleil Fall Protection Program with construction requirements that do not apply to theater settings because
Example 3:Ċ<|endoftext|> distasteful. Amidst the slime lurk bits of Schadenfre
Example 4: the<|endoftext|>ľI want to remind you all that 10 days ago (director Massimil
""", "[0,0,0,0,0]"),
    ("""Latent explanation: "of" before words that start with a capital letter.

Test examples:

Example 0: climate, TomblinâĢĻs Chief of Staff Charlie Lorensen said.Ċ
Example 1: no wonderworking relics, no true Body and Blood of Christ, no true Baptism
Example 2:ĊĊDeborah Sathe, Head of Talent Development and Production at Film London,
Example 3:ĊĊIt has been devised by Director of Public Prosecutions (DPP)
Example 4: and fair investigation not even include the Director of Athletics? Â· Finally, we believe the
""", "[1,1,1,1,1]"),
]

# delphi/scorers/classifier/prompts/fuzz_prompt.py, verbatim
FUZZING_SYSTEM = """You are an intelligent and meticulous linguistics researcher.

You will be given a certain latent of text, such as "male pronouns" or "text with negative sentiment". You will be given a few examples of text that contain this latent. Portions of the sentence which strongly represent this latent are between tokens << and >>.

Some examples might be mislabeled. Your task is to determine if every single token within << and >> is correctly labeled. Consider that all provided examples could be correct, none of the examples could be correct, or a mix. An example is only correct if every marked token is representative of the latent

For each example in turn, return 1 if the sentence is correctly labeled or 0 if the tokens are mislabeled. You must return your response in a valid Python list. Do not return anything else besides a Python list.
"""
FUZZING_FEWSHOT = [
    ("""Latent explanation: Words related to American football positions, specifically the tight end position.

Test examples:

Example 0:<|endoftext|>Getty ImagesĊĊPatriots<< tight end>> Rob Gronkowski had his bossâĢĻ
Example 1: posted<|endoftext|>You should know this<< about>> offensive line coaches: they are large, demanding<< men>>
Example 2: Media Day 2015ĊĊLSU<< defensive>> end Isaiah Washington (94) speaks<< to the>>
Example 3:<< running backs>>," he said. .. Defensive<< end>> Carroll Phillips is improving and his injury is
Example 4:<< line>>, with the left side âĢĶ namely<< tackle>> Byron Bell at<< tackle>> and<< guard>> Amini
""", "[1,0,0,1,1]"),
    ("""Latent explanation: The word "guys" in the phrase "you guys".

Test examples:

Example 0: if you are<< comfortable>> with it. You<< guys>> support me in many other ways already and
Example 1: birth control access<|endoftext|> but I assure you<< women>> in Kentucky aren't laughing as they struggle
Example 2:âĢĻs gig! I hope you guys<< LOVE>> her, and<< please>> be nice,
Example 3:American, told<< Hannity>> that âĢľyou<< guys>> are playing the race card.âĢĿ
Example 4:<< the>><|endoftext|>ľI want to<< remind>> you all that 10 days ago (director Massimil
""", "[0,0,0,0,0]"),
    ("""Latent explanation: "of" before words that start with a capital letter.

Test examples:

Example 0: climate, TomblinâĢĻs Chief<< of>> Staff Charlie Lorensen said.Ċ
Example 1: no wonderworking relics, no true Body and Blood<< of>> Christ, no true Baptism
Example 2:ĊĊDeborah Sathe, Head<< of>> Talent Development and Production at Film London,
Example 3:ĊĊIt has been devised by Director<< of>> Public Prosecutions (DPP)
Example 4: and fair investigation not even include the Director<< of>> Athletics? Â· Finally, we believe the
""", "[1,1,1,1,1]"),
]

GENERATION_PROMPT = """Latent explanation: {explanation}

Text examples:

{examples}
"""

# delphi's system prompts with "text" -> "images"; the answer format is delphi's
IMAGE_DETECTION_SYSTEM = """You are an intelligent and meticulous vision researcher.

You will be given a certain latent of images, such as "dog fur" or "red circles".

You will then be given several image examples, each introduced by its number. Your task is to determine which examples possess the latent.

For each example in turn, return 1 if the image possesses the latent or 0 if it does not. You must return your response in a valid Python list with one entry per example. Do not return anything else besides a Python list.
"""
IMAGE_FUZZING_SYSTEM = """You are an intelligent and meticulous vision researcher.

You will be given a certain latent of images, such as "dog fur" or "red circles". You will be given a few image examples, each introduced by its number. In each image a region is kept bright and everything else is darkened; the bright region is supposed to strongly represent this latent.

Some examples might be mislabeled. Your task is to determine if the bright region is correctly labeled. Consider that all provided examples could be correct, none of the examples could be correct, or a mix. An example is only correct if the bright region is representative of the latent.

For each example in turn, return 1 if the image is correctly labeled or 0 if it is mislabeled. You must return your response in a valid Python list with one entry per example. Do not return anything else besides a Python list.
"""

PROMPT_TEXTS = (DETECTION_SYSTEM, FUZZING_SYSTEM, GENERATION_PROMPT, IMAGE_DETECTION_SYSTEM, IMAGE_FUZZING_SYSTEM,
                *(t for pair in DETECTION_FEWSHOT + FUZZING_FEWSHOT for t in pair))


def _shown(token: str) -> str:
    """A token as the scorer sees it: line breaks written ``\\n``, so each example stays on its
    ``Example {i}:`` line (delphi's few-shot examples show GPT-2's byte-level ``Ċ`` there)."""
    return token.replace("\r", "").replace("\n", "\\n")


def highlight_tokens(tokens: list[str], marked: set[int] | list[bool]) -> str:
    """Join tokens, wrapping each run of marked positions in ``<<`` ``>>`` (delphi's ``_highlight``:
    adjacent marked tokens share one pair of markers). ``<image>`` placeholders are dropped, line
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
    """The context as delphi shows it to the detection scorer: the tokens joined, unmarked
    (``<image>`` placeholders dropped, line breaks shown as ``\\n``)."""
    return "".join(_shown(t) for t in tokens if t != "<image>")


def text_messages(method: str, explanation: str, texts: list[str]) -> list[dict]:
    """delphi's chat for one batch of text examples: system prompt, three few-shot turns, then the
    explanation and ``Example {i}: {text}`` lines. ``method``: ``detection`` or ``fuzzing``.

    Raises:
        ValueError: an unknown method.
    """
    if method not in ("detection", "fuzzing"):
        raise ValueError(f"scoring method {method!r} is not one of detection, fuzzing")
    system, shots = (DETECTION_SYSTEM, DETECTION_FEWSHOT) if method == "detection" else (FUZZING_SYSTEM, FUZZING_FEWSHOT)
    examples = "\n".join(f"Example {i}: {t}" for i, t in enumerate(texts))
    turns = [m for u, a in shots for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    return [{"role": "system", "content": system}, *turns,
            {"role": "user", "content": GENERATION_PROMPT.format(explanation=explanation, examples=examples)}]


def image_messages(method: str, explanation: str, pngs: list[bytes]) -> list[dict]:
    """The chat for one batch of image examples: the image system prompt (see module doc), the
    explanation, then ``Example {i}:`` and the image (a PNG data URL) for each example."""
    if method not in ("detection", "fuzzing"):
        raise ValueError(f"scoring method {method!r} is not one of detection, fuzzing")
    system = IMAGE_DETECTION_SYSTEM if method == "detection" else IMAGE_FUZZING_SYSTEM
    content = [{"type": "text", "text": f"Latent explanation: {explanation}\n\nImage examples:"}]
    for i, png in enumerate(pngs):
        content += [{"type": "text", "text": f"Example {i}:"}, {"type": "image_url", "image_url": {"url": png_data_url(png)}}]
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


_LIST = re.compile(r"\[.*?\]", re.S)
_ENTRY = {"0": 0, "1": 1, "false": 0, "true": 1}


def parse_predictions(text: str | None, n: int) -> tuple[list[int] | None, str]:
    """The scorer's 0/1 per example, as delphi's ``Classifier._parse``: the first ``[...]`` in the
    answer must hold exactly ``n`` entries, each 0 or 1 (``True``/``False`` are accepted too).

    Returns:
        ``(predictions, "ok")``, or ``(None, "malformed")`` for no list, a list of another length,
        or an entry that is not 0/1 - the whole batch then has no prediction (delphi sets every
        prediction of a batch it cannot parse to None). Never raises.
    """
    m = _LIST.search(text or "")
    if m is None:
        return None, "malformed"
    inner = m.group(0)[1:-1].strip()
    entries = [e.strip().strip("'\"").lower() for e in inner.split(",")] if inner else []
    if len(entries) != n or any(e not in _ENTRY for e in entries):
        return None, "malformed"
    return [_ENTRY[e] for e in entries], "ok"


def prompt_params() -> dict:
    """The prompt's version and a hash of its text: a rule's ``prompt`` param, so that changing either
    redoes the answers."""
    import hashlib

    return {"version": SCORING_VERSION, "text_sha256": hashlib.sha256(("".join(PROMPT_TEXTS)).encode()).hexdigest()[:16]}
