"""Ask an OpenAI-compatible chat endpoint (vLLM, SGLang, llama.cpp, ``transformers serve``, OpenAI)
for explanations: async, cached, retried, and bounded in concurrency across processes.

* The API key is read from the environment variable named by ``api_key_env`` at call time; it is
  never stored in config, params, logs or outputs.
* Retried with exponential backoff: HTTP 5xx, 429 (honouring ``Retry-After``), time-outs, refused
  connections and malformed bodies. Other 4xx are not retried. After the last try the error is
  returned with the request, never raised, so a stage always finishes and counts its failures.
* Concurrency: at most ``concurrency`` requests in flight in this process (a semaphore) and, when
  ``slots_dir`` is given, across every process sharing that directory (one ``flock``-ed file per slot).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmsae.explain.cache import ResponseCache, request_key

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
        retries: tries after the first one.
        backoff_s: first backoff; doubled each retry, with jitter, capped at ``max_backoff_s``.
        extra_body: passed through to the endpoint (e.g. ``generation_config`` for transformers serve).
    """

    base_url: str
    model: str
    api_key_env: str | None = None
    temperature: float = 0.0
    max_tokens: int = 256
    concurrency: int = 4
    timeout_s: float = 120.0
    retries: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    extra_body: dict = field(default_factory=dict)

    def sampling(self) -> dict:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, "extra_body": self.extra_body}

    def api_key(self) -> str:
        if not self.api_key_env:
            return "not-needed"
        key = os.environ.get(self.api_key_env)
        if not key:
            raise KeyError(f"explain.api_key_env: environment variable {self.api_key_env!r} is not set")
        return key


class SlotPool:
    """At most ``n`` holders at once across processes: one ``flock``-ed file per slot in ``directory``."""

    def __init__(self, directory: str | os.PathLike, n: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n = n

    async def acquire(self) -> int:
        while True:
            for i in random.sample(range(self.n), self.n):
                fd = os.open(self.dir / f"slot-{i}.lock", os.O_CREAT | os.O_RDWR, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    os.close(fd)
            await asyncio.sleep(0.01)

    @staticmethod
    def release(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _retry_after(exc) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _classify(exc: Exception) -> tuple[bool, str]:
    """(retryable, short description) for an exception from the openai client."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        return code == 429 or code >= 500, f"HTTP {code}: {str(exc)[:200]}"
    if isinstance(exc, openai.APITimeoutError):
        return True, "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return True, f"connection error: {exc}"
    if isinstance(exc, (openai.APIResponseValidationError, ValueError, KeyError, TypeError, IndexError, AttributeError)):
        return True, f"malformed response: {type(exc).__name__}: {str(exc)[:200]}"
    return False, f"{type(exc).__name__}: {str(exc)[:200]}"


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

    async def _send(self, messages: list[dict]) -> dict:
        fd = await self.slots.acquire() if self.slots else None
        try:
            self.sent += 1
            t0 = time.perf_counter()
            resp = await self.client.chat.completions.create(
                model=self.cfg.model, messages=messages, temperature=self.cfg.temperature,
                max_tokens=self.cfg.max_tokens, extra_body=self.cfg.extra_body or None,
            )
            latency = time.perf_counter() - t0
        finally:
            if fd is not None:
                SlotPool.release(fd)
        content = resp.choices[0].message.content
        if content is None or not isinstance(content, str):
            raise ValueError("no message content in the response")
        usage = resp.usage
        return {
            "content": content,
            "latency_s": latency,
            "prompt_tokens": getattr(usage, "prompt_tokens", None),
            "completion_tokens": getattr(usage, "completion_tokens", None),
        }

    async def complete(self, messages: list[dict]) -> dict:
        """One answer: ``{"content", "latency_s", "prompt_tokens", "completion_tokens", "cached",
        "error", "attempts"}``; ``content`` is None and ``error`` set when every try failed."""
        key = request_key(self.cfg.model, messages, self.cfg.sampling())
        hit = self.cache.get(key)
        if hit is not None:
            return {**hit, "cached": True, "error": None, "attempts": 0}
        error = None
        async with self.sem:
            for attempt in range(self.cfg.retries + 1):
                try:
                    answer = await self._send(messages)
                    self.cache.put(key, self.cfg.model, answer)
                    return {**answer, "cached": False, "error": None, "attempts": attempt + 1}
                except Exception as exc:  # noqa: BLE001 - every failure is classified and recorded
                    retryable, error = _classify(exc)
                    if not retryable or attempt == self.cfg.retries:
                        break
                    wait = _retry_after(exc)
                    if wait is None:
                        wait = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
                    log.warning("request failed (%s); retry %d/%d in %.1fs", error, attempt + 1, self.cfg.retries, wait)
                    await asyncio.sleep(min(wait, self.cfg.max_backoff_s))
        return {"content": None, "latency_s": None, "prompt_tokens": None, "completion_tokens": None,
                "cached": False, "error": error, "attempts": attempt + 1}

    async def complete_all(self, requests: list[list[dict]]) -> list[dict]:
        """Answers for many message lists, in order, concurrently (one event loop per call)."""
        import openai

        self.client = openai.AsyncOpenAI(base_url=self.cfg.base_url, api_key=self._key, timeout=self.cfg.timeout_s, max_retries=0)
        self.sem = asyncio.Semaphore(self.cfg.concurrency)
        try:
            # identical requests in one batch are sent once
            keys = [request_key(self.cfg.model, m, self.cfg.sampling()) for m in requests]
            unique = {k: m for k, m in zip(keys, requests)}
            answers = dict(zip(unique, await asyncio.gather(*(self.complete(m) for m in unique.values()))))
            return [answers[k] for k in keys]
        finally:
            await self.client.close()
