"""The explainer endpoint for one job: a config section in, an :class:`EndpointConfig` out (and, for
``server: local``, a ``transformers serve`` running for the block)."""

from __future__ import annotations

import contextlib

from mmsae.explain.client import EndpointConfig
from mmsae.explain.server import LocalServer


@contextlib.contextmanager
def endpoint_session(e: dict, server_log: str | None = None):
    """Yield an :class:`EndpointConfig` for the config section ``e`` (``server``, ``base_url``,
    ``model``, ``api_key_env``, sampling fields); with ``server: local`` a ``transformers serve``
    runs on 127.0.0.1 for the duration of the block (see :class:`~mmsae.explain.server.LocalServer`)."""
    sampling = dict(api_key_env=e.get("api_key_env"), temperature=e["temperature"], max_tokens=e["max_tokens"],
                    extra_body=e.get("extra_body") or {}, concurrency=e["concurrency"], timeout_s=e["timeout_s"],
                    retries=e["retries"])
    if e["server"] == "local":
        with LocalServer(e["local_model"], device="auto", log_path=server_log) as srv:
            yield EndpointConfig(base_url=srv.base_url, model=srv.model, **sampling)
    else:
        yield EndpointConfig(base_url=e["base_url"], model=e["model"], **sampling)
