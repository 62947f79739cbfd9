"""Paper step (b): an LMM behind an OpenAI-compatible endpoint explains each selected feature.

:mod:`~mmsae.explain.batch` builds the requests and parses answers into the ``explanations`` table;
:mod:`~mmsae.explain.client` sends them (cached, retried, bounded in concurrency);
:mod:`~mmsae.explain.session` gives a job its endpoint; :mod:`~mmsae.explain.prompts` is the prompt.
"""

from mmsae.explain.batch import EXPLANATION_SCHEMA, build_requests, explain_features
from mmsae.explain.client import EndpointConfig, Explainer
from mmsae.explain.prompts import PROMPT_VERSION
from mmsae.explain.session import endpoint_session

__all__ = ["endpoint_session", "EXPLANATION_SCHEMA", "EndpointConfig", "Explainer", "PROMPT_VERSION", "build_requests", "explain_features"]
