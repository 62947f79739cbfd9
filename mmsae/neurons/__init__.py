"""Multimodal neurons (arXiv 2311.07470): find them without gradients (:mod:`~mmsae.neurons.find`),
map them and test their properties (:mod:`~mmsae.neurons.properties`), and edit them
(:mod:`~mmsae.neurons.edit`). :func:`find_all` and :func:`edit_all` (:mod:`~mmsae.neurons.run`) are
the two workflow stages."""

from mmsae.neurons.edit import (
    Delta, apply_delta, closed_form_edit, mean_pairwise_overlap, noise_delta, optimised_edit, random_neurons, revert,
)
from mmsae.neurons.find import (
    Caption, CoefficientCapture, caption, mlp_modules, neuron_top_tokens, noun_targets, projection_columns, score_neurons,
)
from mmsae.neurons.properties import causal_sweep, choose_scale, properties, semantic_hit, semantic_sensitivity
from mmsae.neurons.run import edit_all, find_all
from mmsae.neurons.samples import has_word, load_sample_image

__all__ = [
    "Caption", "CoefficientCapture", "Delta", "apply_delta", "caption", "causal_sweep", "choose_scale",
    "closed_form_edit", "edit_all", "find_all", "has_word", "load_sample_image", "mean_pairwise_overlap",
    "mlp_modules", "neuron_top_tokens", "noise_delta", "noun_targets", "optimised_edit", "projection_columns",
    "properties", "random_neurons", "revert", "score_neurons", "semantic_hit", "semantic_sensitivity",
]
