"""The explainer endpoint for one job: a config section in, an :class:`EndpointConfig` out (and, for
``server: local``, a ``transformers serve`` started when the first request must go out, and stopped
at the end of the block)."""

from __future__ import annotations

import contextlib

from mmsae.explain.client import EndpointConfig
from mmsae.explain.server import LocalServer


@contextlib.contextmanager
def endpoint_session(e: dict, server_log: str | None = None, pid_dir: str | None = None):
    """Yield an :class:`EndpointConfig` for the config section ``e`` (``server``, ``base_url``,
    ``model``, ``api_key_env``, sampling fields).

    With ``server: local`` the config's ``model`` is the resolved model directory at once, and its
    ``start`` hook runs ``transformers serve`` on 127.0.0.1 (see
    :class:`~mmsae.explain.server.LocalServer`, whose records go to ``pid_dir``) the first time a
    request must be sent; a job whose every answer is cached never starts it. The server is stopped
    when the block ends, and dies with the job if it ends otherwise."""
    sampling = dict(api_key_env=e.get("api_key_env"), temperature=e["temperature"], max_tokens=e["max_tokens"],
                    extra_body=e.get("extra_body") or {}, concurrency=e["concurrency"], timeout_s=e["timeout_s"],
                    retries=e["retries"])
    if e["server"] == "local":
        srv = LocalServer(e["local_model"], device="auto", log_path=server_log, pid_dir=pid_dir)
        try:
            yield EndpointConfig(base_url=None, model=srv.model, start=srv.start, **sampling)
        finally:
            srv.stop()
    else:
        yield EndpointConfig(base_url=e["base_url"], model=e["model"], **sampling)
