"""Save and load SAEs in SAELens's on-disk layout: ``cfg.json`` + ``sae_weights.safetensors`` +
``sparsity.safetensors``.

``sae_lens.SAE.load_from_disk(dir)`` reads these files (architecture ``topk``): tensors ``W_enc
(d_in, d_sae)``, ``b_enc (d_sae)``, ``W_dec (d_sae, d_in)``, ``b_dec (d_in)``; config fields
``architecture``, ``d_in``, ``d_sae``, ``k``, ``dtype``, ``apply_b_dec_to_input``,
``normalize_activations`` and ``metadata`` (model name, hook name). Our own fields sit under
``mmsae`` and are ignored by SAELens.

``sparsity.safetensors`` holds one tensor, ``sparsity`` (d_sae,) float32: log10 of each latent's
firing density plus 1e-10, as SAELens's trainer saves it beside a checkpoint (``SPARSITY_FILENAME``,
``_log_feature_sparsity`` in ``sae_lens/training/sae_trainer.py``) and its loaders read it back
(``safe_open(...).get_tensor("sparsity")``). A latent that never fired has -10. SAELens's file covers
its last feature-sampling window; ours covers every training token of the run.

BatchTopK and Matryoshka BatchTopK SAEs (``sae.architecture``) are written as SAELens 6 writes them
for inference (``TrainingSAE.save_inference_model``): architecture ``jumprelu``, one more tensor
``threshold (d_sae)`` (the inference threshold, the same for every latent), and
``metadata.training_architecture`` (``batchtopk`` or ``matryoshka_batchtopk``) with
``metadata.training_architecture_details`` (``k``, ``topk_threshold_lr``; ``matryoshka_widths``, the
prefix lengths ending with d_sae). :func:`load_sae` reads ``jumprelu`` files of those two training
architectures only (see :mod:`mmsae.sae.batchtopk`).

``normalize_activations`` is always ``none``: an SAE trained on scaled activations
(``sae.normalize_activations``) is saved with the scale folded into its weights, as SAELens saves a
finished SAE; the scale is kept in ``mmsae.normalize_activations`` (see :mod:`mmsae.sae.norms`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmsae.core.io import atomic_path, write_json
from mmsae.sae.batchtopk import THRESHOLD_RATE, make_sae
from mmsae.sae.model import TopKSAE

CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
SPARSITY_EPS = 1e-10  # SAELens's: log10(density + eps), so a latent that never fired gets -10


def save_sae(sae: TopKSAE, out_dir: str | os.PathLike, *, model_name: str, hook_point: str, extra: dict | None = None) -> Path:
    """Write ``sae`` to ``out_dir`` (both files atomically) and return the directory.

    ``hook_point`` is stored under SAELens's key ``hook_name`` (top level and in ``metadata``), where
    every stage that splices the SAE in reads it back (:func:`check_hook_point`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().cpu().contiguous() for n, t in sae.state_dict().items()}  # SAELens's names and layout
    with atomic_path(out_dir / WEIGHTS_FILE, ".safetensors") as tmp:
        save_file(tensors, str(tmp))
    cfg = {
        "architecture": "topk" if sae.architecture == "topk" else "jumprelu",
        "d_in": sae.d_model,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"model_name": model_name, "hook_name": hook_point, "hook_head_index": None, "prepend_bos": True,
                     **_training_architecture(sae)},
        # Top-level copies for loaders of SAELens < 6.
        "model_name": model_name,
        "hook_name": hook_point,
        "mmsae": extra or {},
    }
    write_json(out_dir / CFG_FILE, cfg)
    return out_dir


