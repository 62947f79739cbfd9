"""Numbers and shapes for the report's templates: formatting, inlined images and per-token highlight
strengths (the figures are :mod:`mmsae.report.plots`'s). No HTML here: the templates write it (autoescaped)."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

from jinja2 import Undefined
from PIL import Image


def missing(x) -> bool:
    """None, NaN, or a key a template asked for that is not there."""
    return x is None or isinstance(x, Undefined) or (isinstance(x, float) and math.isnan(x))


def fmt(x, nd: int = 4) -> str:
    """``nd`` significant digits for floats, ``str`` for the rest, "–" when missing."""
    if missing(x):
        return "–"
    return f"{x:.{nd}g}" if isinstance(x, float) else str(x)


def num(x, spec: str = ".3g") -> str:
    """``format(x, spec)``, "–" when missing (a template's ``{{ x|num('+.3g') }}``)."""
    return "–" if missing(x) else format(x, spec)


def data_url(path: str | Path, max_side: int = 224) -> str:
    """An image file inlined as a JPEG data URL, at most ``max_side`` pixels on its longer side."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def context_tokens(tokens: list[str], acts: list[float], focus: int) -> list[dict]:
    """One text context as items for the template: ``{"text", "alpha" (0..1 of the context's largest
    activation), "value" (None when inactive), "focus"}``, with runs of inactive ``<image>``
    placeholders collapsed into one ``{"image_run": n}``."""
    vmax = max(acts) if acts and max(acts) > 0 else 1.0
    out, run = [], 0
    for i, (t, a) in enumerate(zip(tokens, acts)):
        if t == "<image>" and a <= 0 and i != focus:
            run += 1
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt == "<image>" and (acts[i + 1] <= 0 and i + 1 != focus):
                continue
            out.append({"image_run": run})
            run = 0
            continue
        out.append({"text": t, "alpha": f"{min(1.0, a / vmax):.2f}", "value": f"{a:.3g}" if a > 0 else None, "focus": i == focus})
    return out


def signed_tokens(tokens: list[str], values: list[float]) -> list[dict]:
    """Tokens with a signed value: ``{"text", "value", "color"}`` (blue positive, red negative,
    opacity by |value| over the largest |value|)."""
    vmax = max((abs(v) for v in values), default=0.0) or 1.0
    return [{"text": t, "value": f"{v:.3g}",
             "color": f"rgba(0,120,255,{min(1.0, abs(v) / vmax):.2f})" if v >= 0 else f"rgba(230,40,40,{min(1.0, abs(v) / vmax):.2f})"}
            for t, v in zip(tokens, values)]
