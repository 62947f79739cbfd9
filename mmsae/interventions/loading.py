"""The subject model with a trained SAE at its hook point: what every intervention rule loads first
(``steer``, ``attribute``, ``repair``, ``loss_recovered``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from mmsae.core.gpu import resolve_device
from mmsae.models import SubjectModel, load_subject_model, resolve_hook_point
from mmsae.sae import load_sae, trained_without_special_tokens
from mmsae.sae.io import check_hook_point
from mmsae.sae.model import TopKSAE


@dataclass(frozen=True)
class ModelWithSAE:
    """The loaded pieces.

    Attributes:
        subject: the model, its processor and tokenizer (:class:`mmsae.models.SubjectModel`).
        sae: the SAE (any ``sae.architecture``), on the model's device; sae_cfg: its parsed ``cfg.json``.
        hook_point: the module path the SAE was trained at (checked against ``model.hook_point``);
            module: that module of ``subject.model``, where the splice hooks go.
        keep_special: the SAE was trained without the model's special tokens, so splices leave them
            as they are (:func:`mmsae.sae.trained_without_special_tokens`).
    """

    subject: SubjectModel
    sae: TopKSAE
    sae_cfg: dict
    hook_point: str
    module: nn.Module
    keep_special: bool


def load_model_with_sae(model: str, dtype: str, device: str, sae_cfg_path: str | Path, hook_point: str) -> ModelWithSAE:
    """Load the subject model and the SAE whose ``cfg.json`` is ``sae_cfg_path``.

    Args:
        model: ``model.source`` as a directory or hub id; dtype, device: ``model.dtype``, ``model.device``.
        hook_point: ``model.hook_point``.

    Raises:
        ValueError: the SAE was trained at another hook point (:func:`mmsae.sae.io.check_hook_point`).
    """
    subject = load_subject_model(model, dtype=dtype, device=device)
    sae, sae_cfg = load_sae(Path(sae_cfg_path).parent, device=resolve_device(device))
    where = check_hook_point(sae_cfg, hook_point, str(sae_cfg_path))  # the hook point travels with the SAE
    return ModelWithSAE(subject, sae, sae_cfg, where, resolve_hook_point(subject.model, where),
                        trained_without_special_tokens(sae_cfg))
