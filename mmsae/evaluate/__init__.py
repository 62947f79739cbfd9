"""Paper step (c), Table 1: score refined explanations against where the features fire
(:mod:`mmsae.evaluate.run`), with the metrics in :mod:`~mmsae.evaluate.metrics`, the model backends in
:mod:`~mmsae.evaluate.backends` and the refinement in :mod:`~mmsae.evaluate.refine`; detection and
fuzzing scores in :mod:`~mmsae.evaluate.scoring`, their accuracy measures in
:mod:`~mmsae.evaluate.accuracy`. Nothing is imported here, so that a module of the package brings
only what it imports itself."""
