"""A folder ready for ``hf upload``: the SAE in SAELens's layout under its hook point, a
``pretrained_saes.yaml``-style entry and a model card.

SAELens (jbloomAus/SAELens) reads an SAE from ``<folder>/cfg.json`` + ``<folder>/sae_weights.safetensors``
and, when present, its log10 feature densities from ``<folder>/sparsity.safetensors``
(``sae_lens/constants.py``: ``SAE_CFG_FILENAME``, ``SAE_WEIGHTS_FILENAME``, ``SPARSITY_FILENAME``); a release in
``sae_lens/pretrained_saes.yaml`` has ``repo_id``, ``model``, ``conversion_func`` and ``saes``: a list of
``{id, path, l0, neuronpedia, variance_explained}`` (read by ``sae_lens/loading/pretrained_saes_directory.py``).
The model card's YAML metadata is what ``huggingface_hub.ModelCard`` parses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from mmsae.sae.io import CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE

REPO_PLACEHOLDER = "<user>/<repo>"


def upload_command(repo_id: str | None, folder: str | Path) -> str:
    """The one line a user runs to upload the folder (``hf`` is huggingface_hub's CLI)."""
    return f"hf upload {repo_id or REPO_PLACEHOLDER} {folder} ."


def release_entry(release: str, repo_id: str | None, model: str, hook_point: str, l0: float | None,
                  variance_explained: float | None = None) -> dict:
    """A ``pretrained_saes.yaml`` release: ``{release: {conversion_func, model, repo_id, saes: [...]}}``."""
    sae = {"id": hook_point, "path": hook_point, "l0": l0, "neuronpedia": None}
    if variance_explained is not None:
        sae["variance_explained"] = variance_explained
    return {release: {"conversion_func": None, "model": model, "repo_id": repo_id or REPO_PLACEHOLDER, "saes": [sae]}}


ARCHITECTURE_NAMES = {"topk": "TopK", "batchtopk": "BatchTopK", "matryoshka_batchtopk": "Matryoshka BatchTopK"}


def model_card(*, base_model: str | None, hook_point: str, d_sae: int, k: int, tokens_trained: int | None,
               fvu: float | None, loss_recovered: float | None, corpus: str, repo_id: str | None,
               folder: str, sparsity: bool = True, architecture: str = "topk") -> ModelCard:
    """The card: YAML metadata (base_model, library_name saelens, tags) and a body with the SAE's facts.

    ``base_model`` is left out of the metadata when it is not a hub id (a local directory such as the demo
    model), since the Hub checks that field against its repositories. ``sparsity``: the folder holds
    ``sparsity.safetensors`` (the body names it). ``architecture``: how it was trained (``topk``,
    ``batchtopk``, ``matryoshka_batchtopk``: ``sae.architecture``), named in the body with its
    inference rule (BatchTopK SAEs are saved as SAELens saves them, as JumpReLU with one threshold)."""
    data = ModelCardData(library_name="saelens", tags=["sparse-autoencoder", "saelens", "interpretability", "mmsae"],
                         base_model=base_model if base_model and _is_hub_id(base_model) else None)

    inference = ("; at inference a latent is active above one threshold learnt in training (saved as "
                 "SAELens saves BatchTopK SAEs: architecture jumprelu, a `threshold` tensor)") if architecture != "topk" else ""
    sparsity_note = f", and `{SPARSITY_FILE}`: each latent's log10 firing density over the training tokens" if sparsity else ""

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    body = f"""
# Sparse autoencoder for {base_model or 'the subject model'} at `{hook_point}`

A {ARCHITECTURE_NAMES.get(architecture, architecture)} sparse autoencoder (trained with mmsae) on the activations of `{hook_point}`{inference}.
The weights are in SAELens's layout under the folder `{hook_point}/` (`{CFG_FILE}` + `{WEIGHTS_FILE}`{sparsity_note}).

| | |
|---|---|
| hook point | `{hook_point}` |
| d_sae | {d_sae} |
| k ({'active latents per token' if architecture == 'topk' else 'mean active latents per token in training'}) | {k} |
| tokens trained | {fmt(tokens_trained, ',')} |
| held-out FVU | {fmt(fvu, '.4f')} |
| loss recovered | {fmt(loss_recovered, '.4f')} |
| training corpus | {corpus} |

Load it with SAELens from the uploaded repository: `SAE.from_pretrained("{repo_id or REPO_PLACEHOLDER}", "{hook_point}")`
(or register the entry in `pretrained_saes.yaml` beside this card).

Upload this folder with:

    {upload_command(repo_id, folder)}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _is_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not Path(s).exists()


def write_hub_folder(out: str | Path, *, sae_dir: str | Path, hook_point: str, release: str, repo_id: str | None,
                     model: str, metrics: dict, loss_recovered: dict | None, corpus: str) -> Path:
    """Write ``out/<hook_point>/{cfg.json,sae_weights.safetensors,sparsity.safetensors}`` (the last when
    ``sae_dir`` has it: an SAE trained elsewhere may not), ``out/pretrained_saes.yaml`` and ``out/README.md``.

    Args:
        sae_dir: ``results/runs/<run>/sae/`` (its ``cfg.json`` gives d_sae and k).
        metrics: its ``metrics.json`` (``heldout.fvu``, ``heldout.l0``, ``tokens_trained`` or ``n_tokens``).
        loss_recovered: its ``loss_recovered.json`` or None.

    Raises:
        FileNotFoundError: the SAE's cfg.json or weights are missing.
        FileExistsError: ``out`` exists.
    """
    out, sae_dir = Path(out), Path(sae_dir)
    for f in (CFG_FILE, WEIGHTS_FILE):
        if not (sae_dir / f).is_file():
            raise FileNotFoundError(f"{sae_dir / f}: the SAE to export is missing")
    cfg = json.loads((sae_dir / CFG_FILE).read_text())
    out.mkdir(parents=True, exist_ok=False)
    dest = out / hook_point
    dest.mkdir(parents=True)
    has_sparsity = (sae_dir / SPARSITY_FILE).is_file()
    for f in (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE) if has_sparsity else (CFG_FILE, WEIGHTS_FILE):
        shutil.copyfile(sae_dir / f, dest / f)
    held = metrics.get("heldout") or {}
    lr = _loss_recovered_value(loss_recovered)
    fvu = held.get("fvu")
    entry = release_entry(release, repo_id, model, hook_point, held.get("l0"),
                          None if fvu is None else round(1.0 - float(fvu), 6))
    (out / "pretrained_saes.yaml").write_text(yaml.safe_dump(entry, sort_keys=False))
    tokens = metrics.get("tokens_trained") or metrics.get("n_tokens_trained")
    if tokens is None and metrics.get("steps") and metrics.get("batch_size"):
        tokens = int(metrics["steps"]) * int(metrics["batch_size"])
    card = model_card(base_model=model, hook_point=hook_point, d_sae=int(cfg["d_sae"]), k=int(cfg["k"]),
                      tokens_trained=tokens, fvu=fvu, loss_recovered=lr, corpus=corpus, repo_id=repo_id,
                      folder=str(out), sparsity=has_sparsity,
                      architecture=(cfg.get("metadata") or {}).get("training_architecture") or cfg.get("architecture", "topk"))
    card.save(out / "README.md")
    return out


def _loss_recovered_value(lr: dict | None) -> float | None:
    """The CE loss recovered on text tokens of a ``loss_recovered.json``
    (:mod:`mmsae.interventions.loss_recovered`: ``text.ce_loss_recovered``), else None."""
    text = (lr or {}).get("text") or {}
    v = text.get("ce_loss_recovered")
    return float(v) if isinstance(v, (int, float)) else None
