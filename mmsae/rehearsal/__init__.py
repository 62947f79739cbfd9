"""The rehearsal: the paper's run (config/llava-next-8b.yaml) end to end on a CPU, with tiny random models.

``config/rehearsal.yaml`` layered over the paper config changes only model ids, sizes, data paths and
endpoints. What it points at is built here, offline and deterministically (a folder that already
holds a finished build of the same recipe is kept, so building twice is cheap):

* :mod:`mmsae.rehearsal.subject`: a random ``LlavaNextForConditionalGeneration`` with the layout of
  ``llava-hf/llama3-llava-next-8b-hf`` (32 Llama-3-style layers, CLIP-L/14-336 anyres views with
  image newlines, the Llama-3 chat format and special tokens), every width shrunk;
* :mod:`mmsae.rehearsal.evaluators`: random GroundingDINO, SAM and CLIP built from their
  transformers configs, saved as local directories that ``evaluate.detector`` and the others name;
* :mod:`mmsae.rehearsal.data`: LLaVA-NeXT-Data in its published Parquet schema and an interpretation
  image folder, from the photographs inside scikit-image's wheel;
* :mod:`mmsae.rehearsal.server`: a scripted OpenAI-compatible endpoint that answers the explainer,
  refiner, categorizer and scorer prompts in their formats.

``scripts/rehearse.sh [WORKDIR]`` builds all of it, starts the endpoint and runs the paper command.
Numbers from it are of random weights: they test the plumbing, never the method.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

STAMP = "mmsae_rehearsal.json"


def _stamp(out_dir: Path) -> Path:
    """The build's stamp, beside the folder (a corpus folder holds only its images)."""
    return out_dir.parent / f".{out_dir.name}.{STAMP}"


def is_built(out_dir: str | os.PathLike, recipe: dict) -> bool:
    """Whether ``out_dir`` holds a finished build of exactly ``recipe`` (its stamp file says so)."""
    out_dir = Path(out_dir)
    try:
        return out_dir.is_dir() and json.loads(_stamp(out_dir).read_text()) == json.loads(json.dumps(recipe))
    except (OSError, ValueError):
        return False


@contextmanager
def building(out_dir: str | os.PathLike, recipe: dict) -> Iterator[Path]:
    """A fresh hidden sibling folder to build ``out_dir`` in; on success it replaces ``out_dir`` and the
    recipe's stamp is written beside it (a failed build leaves no stamp, so the next run builds again)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would stay on the finished folder
        yield tmp
        _stamp(out_dir).unlink(missing_ok=True)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        _stamp(out_dir).write_text(json.dumps(recipe, indent=1, sort_keys=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built %s", out_dir)


def build_all(workdir: str | os.PathLike) -> dict[str, Path]:
    """Build (or keep) every model and data set of the rehearsal under ``workdir``, at the paths
    ``config/rehearsal.yaml`` names (relative to the working directory).

    Returns:
        ``{name: path}`` of what is there now.
    """
    from mmsae.rehearsal import data, evaluators, subject

    workdir = Path(workdir)
    out = {"subject": subject.build(workdir / subject.DIR)}
    out.update(evaluators.build_all(workdir))
    out.update(data.build(workdir))
    return out
