"""Ask an OpenAI-compatible chat endpoint (vLLM, SGLang, llama.cpp, ``transformers serve``, OpenAI)
for explanations: async, cached, retried, and bounded in concurrency across processes.

* The API key is read from the environment variable named by ``api_key_env`` at call time; it is
  never stored in config, params, logs or outputs.
* Retries: the openai client's own (``max_retries``) for HTTP 408/409/429/5xx (honouring
  ``Retry-After``), time-outs and refused connections, with its exponential backoff (0.5 s doubling
  to 8 s, jittered). A 200 whose body is malformed (not JSON, no choices, no message content) is
  something the client does not retry: :mod:`tenacity` retries that, waiting ``backoff_s`` doubling
  to ``max_backoff_s``. Both draw on one budget: at most ``retries + 1`` requests per answer. Other
  4xx are not retried. After the last try the error is returned with the request, never raised, so
  a stage always finishes and counts its failures.
* Concurrency: at most ``concurrency`` requests in flight in this process (a semaphore) and, when
  ``slots_dir`` is given, across every process sharing that directory (one lock file per slot,
  :func:`mmsae.core.locks.try_hold`); a slot is held through the client's retries of its request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import openai
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from mmsae.explain.cache import ResponseCache, request_key
from mmsae.core import progress
from mmsae.core.locks import release, try_hold

log = logging.getLogger(__name__)


@dataclass
class EndpointConfig:
    """How to reach the explainer.

    Attributes:
        base_url: e.g. ``http://127.0.0.1:8000/v1`` or ``https://api.openai.com/v1``.
        model: the model name the endpoint expects.
        api_key_env: name of the environment variable holding the key; None for local servers.
        temperature, max_tokens: sampling parameters (part of the cache key).
        concurrency: requests in flight at most (per slots directory, else per process).
        timeout_s: per-request time-out in seconds.
        retries: requests after the first one, at most (HTTP errors and malformed bodies together).
        backoff_s: first wait before resending after a malformed 200 body; doubled each retry, with
            jitter, capped at ``max_backoff_s`` (HTTP errors wait by the openai client's schedule).

        extra_body: passed through to the endpoint (e.g. ``generation_config`` for transformers serve).
        start: for an endpoint that is started on demand (a local server): called, once, before the
            first request that must go out; returns the ``base_url`` (which may be None until then).
            An :class:`Explainer` whose every answer is cached never calls it.

    The defaults of the fields that mirror ``explain.*`` config keys are the schema's
    (``config/schema.yaml``); the workflow always passes them explicitly.
    """

    base_url: str | None
    model: str
    api_key_env: str | None = None
    temperature: float = 0.0
    max_tokens: int = 256
    concurrency: int = 4
    timeout_s: float = 300.0
    retries: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    extra_body: dict = field(default_factory=dict)
    start: Callable[[], str] | None = field(default=None, repr=False, compare=False)

    def connect(self) -> str:
        """The ``base_url``, starting the endpoint first when it is started on demand."""
        if self.start is not None:
            self.base_url, self.start = self.start(), None
        if not self.base_url:
            raise ValueError("EndpointConfig.base_url is not set and there is no start hook")
        return self.base_url

    def sampling(self) -> dict:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, "extra_body": self.extra_body}

    def api_key(self) -> str:
        if not self.api_key_env:
            return "not-needed"
        key = os.environ.get(self.api_key_env)
        if not key:
            raise KeyError(f"explain.api_key_env: environment variable {self.api_key_env!r} is not set")
        return key


class MalformedResponse(ValueError):
    """A 200 answer whose body is not a chat completion with message content; ``requests``: how
    many requests the client sent to get it (its retries of HTTP errors included)."""

    def __init__(self, message: str, requests: int = 1):
        super().__init__(message)
        self.requests = requests


class SlotPool:
    """At most ``n`` holders at once across processes: one lock file per slot in ``directory``."""

    def __init__(self, directory: str | os.PathLike, n: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.paths = [self.dir / f"slot-{i}.lock" for i in range(n)]

    async def acquire(self):
        """Wait for a free slot; returns its lock (pass it to :meth:`release`)."""
        while (held := try_hold(random.sample(self.paths, len(self.paths)), 1)) is None:
            await asyncio.sleep(0.01)
        return next(iter(held.values()))

    @staticmethod
    def release(lock) -> None:
        release([lock])


def _attempts(exc: Exception) -> int:
    """Requests the openai client sent before raising ``exc`` (its last request's retry count + 1)."""
    request = getattr(exc, "request", None)
    try:
        return int(request.headers.get("x-stainless-retry-count", 0)) + 1
    except (AttributeError, ValueError):
        return 1


def _describe(exc: Exception) -> str:
    """A short description of a failure, for the ``error`` column."""
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {str(exc)[:200]}"
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return f"connection error: {exc}"
    if isinstance(exc, MalformedResponse):
        return f"malformed response: {str(exc)[:200]}"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


class Explainer:
    """Sends chat requests, with the cache in front and retries behind.

    Args:
        cfg: the endpoint.
        cache: a :class:`ResponseCache`; answered requests are never sent again.
        slots_dir: directory of the cross-process slot pool (None: in-process limit only).
    """

    def __init__(self, cfg: EndpointConfig, cache: ResponseCache, slots_dir: str | os.PathLike | None = None):
        self.cfg, self.cache = cfg, cache
        self._key = cfg.api_key()  # fail early, naming the variable, when the key is missing
        self.slots = SlotPool(slots_dir, cfg.concurrency) if slots_dir else None
        self.sent = 0
        self.client = self.sem = None

    async def _send(self, messages: list[dict], max_retries: int) -> tuple[dict, int]:
        """One answer through the openai client (which retries HTTP errors up to ``max_retries``
        times); returns ``(answer, requests sent)``.

        Raises:
            MalformedResponse: a 200 whose body is not a completion with string content.
            openai.APIError: what the client raised after its retries.
        """
        lock = await self.slots.acquire() if self.slots else None
        try:
            t0 = time.perf_counter()
            raw = await self.client.with_options(max_retries=max_retries).chat.completions.with_raw_response.create(
                model=self.cfg.model, messages=messages, temperature=self.cfg.temperature,
                max_tokens=self.cfg.max_tokens, extra_body=self.cfg.extra_body or None,
            )
            latency = time.perf_counter() - t0
        finally:
            if lock is not None:
                SlotPool.release(lock)
        n = raw.retries_taken + 1
        try:
            resp = raw.parse()
            content = resp.choices[0].message.content
            usage = resp.usage
        except Exception as exc:  # noqa: BLE001 - any failure to read the body makes it malformed
            raise MalformedResponse(f"{type(exc).__name__}: {exc}", n) from exc
        if not isinstance(content, str):
            raise MalformedResponse("no message content in the response", n)
        answer = {
            "content": content,
            "latency_s": latency,
            "prompt_tokens": getattr(usage, "prompt_tokens", None),
            "completion_tokens": getattr(usage, "completion_tokens", None),
        }
        lp = getattr(resp.choices[0], "logprobs", None)  # asked for by scoring's logprob mode only
        if lp is not None and getattr(lp, "content", None) is not None:
            answer["logprobs"] = [c.model_dump() for c in lp.content]
        return answer, n

    async def complete(self, messages: list[dict]) -> dict:
        """One answer: ``{"content", "latency_s", "prompt_tokens", "completion_tokens", "cached",
        "error", "attempts"}``; ``content`` is None and ``error`` set when every try failed.
        ``attempts`` counts the HTTP requests sent (at most ``retries + 1``)."""
        key = request_key(self.cfg.model, messages, self.cfg.sampling())
        hit = self.cache.get(key)
        if hit is not None:
            return {**hit, "cached": True, "error": None, "attempts": 0}
        sent = 0
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(MalformedResponse),
            stop=lambda state: sent > self.cfg.retries,  # the budget is shared with the client's retries
            wait=wait_exponential_jitter(multiplier=self.cfg.backoff_s, max=self.cfg.max_backoff_s, jitter=self.cfg.backoff_s),
            before_sleep=lambda state: log.warning("request failed (%s); resending", _describe(state.outcome.exception())),
            reraise=True,
        )
        async with self.sem:
            try:
                async for attempt in retrying:
                    with attempt:
                        try:
                            answer, n = await self._send(messages, max_retries=self.cfg.retries - sent)
                        except MalformedResponse as exc:
                            sent += exc.requests
                            raise
                        except openai.APIError as exc:
                            sent += _attempts(exc)
                            raise
                        sent += n
            except (openai.APIError, MalformedResponse) as exc:
                self.sent += sent
                return {"content": None, "latency_s": None, "prompt_tokens": None, "completion_tokens": None,
                        "cached": False, "error": _describe(exc), "attempts": sent}
        self.sent += sent
        self.cache.put(key, self.cfg.model, answer)
        return {**answer, "cached": False, "error": None, "attempts": sent}

    async def complete_all(self, requests: list[list[dict]], label: str = "requests") -> list[dict]:
        """Answers for many message lists, in order, concurrently (one event loop per call).

        When every answer is in the cache nothing is sent and the endpoint is not started
        (:meth:`EndpointConfig.connect` is not called). Progress (a bar, and the count, rate and ETA
        in the log, :func:`mmsae.core.progress.gather`) is reported under ``label``
        (``explain``, ``score``, ...), per distinct request, cached ones included."""
        # identical requests in one batch are sent once
        keys = [request_key(self.cfg.model, m, self.cfg.sampling()) for m in requests]
        unique = {k: m for k, m in zip(keys, requests)}
        if all(self.cache.get(k) is not None for k in unique):
            answers = {k: await self.complete(m) for k, m in unique.items()}  # all from the cache
            log.info("%s: %d/%d requests, all answered from the cache", label, len(unique), len(unique))
            return [answers[k] for k in keys]
        self.client = openai.AsyncOpenAI(base_url=self.cfg.connect(), api_key=self._key, timeout=self.cfg.timeout_s,
                                         max_retries=self.cfg.retries)
        self.sem = asyncio.Semaphore(self.cfg.concurrency)
        try:
            answers = dict(zip(unique, await progress.gather((self.complete(m) for m in unique.values()), label)))
            return [answers[k] for k in keys]
        finally:
            await self.client.close()
