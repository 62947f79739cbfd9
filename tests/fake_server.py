"""A real HTTP server on 127.0.0.1 that answers ``POST /v1/chat/completions`` like an
OpenAI-compatible endpoint, with scripted faults - for the client's tests and ``bench/explain_throughput.py`` (test code: it is not part of the package).

Each request takes the next action from ``script`` (then ``default``): ``"ok"``, an HTTP status
such as ``500``, ``("429", retry_after_s)``, ``"garbage"`` (a 200 with a body that is not JSON),
``"nochoices"`` (valid JSON without choices) or ``("slow", seconds)`` (answers late). ``reply`` is the
answer's content, or a function of the request body that returns it. Every answer
waits ``latency_s`` first. The server counts requests, records the ``Authorization`` headers it
saw (and the client's retry-count header), and the largest number of requests in flight at once.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeEndpoint:
    """Start with ``with FakeEndpoint(...) as ep:``; ``ep.base_url`` is ``http://127.0.0.1:PORT/v1``."""

    def __init__(self, script: list | None = None, default="ok", latency_s: float = 0.0,
                 reply: str | Callable[[dict], str] = "[EXPLANATION]: red circles",
                 logprobs: Callable[[dict], dict[str, float]] | None = None):
        self.script, self.default, self.latency_s, self.reply = list(script or []), default, latency_s, reply
        self.logprobs = logprobs
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth_headers: list[str] = []
        self.retry_counts: list[str | None] = []  # the openai client's x-stainless-retry-count per request
        self.bodies: list[dict] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _next(self):
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.script.pop(0) if self.script else self.default

    def _handler(self):
        ep = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def setup(self):
                super().setup()
                # headers and body go out in two writes: without this, Nagle + delayed ACK add ~40 ms
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _send(self, code: int, body: bytes, headers: dict | None = None):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                action = ep._next()
                with ep._lock:
                    ep.auth_headers.append(self.headers.get("Authorization", ""))
                    ep.retry_counts.append(self.headers.get("x-stainless-retry-count"))
                    ep.bodies.append(body)
                try:
                    time.sleep(ep.latency_s)
                    kind, arg = (action if isinstance(action, tuple) else (action, None))
                    if kind == "slow":
                        time.sleep(arg)
                        kind = "ok"
                    if kind == "ok":
                        payload = {
                            "id": "x", "object": "chat.completion", "created": 0, "model": body.get("model", ""),
                            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": ep.reply(body) if callable(ep.reply) else ep.reply}}],
                            "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16},
                        }
                        if ep.logprobs is not None and body.get("logprobs"):
                            probs = sorted(ep.logprobs(body).items(), key=lambda kv: -kv[1])
                            top = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in probs]
                            payload["choices"][0]["logprobs"] = {"content": [{**top[0], "top_logprobs": top}]}
                        self._send(200, json.dumps(payload).encode())
                    elif kind == "garbage":
                        self._send(200, b"<html>definitely not json")
                    elif kind == "nochoices":
                        self._send(200, json.dumps({"id": "x", "object": "chat.completion"}).encode())
                    elif str(kind) == "429":
                        self._send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": str(arg if arg is not None else 0)})
                    else:
                        self._send(int(kind), json.dumps({"error": {"message": f"scripted {kind}"}}).encode())
                finally:
                    with ep._lock:
                        ep.in_flight -= 1

        return Handler

    def __enter__(self) -> "FakeEndpoint":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> bool:
        self._server.shutdown()
        self._server.server_close()
        return False