def log10_density(fire_counts: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """log10(fire_counts / n_tokens + 1e-10) as float32, SAELens's ``log_feature_sparsity``.

    Args:
        fire_counts: (d_sae,) tokens each latent was active on; n_tokens: tokens counted over.

    Raises:
        ValueError: ``n_tokens`` is not positive (the density is undefined)."""
    if n_tokens <= 0:
        raise ValueError(f"log10 density over {n_tokens} tokens is undefined")
    return torch.log10(fire_counts.detach().cpu().double() / n_tokens + SPARSITY_EPS).float()


def save_sparsity(out_dir: str | os.PathLike, fire_counts: torch.Tensor, n_tokens: int) -> Path:
    """Write ``out_dir/sparsity.safetensors`` atomically (:func:`log10_density` under the key ``sparsity``)
    and return its path. ``fire_counts``: (d_sae,) over ``n_tokens`` training tokens."""
    path = Path(out_dir) / SPARSITY_FILE
    with atomic_path(path, ".safetensors") as tmp:
        save_file({"sparsity": log10_density(fire_counts, n_tokens).contiguous()}, str(tmp))
    return path


def load_sparsity(path: str | os.PathLike) -> torch.Tensor:
    """The (d_sae,) float32 log10 densities of the SAE folder ``path``.

    Raises:
        FileNotFoundError: the folder has no ``sparsity.safetensors``."""
    f = Path(path) / SPARSITY_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found")
    return load_file(str(f))["sparsity"]


def _training_architecture(sae: TopKSAE) -> dict:
    """cfg.json metadata naming a BatchTopK SAE's training architecture, as SAELens's
    ``TrainingSAEConfig._metadata_with_training_info`` writes it; empty for TopK."""
    if sae.architecture == "topk":
        return {}
    details = {"k": sae.k, "topk_threshold_lr": THRESHOLD_RATE}
    if sae.architecture == "matryoshka_batchtopk":
        details["matryoshka_widths"] = list(sae.prefixes)
    return {"training_architecture": sae.architecture, "training_architecture_details": details}


def load_sae(path: str | os.PathLike, device: str = "cpu") -> tuple[TopKSAE, dict]:
    """Load an SAE saved by :func:`save_sae` (or a SAELens ``topk`` SAE, or a SAELens ``jumprelu``
    SAE trained as ``batchtopk`` or ``matryoshka_batchtopk``) and its config.

    Raises:
        FileNotFoundError: ``cfg.json`` or the weights are missing.
        ValueError: the architecture is not one of those, ``normalize_activations`` is not ``none`` (the
            SAE would need an input scale this loader does not apply), or a tensor's shape is wrong.
    """
    path = Path(path)
    cfg_path = path / CFG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found")
    cfg = json.loads(cfg_path.read_text())
    architecture, k, prefixes = _architecture(cfg, cfg_path)
    if cfg.get("normalize_activations", "none") != "none":
        raise ValueError(f"{cfg_path}: normalize_activations {cfg['normalize_activations']!r} is not 'none'; fold the "
                         "scaling into the weights first (SAELens: fold_activation_norm_scaling_factor)")
    tensors = load_file(str(path / WEIGHTS_FILE), device=device)
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    sae = make_sae(architecture, cfg["d_in"], cfg["d_sae"], k, prefixes=prefixes, dtype=dtype).to(device)
    try:
        sae.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path / WEIGHTS_FILE}: {exc}") from None
    return sae.eval(), cfg


def _architecture(cfg: dict, where: Path) -> tuple[str, int, list[int] | None]:
    """(architecture, k, Matryoshka prefixes or None) of a cfg.json; ValueError for any other."""
    if cfg.get("architecture") == "topk":
        return "topk", int(cfg["k"]), None
    meta = cfg.get("metadata") or {}
    trained = meta.get("training_architecture")
    if cfg.get("architecture") != "jumprelu" or trained not in ("batchtopk", "matryoshka_batchtopk"):
        raise ValueError(f"{where}: architecture {cfg.get('architecture')!r} (trained as {trained!r}) is not 'topk' or "
                         "'jumprelu' trained as 'batchtopk' or 'matryoshka_batchtopk'")
    details = meta.get("training_architecture_details") or {}
    k = int(round(float(details.get("k", cfg.get("k", 1)))))  # SAELens's BatchTopK k is a float (a mean L0)
    return trained, k, details.get("matryoshka_widths") if trained == "matryoshka_batchtopk" else None


def trained_without_special_tokens(cfg: dict) -> bool:
    """Whether the SAE of ``cfg`` (its ``cfg.json``) was trained without the model's special tokens
    (``sae.exclude_special_tokens``, true unless set): then splicing and encoding leave them out too.
    An SAE from elsewhere (no ``mmsae`` section) was trained on every token, as far as we know."""
    ours = cfg.get("mmsae")
    return bool(ours is not None and (ours.get("train") or {}).get("exclude_special_tokens", True))


def check_hook_point(sae_cfg: dict, configured: str, where: str) -> str:
    """The hook point an SAE was trained at, read from its ``cfg.json`` (SAELens's key ``hook_name``,
    top level or under ``metadata``, as SAELens 6 writes it); it must equal the configured
    ``model.hook_point``. The one check every stage that puts an SAE on the model uses (encode,
    steering, attribution, loss recovered).

    Args:
        sae_cfg: the parsed cfg.json; configured: ``model.hook_point``; where: the cfg.json path (for errors).

    Returns:
        The hook point (``configured`` when cfg.json names none).

    Raises:
        ValueError: cfg.json names another hook point than the config.
    """
    name = sae_cfg.get("hook_name") or (sae_cfg.get("metadata") or {}).get("hook_name")
    if name is None:
        return configured
    if name != configured:
        raise ValueError(f"{where}: the SAE was trained at hook point {name!r} (cfg.json hook_name) but model.hook_point is {configured!r}; "
                         "set model.hook_point to the SAE's hook point or use an SAE trained there")
    return name
