"""Exports in the formats other interpretability tools read: a Neuronpedia import folder
(:mod:`.neuronpedia`, logits by :mod:`.logits`) and a Hugging Face Hub folder in SAELens's layout
(:mod:`.hub`). Written by the ``export`` rule (``workflow_scripts/export.py``)."""
