"""TopK sparse autoencoder: model, streamed data, trainer, SAELens-format I/O."""

from mmsae.sae.io import load_sae, save_sae, trained_without_special_tokens  # noqa: F401
from mmsae.sae.model import SAEOutput, TopKSAE, fvu  # noqa: F401
