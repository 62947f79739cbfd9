"""How many bytes an extraction will write, and whether they fit where ``results/`` lives.

:func:`project_extraction_bytes` is plain arithmetic (usable by a bench or for README figures without
a model); :func:`expected_tokens` fills its token counts from a loaded model and a corpus;
:func:`check_free_space` refuses an extraction whose projection does not fit (``extract.check_disk``).

Bytes per written token = ``d_model x`` the storage type's size (the activation, which zstd barely
compresses) ``+`` :data:`OVERHEAD_BYTES_PER_TOKEN` (the other shard columns); every *seen* token also
costs :data:`SEEN_BYTES_PER_TOKEN` (its id in the samples tables). Both overheads were measured on
shards written by :func:`mmsae.extract.run.extract` (tiny LLaVA-NeXT, d_model 64, 6 skimage photos and
a text prompt, 685 tokens) and rounded up; the projection was then within 10% of the bytes written
(float16 and float32). At d_model 4096 the activation is >99% of the bytes. The activation is
counted raw: zstd over byte-stream-split values saves 15-30% of it on real activations
(``bench/extract_disk.py``), so the projection is an upper bound by about that much.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping

from mmsae.data.corpus import Sample
from mmsae.models.inputs import build_messages
from mmsae.extract.subsample import ROLES, fractions_of

BYTES_PER_VALUE = {"float32": 4, "float16": 2, "bfloat16": 2}
OVERHEAD_BYTES_PER_TOKEN = 8  # measured 3 B/token (zstd): sample_id, token_index, token_id, modality, view, patch, role
SEEN_BYTES_PER_TOKEN = 16  # measured 13 B/token: input_ids (and token strings) of the samples tables, vocabulary
MARGIN_FRACTION = 0.05  # refuse unless the projection fits in the free space less this fraction of it


class DiskSpaceError(RuntimeError):
    """The projected extraction does not fit in the free space (the message names both figures)."""


def project_extraction_bytes(n_image_samples: int, n_text_samples: int, image_tokens: float,
                             text_tokens: float | Mapping[str, float], d_model: int, dtype: str,
                             fraction: float | Mapping[str, float]) -> int:
    """Projected bytes on disk of an extraction (shards and samples tables).

    Args:
        n_image_samples: samples with an image.
        n_text_samples: text-only samples.
        image_tokens: image tokens per image sample (for anyres models, an upper bound: the largest
            grid of :func:`max_image_tokens`).
        text_tokens: text tokens per sample (image and text samples alike), a number, or
            ``{"text": user-side tokens, "answer": assistant-answer tokens}`` per sample.
        d_model: width of the stored activation.
        dtype: storage type, ``float32`` / ``float16`` / ``bfloat16``.
        fraction: ``extract.token_fraction`` (a number or ``{image, text, answer}``).

    Returns:
        Bytes: written tokens x (d_model x value size + overhead) + seen tokens x samples-table bytes.

    Raises:
        ValueError: unknown dtype or bad fractions.
    """
    if dtype not in BYTES_PER_VALUE:
        raise ValueError(f"extract.dtype {dtype!r}: expected one of {sorted(BYTES_PER_VALUE)}")
    fr = fractions_of(fraction)
    text = dict(text_tokens) if isinstance(text_tokens, Mapping) else {"text": float(text_tokens), "answer": 0.0}
    n_samples = n_image_samples + n_text_samples
    seen = {"image": n_image_samples * image_tokens, "text": n_samples * text.get("text", 0.0),
            "answer": n_samples * text.get("answer", 0.0)}
    written = sum(seen[r] * fr[r] for r in ROLES)
    per_token = d_model * BYTES_PER_VALUE[dtype] + OVERHEAD_BYTES_PER_TOKEN
    return int(round(written * per_token + sum(seen.values()) * SEEN_BYTES_PER_TOKEN))


def max_image_tokens(model_config) -> int:
    """Image tokens of one image at most, from the model's config alone.

    Base view ``side^2`` (``side = image_size / patch_size``; +1 with the ``full`` feature strategy,
    which keeps CLS); for LLaVA-NeXT anyres, plus the largest grid of ``image_grid_pinpoints`` as the
    model packs it (``rows*side x cols*side`` patches and one image-newline token per patch row). An
    upper bound: unpadding removes the rows or columns of a non-square image's padding.
    Returns 0 for a model without a vision config.
    """
    vcfg = getattr(model_config, "vision_config", None)
    if vcfg is None:
        return 0
    side = vcfg.image_size // vcfg.patch_size
    per_view = side * side + (1 if getattr(model_config, "vision_feature_select_strategy", "default") == "full" else 0)
    pinpoints = getattr(model_config, "image_grid_pinpoints", None)
    if not pinpoints:
        return per_view
    grid = max((h // vcfg.image_size) * (w // vcfg.image_size) * per_view + (h // vcfg.image_size) * side
               for h, w in pinpoints)
    return per_view + grid


def expected_tokens(subject, samples: list[Sample], max_probe: int = 256) -> dict:
    """Token counts for :func:`project_extraction_bytes`, from the model and the corpus.

    Image tokens: :func:`max_image_tokens` of the model's config. Text tokens: the mean over up to
    ``max_probe`` evenly spaced samples of the chat-template rendering tokenized (the image placeholder
    not counted), split into user-side text and assistant answers (each answer tokenized alone).

    Args:
        subject: a loaded :class:`mmsae.models.SubjectModel`.
        samples: the corpus (or one part of it).

    Returns:
        ``{"n_image_samples", "n_text_samples", "image_tokens", "text_tokens": {"text", "answer"}}``.
    """
    n_image = sum(s.image_path is not None for s in samples)
    step = max(1, len(samples) // max_probe)
    probe = samples[::step][:max_probe]
    tok, image_id = subject.tokenizer, subject.image_token_id
    text = answer = 0
    for s in probe:
        ends_with_answer = bool(s.turns) and s.turns[-1][0] == "assistant"
        rendered = subject.processor.apply_chat_template(build_messages(s), add_generation_prompt=not ends_with_answer,
                                                         tokenize=False)
        ids = tok(rendered)["input_ids"]
        n_answer = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for r, t in s.turns if r == "assistant")
        text += len(ids) - (ids.count(image_id) if image_id is not None else 0) - n_answer
        answer += n_answer
    k = max(1, len(probe))
    return {"n_image_samples": n_image, "n_text_samples": len(samples) - n_image,
            "image_tokens": max_image_tokens(subject.model.config) if n_image else 0,
            "text_tokens": {"text": text / k, "answer": answer / k}}


def free_bytes(path: str | Path) -> int:
    """Free bytes (for this user) of the filesystem holding ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(projected: int, path: str | Path, margin_fraction: float = MARGIN_FRACTION) -> int:
    """Refuse when ``projected`` bytes do not fit in the free space where ``path`` lives, less a margin.

    Returns:
        The free bytes.

    Raises:
        DiskSpaceError: ``projected > free * (1 - margin_fraction)``; the message names both figures
            and the config key that overrides the check.
    """
    free = free_bytes(path)
    if projected > free * (1 - margin_fraction):
        raise DiskSpaceError(
            f"extraction would write about {_human(projected)} ({projected} bytes) to {path}, but its filesystem "
            f"has {_human(free)} ({free} bytes) free (less a {margin_fraction:.0%} margin). Lower "
            f"extract.token_fraction, use extract.dtype bfloat16/float16, free space, or set "
            f"extract.check_disk: false to run anyway")
    return free


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
