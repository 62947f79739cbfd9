"""Paper step (c), Table 1: score refined explanations against where the features fire
(:mod:`mmsae.evaluate.run`), with the metrics in :mod:`~mmsae.evaluate.metrics`, the model backends in
:mod:`~mmsae.evaluate.backends` and the refinement in :mod:`~mmsae.evaluate.refine`."""

from mmsae.evaluate.run import SCORE_SCHEMA, score_features, summary_table

__all__ = ["SCORE_SCHEMA", "score_features", "summary_table"]
